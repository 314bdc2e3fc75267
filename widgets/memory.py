"""The live memory bar: what one GPU holds under the plan, against the chosen GPU's capacity.

Numbers come from `shardlab.estimate.estimate(plan, model, gpu)`; this file only draws them as a
stacked HTML bar (params / grads / optimizer / activations / buffers / overhead), which redraws in
well under a millisecond, plus the predicted step time, tokens/s and MFU and the step's breakdown
(steptime.py: compute, host overhead, exposed communication, offload). Beside it, on request, the
traced estimate and its difference from the analytical one (tracepane.py).
"""

from __future__ import annotations

import html
from typing import Any, Callable

import panel as pn

from shardlab.estimate.gpus import DEFAULT_GPU
from shardlab.models import resolve_model
from shardlab.plan import Plan, PlanError
from shardlab.units import GIB
from shardlab_widgets.modelpick import model_input, model_note
from shardlab_widgets.tracepane import TracePane, trace_dict

PARTS = (
    ("params", "#4c78a8"),
    ("grads", "#f58518"),
    ("optimizer", "#54a24b"),
    ("activations", "#e45756"),
    ("buffers", "#72b7b2"),
    ("overhead", "#b279a2"),
)


def gpu_names() -> list[str]:
    try:
        from shardlab.estimate.gpus import GPUS
    except ImportError:
        return [DEFAULT_GPU]
    return list(GPUS)


def gpu_capacity(name: str) -> int | None:
    """The GPU's memory in bytes, read from the estimator's GPU table (None if it has no entry)."""
    try:
        from shardlab.estimate.gpus import GPUS
    except ImportError:
        return None
    g = GPUS.get(name)
    if g is None:
        return None
    if isinstance(g, dict):
        for key in ("memory_bytes", "memory", "mem_bytes"):
            if key in g:
                return int(g[key])
        return None
    for attr in ("memory_bytes", "mem_bytes", "memory"):
        if hasattr(g, attr):
            return int(getattr(g, attr))
    return None


def estimate_dict(plan: Plan, model: str, gpu: str) -> dict[str, Any]:
    """estimate(...).to_dict(), or {'error': message} when the plan/model/GPU cannot be estimated."""
    errors = plan.errors()
    if errors:  # as `shardlab estimate` does: an impossible plan has no cost to predict
        return {"error": "no estimate until the plan's errors are fixed (see the messages beside the controls)."}
    try:
        from shardlab.estimate import estimate
    except ImportError:
        return {"error": "the estimator is not installed in this build of shardlab"}
    try:
        spec = resolve_model(model)
        out = estimate(plan, spec, gpu=gpu).to_dict()
    except PlanError as e:
        return {"error": str(e)}
    out["model"].update(source=spec.source, wrap_class=spec.wrap_cls, wrap_units=spec.wrap_unit_count)
    return out


def bar_html(est: dict[str, Any], capacity: int | None, gpu: str) -> str:
    """A stacked bar of per-GPU memory with a capacity mark, and its legend in GiB."""
    if "error" in est:
        return f'<div class="sl-error" style="color:#b00020">✖ {html.escape(est["error"])}</div>'
    per = est.get("per_gpu", {})
    total = int(per.get("total", sum(int(per.get(k, 0)) for k, _ in PARTS)))
    scale = max(total, capacity or 0, 1)
    segs, legend = [], []
    for key, color in PARTS:
        v = int(per.get(key, 0) or 0)
        if v <= 0:
            continue
        segs.append(f'<div title="{key}: {v / GIB:.2f} GiB" style="width:{100 * v / scale:.3f}%;background:{color}"></div>')
        legend.append(f'<span style="white-space:nowrap"><span style="display:inline-block;width:10px;height:10px;background:{color}"></span> '
                      f"{key} {v / GIB:.2f}</span>")
    mark = ""
    if capacity:
        mark = f'<div style="position:absolute;left:{100 * capacity / scale:.3f}%;top:-3px;bottom:-3px;border-left:2px dashed #222"></div>'
        # the estimate's own verdict (shardlab.estimate.allocator.fit), the rule tune prunes by
        fit = est.get("fit") or {"verdict": "fits" if total <= capacity else "does not fit", "why": ""}
        why = html.escape(fit["why"])
        verdict = {"fits": f'<span class="sl-fits" style="color:#1b7f3b" title="{why}">fits: {total / GIB:.2f} of {capacity / GIB:.0f} GiB on {html.escape(gpu)}</span>',
                   "tight": f'<span class="sl-fits sl-tight" style="color:#9a6700" title="{why}">fits, tight: {total / GIB:.2f} of {capacity / GIB:.0f} GiB on '
                            f'{html.escape(gpu)}; within the estimate\'s {fit.get("margin", 0):.0%} error of the limit, a run decides</span>',
                   "does not fit": f'<span class="sl-oom" style="color:#b00020" title="{why}">does not fit: {total / GIB:.2f} GiB needed, {html.escape(gpu)} has {capacity / GIB:.0f} GiB</span>'}[fit["verdict"]]
    else:
        verdict = f"total {total / GIB:.2f} GiB"
    return (
        f'<div class="sl-memory-bar" style="position:relative;display:flex;height:22px;border:1px solid #999;background:#f3f3f3">{"".join(segs)}{mark}</div>'
        f'<div style="font-size:12px;margin-top:4px;display:flex;flex-wrap:wrap;gap:10px">{"".join(legend)} <span>(GiB per GPU)</span></div>'
        f'<div style="margin-top:4px">{verdict}</div>'
    )


def speed_html(est: dict[str, Any]) -> str:
    if "error" in est or est.get("step_time_s") is None:
        return ""
    parts = [f"predicted step time <b>{est['step_time_s'] * 1000:.1f} ms</b>"]
    if est.get("tokens_per_s"):
        parts.append(f"{est['tokens_per_s']:,.0f} tokens/s")
    if est.get("mfu") is not None:
        parts.append(f"MFU {100 * est['mfu']:.0f}%")
    from shardlab_widgets.steptime import step_bar_html

    return f'<div class="sl-speed">{" · ".join(parts)}</div>' + step_bar_html(est) + model_note(est)


class MemoryPanel:
    """Model and GPU selectors, the memory bar and the predicted speed for the plan `plan_getter` returns."""

    def __init__(self, model: str, gpu: str, plan_getter: Callable[[], Plan]):
        self.plan_getter = plan_getter
        gpus = gpu_names()
        self.model = model_input(model, label="model", css_class="sl-model")
        self.gpu = pn.widgets.Select(label="GPU", options=gpus, value=gpu if gpu in gpus else gpus[0], width=180,
                                     description="GPU whose memory the bar is measured against (shardlab.estimate.gpus).", css_classes=["sl-gpu"])
        self.bar = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["sl-memory"])
        self.speed = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["sl-speed-pane"])
        self.last: dict[str, Any] = {}
        self.traced = TracePane(self._trace, lambda: (self.plan_getter(), self.model.value, self.gpu.value))
        for w in (self.model, self.gpu):
            w.param.watch(lambda ev: self.refresh(), "value")
        self.layout = pn.Card(pn.Row(self.model, self.gpu), self.bar, self.traced.layout, self.speed,
                              title="Memory per GPU (estimate)", sizing_mode="stretch_width", css_classes=["sl-memory-card"])

    def _trace(self) -> tuple[dict, dict]:
        """(the traced estimate, the analytical one it is compared with), for the current inputs."""
        return trace_dict(self.plan_getter(), self.model.value, self.gpu.value), self.last

    def refresh(self) -> None:
        est = estimate_dict(self.plan_getter(), self.model.value, self.gpu.value)
        self.last = est
        b, s = bar_html(est, gpu_capacity(self.gpu.value), self.gpu.value), speed_html(est)
        if self.bar.object != b:
            self.bar.object = b
        if self.speed.object != s:
            self.speed.object = s
        self.traced.follow()
