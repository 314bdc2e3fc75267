"""RunLauncher: start a real run of a plan, watch it live, cancel it, see how it ended.

The plan comes from a ConfigBuilder (its current plan when Start is pressed) or a Plan. The run is
`shardlab.launch(...)`; its watcher thread calls `on_event`, which only queues the lines (it must stay
short and thread-safe), and a periodic callback on the UI's own loop drains the queue and the
memory timeline file into two bokeh figures. Until the first step is done the bar moves without a
value (indeterminate) and the status names the start-up phase the worker reported (rendezvous,
building the model, DeepSpeed's ops, ...). Tests and scripts without an event loop call `poll()`.

`launch()` itself runs on a thread of its own: it checks the plan, builds the model on the meta device
to check its block class and prices the run before any process starts, which takes seconds (a first
torch import, more on a loaded machine: on a busy 2-core CI machine the page showed "no run yet" for
over 30 s after Start while it ran on the UI's loop, CI of 2026-12-02). The status says "running ·
checking the plan" the moment Start is pressed; a refusal or any launch error is shown there, never
lost in a server log.
"""

from __future__ import annotations

import collections
import html
import threading
import time
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure

from shardlab.plan import Plan, PlanError, load_plan
from shardlab.run.metrics import clean_sample
from shardlab.run.store import default_runs_dir  # noqa: F401  (kept importable from here)
from shardlab.units import MIB
from shardlab_widgets.modelpick import model_input

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")


class RunLauncher(pn.viewable.Viewer):
    """Model preset, steps, processes and device; start, cancel, a progress bar, live memory and throughput."""

    def __init__(self, plan: Any = None, *, model: str = "gpt-tiny", steps: int = 20, nproc: int = 2,
                 device: str = "cpu", out: str | None = None, **params):
        super().__init__(**params)
        self.source = plan  # a ConfigBuilder (read at Start), a Plan, or anything load_plan takes
        self.out = out or default_runs_dir()
        self.run = None
        self._queue: collections.deque = collections.deque()
        self._timeline_tail = None
        self._t0: float | None = None
        self._callback = None
        self._phase: str | None = None
        self._launching: threading.Thread | None = None

        self.model = model_input(model, label="model", css_class="sl-run-model", width=240)
        self.steps = pn.widgets.IntInput(label="steps", value=steps, start=1, width=100, css_classes=["sl-run-steps"])
        self.nproc = pn.widgets.IntInput(label="processes", value=nproc, start=1, width=100, css_classes=["sl-run-nproc"],
                                         description="Processes per node (GPUs, or CPU processes on a CPU run).")
        self.device = pn.widgets.Select(label="device", options=["cpu", "cuda"], value=device, width=100, css_classes=["sl-run-device"])
        self.start_button = pn.widgets.Button(label="Start run", color="primary", width=110, css_classes=["sl-run-start"])
        self.cancel_button = pn.widgets.Button(label="Cancel", color="danger", width=90, disabled=True, css_classes=["sl-run-cancel"])
        self.progress = pn.indicators.Progress(value=0, max=steps, width=300, css_classes=["sl-run-progress"])
        self.status = pn.pane.HTML("no run yet", css_classes=["sl-run-status"], sizing_mode="stretch_width")
        self.start_button.on_click(lambda ev: self.start())
        self.cancel_button.on_click(lambda ev: self.cancel())

        self.memory_source = ColumnDataSource(dict(seconds=[], mib=[], color=[], rank=[]))
        self.speed_source = ColumnDataSource(dict(step=[], tokens_per_s=[]))
        mem = figure(height=240, sizing_mode="stretch_width", title="Memory per rank (sampled)",
                     x_axis_label="seconds since start", y_axis_label="MiB (2^20 bytes)", tools="pan,wheel_zoom,reset,hover")
        mem.scatter("seconds", "mib", color="color", source=self.memory_source, size=3, legend_field="rank")
        mem.legend.location = "bottom_right"
        speed = figure(height=240, sizing_mode="stretch_width", title="Throughput (rank 0)",
                       x_axis_label="step", y_axis_label="tokens/s per process", tools="pan,wheel_zoom,reset,hover")
        speed.line("step", "tokens_per_s", source=self.speed_source, line_width=2)
        speed.scatter("step", "tokens_per_s", source=self.speed_source, size=5)
        self.memory_plot = pn.pane.Bokeh(mem, sizing_mode="stretch_width", css_classes=["sl-run-timeline"])
        self.speed_plot = pn.pane.Bokeh(speed, sizing_mode="stretch_width", css_classes=["sl-run-speed"])
        self._layout = pn.Column(
            pn.pane.Markdown("## Run it", margin=(0, 10)),
            pn.Row(self.model, self.steps, self.nproc, self.device, self.start_button, self.cancel_button),
            pn.Row(self.progress, self.status, sizing_mode="stretch_width"),
            pn.Row(self.memory_plot, self.speed_plot, sizing_mode="stretch_width"),
            sizing_mode="stretch_width", css_classes=["sl-launcher"],
        )

    def __panel__(self):
        return self._layout

    # -------------------------------------------------------------------------------------------

    def plan(self) -> Plan:
        src = self.source
        if src is None:
            return Plan()
        if hasattr(src, "plan") and isinstance(src.plan, Plan):
            return src.plan
        return load_plan(src, check=False)

    @property
    def launching(self) -> bool:
        """True while launch() is still checking the plan and starting the processes."""
        return self._launching is not None and self._launching.is_alive()

    def start(self) -> None:
        """Launch the run on a background thread and return at once; `run` is set when it has started
        (a refused plan or setting, or any other launch error, is shown in the status and no run starts)."""
        from shardlab.run.launcher import launch

        if self.launching or (self.run is not None and not self.run.done):
            return
        self._reset()
        self.run = None
        for name, widget in (("steps", self.steps), ("processes", self.nproc)):
            if not isinstance(widget.value, int) or widget.value < 1:
                self._show_status("refused", f"{name}={widget.value!r}: give a whole number of at least 1.")
                return
        kw = dict(model=self.model.value, steps=int(self.steps.value), nproc=int(self.nproc.value), device=self.device.value,
                  out=self.out, on_event=self._queue.append)
        try:
            plan = self.plan()
        except PlanError as e:
            self._show_status("refused", str(e))
            return
        except Exception as e:  # noqa: BLE001 - shown in the status line, never lost in the server's log
            self._show_status("refused", f"{type(e).__name__}: {e}")
            return

        def work():
            # First let the server send "running" to the page: launch()'s first `import torch` in this process
            # holds the GIL through loading torch's libraries (seconds; far longer on a loaded machine), and the
            # event loop cannot write the status while it does.
            time.sleep(0.3)
            try:
                self._queue.append({"type": "launched", "run": launch(plan, **kw)})
            except PlanError as e:
                self._queue.append({"type": "refused", "error": str(e)})
            except Exception as e:  # noqa: BLE001 - shown in the status line, never lost on the thread
                self._queue.append({"type": "refused", "error": f"{type(e).__name__}: {e}"})

        self.progress.param.update(max=int(self.steps.value), value=-1, bar_color="primary")  # -1: indeterminate
        self._phase = "checking the plan"
        self.start_button.disabled, self.cancel_button.disabled = True, False
        self._show_status("running", None)
        self._launching = threading.Thread(target=work, name="shardlab-launch", daemon=True)
        self._launching.start()
        self._start_polling()

    def cancel(self) -> None:
        """Cancel the run; one still being launched is waited for (seconds) and then cancelled."""
        if self._launching is not None:
            self._launching.join()
            self.poll()
        if self.run is not None:
            self.run.cancel()
            self.poll()

    def wait(self, timeout: float | None = None, every: float = 0.3) -> str | None:
        """Block until the run ends, updating the display as it goes (for scripts and tests)."""
        end = None if timeout is None else time.monotonic() + timeout
        if self._launching is not None:
            self._launching.join(timeout)
            self.poll()
        if self.run is None:
            return None
        while not self.run.done and (end is None or time.monotonic() < end):
            self.poll()
            time.sleep(every)
        self.run.wait(timeout=5)
        self.poll()
        return self.run.status

    # -------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._queue.clear()
        self._t0 = None
        self._phase = None
        # A Bokeh source may change only while the server holds the page's document lock. Panel runs a click that
        # arrives while a debounced field change is still pending outside that lock: writing the sources here then
        # raised Bokeh's "_pending_writes should be non-None" and the run never started (the served-app browser test
        # on a loaded machine, session 18: "no run yet" 90 s after Start). pn.state.execute schedules the write on the
        # server's next tick, under the lock; in a notebook or a script it runs now.
        pn.state.execute(self._clear_figures, schedule=True)

    def _clear_figures(self) -> None:
        self.memory_source.data = dict(seconds=[], mib=[], color=[], rank=[])
        self.speed_source.data = dict(step=[], tokens_per_s=[])

    def _start_polling(self) -> None:
        try:
            self._callback = pn.state.add_periodic_callback(self.poll, period=300, start=True)
        except Exception:  # no event loop (plain script): poll()/wait() do the work instead
            self._callback = None

    def poll(self) -> None:
        """Move what the run wrote since the last call into the figures, progress bar and status."""
        self._take_launch()
        run = self.run
        if run is None:
            return
        steps, speeds = [], []
        final = None
        while self._queue:
            item = self._queue.popleft()
            if item.get("type") == "metrics" and item.get("rank") == 0 and item.get("tokens_per_s") is not None:
                steps.append(item.get("step", len(self.speed_source.data["step"]) + len(steps)))
                speeds.append(float(item["tokens_per_s"]))
            elif item.get("type") == "event" and item.get("event") == "phase" and item.get("rank", 0) == 0:
                self._phase = item.get("what") or self._phase
            elif item.get("type") == "status":
                final = item.get("status")
        if steps:
            self.speed_source.stream(dict(step=steps, tokens_per_s=speeds))
        lines = [x for x in map(clean_sample, self._timeline_tail.new()) if x] if self._timeline_tail else []
        if lines:
            if self._t0 is None:
                self._t0 = min(float(x["t"]) for x in lines)
            ranks = [int(x.get("rank", 0)) for x in lines]
            self.memory_source.stream(dict(seconds=[float(x["t"]) - self._t0 for x in lines],
                                           mib=[float(x["bytes"]) / MIB for x in lines],
                                           color=[PALETTE[r % len(PALETTE)] for r in ranks],
                                           rank=[f"rank {r}" for r in ranks]))
        done = getattr(run, "steps_done", None)
        if done:
            self._phase = None
            self.progress.value = min(int(done), self.progress.max)
        status = final or run.status
        if status != "running":
            self._finished(status)
        else:
            self._show_status("running", None)

    def _take_launch(self) -> None:
        """Once the launch thread has ended: the run it started (its events may be queued ahead of it),
        or its refusal shown with the buttons back as they were."""
        from shardlab.run.store import JsonlTail

        if self._launching is None or self._launching.is_alive():
            return
        self._launching = None
        item = next((x for x in list(self._queue) if x.get("type") in ("launched", "refused")), None)
        if item is None:
            return
        self._queue.remove(item)
        if item["type"] == "launched":
            self.run = item["run"]
            self._timeline_tail = JsonlTail(self.run.files.timeline)
            self._phase = f"starting {self.run.world_size} processes"
            return
        self._stop_polling()
        self.progress.param.update(value=0, bar_color="danger")
        self.start_button.disabled, self.cancel_button.disabled = False, True
        self._show_status("refused", item["error"])

    def _stop_polling(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    def _finished(self, status: str) -> None:
        self._stop_polling()
        info = self.run.info
        error = info.get("error")
        if status == "completed":
            self.progress.param.update(value=self.progress.max, bar_color="success")
        else:
            self.progress.param.update(value=max(int(self.progress.value), 0), bar_color="danger")
        self.start_button.disabled, self.cancel_button.disabled = False, True
        self._show_status(status, error)

    def _show_status(self, status: str, error: str | None) -> None:
        colour = {"completed": "#1b7f3b", "running": "#333"}.get(status, "#b00020")
        where = f" · {html.escape(str(self.run.dir))}" if self.run is not None else ""
        step = max(int(self.progress.value), 0)
        done = f" · step {step}/{self.progress.max}" if self.run is not None else ""
        if self.run is not None:
            done += f" · world size {self.run.world_size} on {html.escape(str(self.run.info.get('device')))}"
        if status == "running" and self._phase:
            done = f' · <span class="sl-run-phase">{html.escape(self._phase)}</span>' + done
        text = f'<b class="sl-status-{status}" style="color:{colour}">{status}</b>{done}{where}'
        if error:
            text += f'<pre class="sl-run-error" style="color:#b00020;white-space:pre-wrap">{html.escape(str(error))}</pre>'
        if self.status.object != text:
            self.status.object = text
