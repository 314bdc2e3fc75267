"""The traced memory figure beside the analytical one, on request ("trace this step").

The memory bar shows the analytical estimate (arithmetic, redrawn on every change). A button runs the
traced estimate (`shardlab.estimate.estimate(..., method="trace")`: one real training step of the
model on fake tensors, seconds on a CPU, no GPU) and this pane shows its peak allocated figure next to
the analytical one with their difference, and what was traced (DeepSpeed: the forward/backward
working set only, its states stay analytical). A trace belongs to the plan, model and GPU it was made
for: when any of them changes, the pane says the figure is stale instead of showing a wrong pair.
"""

from __future__ import annotations

import html
import time
from typing import Any, Callable

import panel as pn

from shardlab.models import resolve_model
from shardlab.plan import Plan, PlanError
from shardlab.units import GIB, MIB

HELP = ("Run one real training step of this model on fake tensors (no GPU, no memory: seconds) and show its "
        "peak allocated memory beside the analytical figure.")


def trace_dict(plan: Plan, model: str, gpu: str) -> dict[str, Any]:
    """estimate(..., method="trace").to_dict() plus the seconds it took, or {'error': message}."""
    if plan.errors():
        return {"error": "no trace until the plan's errors are fixed (see the messages beside the controls)."}
    from shardlab.estimate import estimate

    t0 = time.perf_counter()
    try:
        out = estimate(plan, resolve_model(model), gpu=gpu, method="trace").to_dict()
    except PlanError as e:
        return {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - a model the tracer cannot run is a message, not a broken page
        return {"error": f"the trace did not run: {type(e).__name__}: {e}"[:400]}
    out["trace_seconds"] = time.perf_counter() - t0
    return out


def _size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 10 else f"{b / MIB:.1f} MiB"


def traced_html(traced: dict[str, Any], analytic: dict[str, Any]) -> str:
    """Traced and analytical peak allocated (GiB), their difference, and what the trace covered."""
    if "error" in traced:
        return f'<div class="sl-error" style="color:#b00020">✖ {html.escape(traced["error"])}</div>'
    t = traced["per_gpu"]["peak_allocated"]
    a = (analytic.get("per_gpu") or {}).get("peak_allocated")
    line = f"traced peak allocated <b>{_size(t)}</b>"
    if a:
        d = t - a
        line += f" · analytical {_size(a)} · traced − analytical <b>{'+' if d >= 0 else '−'}{_size(abs(d))} ({d / a:+.1%})</b>"
    line += f" · traced in {traced.get('trace_seconds', 0):.1f} s"
    what = html.escape((traced.get("notes") or {}).get("trace", ""))
    return f'<div class="sl-traced-figure">{line}</div><div style="font-size:12px;color:#555">{what}</div>'


class TracePane:
    """The "trace this step" button and its result; `key_getter` names what a trace is valid for."""

    def __init__(self, run: Callable[[], tuple[dict, dict]], key_getter: Callable[[], tuple]):
        self._run, self._key = run, key_getter
        self.button = pn.widgets.Button(label="trace this step", color="default", width=160,
                                        description=HELP, css_classes=["sl-trace-button"])
        self.pane = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["sl-traced"])
        self.last: dict[str, Any] = {}
        self._traced_for: tuple | None = None
        self.button.on_click(lambda ev: self.trace())
        self.layout = pn.Row(self.button, self.pane, sizing_mode="stretch_width")

    def trace(self) -> dict[str, Any]:
        self.button.param.update(label="tracing…", disabled=True)
        try:
            traced, analytic = self._run()
        finally:
            self.button.param.update(label="trace this step", disabled=False)
        self.last, self._traced_for = traced, self._key()
        self.pane.object = traced_html(traced, analytic)
        return traced

    def follow(self) -> None:
        """Called on every change: a trace made for another plan, model or GPU is marked stale."""
        if self._traced_for is not None and self._traced_for != self._key():
            self._traced_for, self.last = None, {}
            self.pane.object = '<div class="sl-traced-stale" style="color:#555">the plan, model or GPU changed since the trace: trace again</div>'
