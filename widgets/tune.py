"""TuneRunner: `shardlab tune` in a notebook or the app's Tune tab, with progress and cancel.

The search runs on a background thread (`shardlab.tune.tune`); its events (each trial's start and end,
and the runner's lines) are only queued there, and a periodic callback on the UI's loop (or `poll()`
in scripts and tests) moves them into the progress bar, the trial table (predicted vs measured for each
trial) and, when the search ends, the ranked table and the Pareto plot. Cancel sets the tune's cancel
event: the trial running is cancelled as the Run tab's Cancel does (every process ended) and the
search stops.
"""

from __future__ import annotations

import collections
import html
import threading
import time

import pandas as pd
import panel as pn

from shardlab.plan import PlanError
from shardlab.run.store import default_runs_dir
from shardlab.tune.search import GOALS
from shardlab.tune.space import FRAMEWORKS
from shardlab_widgets.modelpick import model_input

TRIAL_COLUMNS = ["trial", "candidate", "status", "predicted tokens/s", "measured tokens/s", "measured / predicted", "why"]


class TuneRunner(pn.viewable.Viewer):
    """Model, GPUs, goal, budget, frameworks, device; Start / Cancel; trials as they run; the result."""

    def __init__(self, *, model: str = "gpt-tiny", budget: str = "3", device: str = "cpu", gpus: int = 1,
                 out: str | None = None, space=None, steps: int = 6, warmup: int = 2, **params):
        super().__init__(**params)
        self.out = out or default_runs_dir()
        self.space, self.steps_per_trial, self.warmup = space, steps, warmup
        self.result = None
        self.error: str | None = None
        self._queue: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._callback = None
        self._trials: dict[int, dict] = {}
        self.model = model_input(model, label="model", css_class="sl-tune-model", width=220)
        self.gpus = pn.widgets.IntInput(label="GPUs (processes)", value=gpus, start=1, width=120, css_classes=["sl-tune-gpus"])
        self.goal = pn.widgets.Select(label="goal", options=list(GOALS), value="fastest", width=140, css_classes=["sl-tune-goal"])
        self.budget = pn.widgets.TextInput(label="budget (runs, or e.g. 5m)", value=str(budget), width=160, css_classes=["sl-tune-budget"])
        self.frameworks = pn.widgets.MultiChoice(label="frameworks", options=list(FRAMEWORKS), value=list(FRAMEWORKS), width=300,
                                                 css_classes=["sl-tune-frameworks"])
        self.device = pn.widgets.Select(label="device", options=["cpu", "cuda"], value=device, width=90, css_classes=["sl-tune-device"])
        self.dry_run = pn.widgets.Checkbox(label="estimate only (dry run)", value=False, css_classes=["sl-tune-dry"])
        self.start_button = pn.widgets.Button(label="Start tune", color="primary", width=110, css_classes=["sl-tune-start"])
        self.cancel_button = pn.widgets.Button(label="Cancel", color="danger", width=90, disabled=True, css_classes=["sl-tune-cancel"])
        self.progress = pn.indicators.Progress(value=0, max=1, width=300, css_classes=["sl-tune-progress"])
        self.status = pn.pane.HTML("no tune yet", css_classes=["sl-tune-status"], sizing_mode="stretch_width")
        self.trials = pn.pane.DataFrame(pd.DataFrame(columns=TRIAL_COLUMNS), index=False, css_classes=["sl-tune-trials"],
                                        sizing_mode="stretch_width")
        self.table = pn.pane.DataFrame(pd.DataFrame(), index=False, max_rows=25, css_classes=["sl-tune-table"], sizing_mode="stretch_width")
        self.plot = pn.Column(css_classes=["sl-tune-pareto"], sizing_mode="stretch_width")
        self.start_button.on_click(lambda ev: self.start())
        self.cancel_button.on_click(lambda ev: self.cancel())
        self._layout = pn.Column(
            pn.pane.Markdown("## Tune: search plans, pruned by the estimates, confirmed by short real runs", margin=(0, 10)),
            pn.Row(self.model, self.gpus, self.goal, self.budget, self.device),
            pn.Row(self.frameworks, self.dry_run, self.start_button, self.cancel_button),
            pn.Row(self.progress, self.status, sizing_mode="stretch_width"),
            pn.pane.Markdown("**Trials** (tokens/s per GPU: predicted by the estimate, measured by the run)", margin=(0, 10)),
            self.trials, self.plot, self.table, sizing_mode="stretch_width", css_classes=["sl-tune"])

    def __panel__(self):
        return self._layout

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the search on a background thread (a refused setting is shown, nothing starts)."""
        from shardlab.tune import tune
        from shardlab.tune.search import Budget

        if self.running:
            return
        try:
            budget = Budget.parse(self.budget.value)
        except PlanError as e:
            self._show("refused", str(e))
            return
        self.result, self.error, self._trials = None, None, {}
        self._queue.clear()
        self._cancel = threading.Event()
        space = None
        if self.space is not None:
            from dataclasses import replace

            space = replace(self.space)
        kw = dict(gpus=int(self.gpus.value), goal=self.goal.value, budget=budget, frameworks=list(self.frameworks.value),
                  dry_run=self.dry_run.value, out=self.out, device=self.device.value, space=space, steps=self.steps_per_trial,
                  warmup=self.warmup, on_event=self._queue.append, cancel=self._cancel)
        if self.dry_run.value and self.device.value == "cpu":
            kw["gpu"] = None
        model = self.model.value
        self.progress.param.update(max=max(1, budget.runs or 1), value=0 if budget.runs else -1, bar_color="primary")

        def work():
            try:
                self._queue.append({"type": "result", "result": tune(model, **kw)})
            except Exception as e:  # noqa: BLE001 - shown in the status line, never lost on the thread
                self._queue.append({"type": "failed", "error": str(e) if isinstance(e, PlanError) else f"{type(e).__name__}: {e}"})

        self._thread = threading.Thread(target=work, name="shardlab-tune", daemon=True)
        self._thread.start()
        self.start_button.disabled, self.cancel_button.disabled = True, False
        self._show("running", None)
        try:
            self._callback = pn.state.add_periodic_callback(self.poll, period=400, start=True)
        except Exception:  # no event loop: poll() / wait() do the work
            self._callback = None

    def cancel(self) -> None:
        self._cancel.set()
        self.poll()

    def wait(self, timeout: float | None = None, every: float = 0.3):
        """Block until the search ends, updating the display (for scripts and tests); the TuneResult."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.running and (end is None or time.monotonic() < end):
            self.poll()
            time.sleep(every)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        return self.result

    def poll(self) -> None:
        """Move queued events into the display."""
        changed = False
        while self._queue:
            ev = self._queue.popleft()
            kind = ev.get("type")
            if kind == "trial":
                self._trials[ev["trial"]] = ev
                changed = True
                done = sum(1 for t in self._trials.values() if t["status"] != "running")
                self.progress.value = min(done, self.progress.max)
                self._show("running", None, f"trial {ev['trial']}: {ev['key']} {ev['status']}")
            elif kind == "event" and ev.get("event") == "phase":
                self._show("running", None, ev.get("what"))
            elif kind == "result":
                self._done(ev["result"])
            elif kind == "failed":
                self.error = ev["error"]
                self._end()
                self._show("refused", self.error)
        if changed:
            self.trials.object = self.trial_frame()

    def trial_frame(self) -> pd.DataFrame:
        rows = []
        for n, t in sorted(self._trials.items()):
            p, m = t.get("predicted", {}).get("tokens_per_s"), (t.get("measured") or {}).get("tokens_per_s")
            rows.append([n, t["key"], t["status"] + (" (re-measure)" if t.get("remeasure") else ""), round(p) if p else None, round(m) if m else None,
                         round(m / p, 3) if p and m else None, t.get("reason") or ""])
        return pd.DataFrame(rows, columns=TRIAL_COLUMNS)

    def _end(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        self.start_button.disabled, self.cancel_button.disabled = False, True

    def _done(self, result) -> None:
        from shardlab import plots as P
        from shardlab.tune.result import STOP_WHY

        self.result = result
        self._end()
        t = result.table()
        self.table.object = t[["rank", "key", "status", "group", "predicted_tokens_per_s", "measured_tokens_per_s",
                               "measured_tokens_per_s_lo", "measured_tokens_per_s_hi", "reason"]]
        self.plot.objects = [pn.pane.HoloViews(P.tune_pareto(result.pareto()), backend="bokeh", sizing_mode="stretch_width")]
        self.progress.param.update(value=self.progress.max, bar_color="success" if result.pick else "danger")
        pick = f"pick: {result.pick.key}" if result.pick else "no pick"
        apart = [c.key for c in result.not_told_apart]
        pick += f" (not told apart from {', '.join(apart)}: their measured ranges overlap)" if apart else ""
        status = "cancelled" if result.stop == "cancelled" else "completed"
        self._show(status, None, f"{pick} · stopped: {STOP_WHY.get(result.stop, result.stop)} · {result.wall_s:.1f} s")

    def _show(self, status: str, error: str | None, what: str | None = None) -> None:
        colour = {"completed": "#1b7f3b", "running": "#333"}.get(status, "#b00020")
        text = f'<b class="sl-tune-status-{status}" style="color:{colour}">{status}</b>'
        if what:
            text += f" · {html.escape(str(what))}"
        if error:
            text += f'<pre class="sl-tune-error" style="color:#b00020;white-space:pre-wrap">{html.escape(error)}</pre>'
        self.status.object = text
