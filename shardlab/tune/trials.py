"""One tune trial = one ordinary run through the runner (`shardlab.launch`), tagged and measured.

The run lands in the run store like any other (`shardlab runs` lists it, `shardlab report` reads
it); a `tune.json` beside its plan says which tune it belongs to and which candidate it was. What a
trial measures: tokens/s per GPU as the median step period after `warmup` steps (the slowest rank
sets each period: Run.step_periods) with its interquartile interval, and the peak allocated / reserved bytes rank 0's worker recorded
(a GPU run; a CPU run records none). How many steps: `steps` when given, else `warmup` + enough to time
window.WINDOW_S seconds at the candidate's step time as the search expects it (its prediction rescaled
by the trials so far: search._step_hint; window.trial_steps).
"""

from __future__ import annotations

import threading
from pathlib import Path

from shardlab.run.files import write_json_atomic

from .space import Candidate
from .window import WINDOW_S, spread, trial_steps

TAG_FILE = "tune.json"


def measure(run, warmup: int) -> dict:
    """tokens/s per GPU at the median step period after `warmup` steps, its interquartile interval
    (window.spread), the per-step periods, and the peak bytes."""
    out: dict = {}
    periods = run.step_periods(warmup=warmup)
    if periods.empty:
        periods = run.step_periods(warmup=0)
    if not periods.empty:
        out.update(spread(list(periods["period_s"]), float(periods["tokens"].median())))
        out["step_times_s"] = [round(float(x), 6) for x in periods["period_s"]]
    m = run.metrics
    for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
        if not m.empty and key in m and m[key].notna().any():
            out[key] = int(m[key].max())
    return out


def tag(run_dir, tune_id: str, c: Candidate) -> None:
    write_json_atomic(Path(run_dir) / TAG_FILE, {"tune_id": tune_id, "trial": c.trial, "candidate": c.key,
                                                 "predicted": c.predicted})


class TrialRunner:
    """Runs candidates through `shardlab.launch` one at a time. Setting `cancel` (a threading.Event)
    stops the current run within a fraction of a second (LiveRun.cancel: every process ended) and
    makes the search stop."""

    def __init__(self, model, *, device: str, nproc: int, steps: int | None, warmup: int, out=None, tune_id: str,
                 timeout_s: float = 300, on_event=None, cancel: threading.Event | None = None, launch_kw: dict | None = None,
                 window_s: float = WINDOW_S):
        self.model, self.device, self.nproc, self.window_s = model, device, nproc, window_s
        self.steps, self.warmup, self.out, self.tune_id = steps, warmup, out, tune_id
        self.timeout_s, self.on_event = timeout_s, on_event
        self.current = None
        self._cancel = cancel or threading.Event()
        self.launch_kw = dict(launch_kw or {})  # more launch() arguments (benchmarks: worker_module)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def __call__(self, c: Candidate) -> None:
        from shardlab.run.launcher import launch

        if self.cancelled:
            c.status, c.reason = "cancelled", "the tune was cancelled before this trial started"
            return
        hint = c.step_time_hint_s or c.predicted.get("step_time_s")
        steps = self.steps or trial_steps(hint, self.warmup, self.window_s, self.device)
        run = launch(c.plan, model=self.model, steps=steps, nproc=self.nproc, device=self.device, out=self.out,
                     timeout_s=self.timeout_s, on_event=self.on_event, **self.launch_kw)
        self.current = run
        c.run_id, c.run_dir = run.id, str(run.dir)
        tag(run.dir, self.tune_id, c)
        while not run.done:
            run.wait(timeout=0.2)
            if self.cancelled:
                run.cancel()
        status = run.wait()
        self.current = None
        c.status = status
        if status == "completed":
            c.measured = measure(run, self.warmup)
            if not c.measured.get("tokens_per_s"):
                c.status, c.reason = "failed", "completed without a timed step"
        else:
            c.measured = measure(run, self.warmup) if status != "cancelled" else {}
            c.reason = (run.info or {}).get("error") or status
            c.reason = str(c.reason)[:500]


__all__ = ["TrialRunner", "measure", "tag", "TAG_FILE"]
