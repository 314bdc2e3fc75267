"""The run store: one folder per run under `runs/<id>/`, readable back as DataFrames after a restart.

`Run` (one folder), `load_run` and `list_runs` are the one reader of run folders: compare, plots,
report, the widgets and the lab helpers all read through them; the file names and formats are in
files.py and the metrics schema in metrics.py. Ids sort by start time: `YYYYmmdd-HHMMSS-<6 hex>` (UTC).

No run folder can break a reader: a folder whose status.json or plan.yaml is missing, unreadable,
not UTF-8 or of the wrong shape has the status `unreadable` and says why in `problem`; its other
files still read as far as they can. A run whose status.json says running while the process that
launched it is gone (killed, terminal closed) has the status `orphaned`.
"""

from __future__ import annotations

import copy
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shardlab.run import liveness
from shardlab.run.files import (  # noqa: F401  (re-exported: the store's file API)
    JsonlTail,
    RunFiles,
    append_jsonl,
    is_run_folder,
    parse_lines,
    read_json,
    read_json_checked,
    read_jsonl,
    read_text,
    read_text_checked,
    write_json_atomic,
)
from shardlab.run.metrics import clean_event, clean_lines, clean_sample

RUNS_DIR_ENV = "SHARDLAB_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"
STATUSES = ("running", "completed", "failed", "oom", "cancelled", "timeout")
READ_STATUSES = ("orphaned", "unreadable")  # what a reader can find besides what the launcher writes
FINAL = frozenset(STATUSES + READ_STATUSES) - {"running"}


def default_runs_dir() -> str:
    """The run store: $SHARDLAB_RUNS_DIR if set (the served app, the labs and the tests set it), else ./runs."""
    return os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR


def new_run_id(now: float | None = None) -> str:
    """A time-sortable id with a short random suffix, so runs started in the same second do not collide."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def ensure_store(out: str | Path | None = None, field: str = "out") -> Path:
    """The run store folder `out` (default: default_runs_dir()), created if missing. PlanError naming `field` when it
    cannot be a folder: a file in its place, or no permission (`shardlab app --runs FILE` served, and each Start failed)."""
    root = Path(out if out is not None else default_runs_dir())
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from shardlab.plan import bad_input

        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or str(e)
        raise bad_input(field, f"{field}={str(root)!r}: the run store must be a folder shardlab can write ({why}). "
                               "Give another folder (out=... / --out / --runs), or set SHARDLAB_RUNS_DIR.") from None
    return root


def create_run_dir(out: str | Path | None = None) -> tuple[str, Path]:
    """A fresh, empty run folder under `out` (default: the run store; created if missing).
    PlanError (field out) when the store cannot be a folder: a file in its place, or no permission."""
    root = ensure_store(out)
    while True:
        rid = new_run_id()
        d = root / rid
        try:
            d.mkdir()
        except FileExistsError:
            continue
        RunFiles(d).logs.mkdir()
        return rid, d


def _frame(rows: list[dict], columns: list[str] | None = None):
    import pandas as pd

    return pd.json_normalize(rows) if rows else pd.DataFrame(columns=columns)


class Run:
    """A run folder, read on demand: `status`, `metrics`, `timeline`, `events` always show the files' state.

    `frozen()` gives a copy that reads each file once (what compare and report use for a consistent
    picture of a finished run). A Run from `load_run` can still `wait()` for (and `cancel()`) a run
    another process launched: the launcher records its processes' ids in status.json. `launch()`
    returns a LiveRun (launcher.py) that also owns the processes and streams events.
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.id = self.dir.name
        self.files = RunFiles(self.dir)
        self.label = ""  # a short name among other runs (compare.load_runs sets it)
        self._cache: dict | None = None
        self._written: dict = {}
        self._world_size: int | None = None

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.status} {self.dir}>"

    def frozen(self) -> "Run":
        """This run read once: later changes to its files are not seen."""
        r = copy.copy(self)
        r._cache, r._written = {}, {}
        return r

    def _once(self, key: str, read, written_once: bool = False):
        """read(), from the cache of a frozen Run; the files written once before a run starts (plan,
        run.json, launch.json) are cached by every Run as soon as they read well."""
        cache = self._cache if self._cache is not None else self._written if written_once else None
        if cache is None:
            return read()
        if key not in cache:
            value = read()
            if cache is self._written and (value == {} or (isinstance(value, tuple) and value[0] is None)):
                return value  # not there (yet: a run folder being created): look again next time
            cache[key] = value
        return cache[key]

    # ---- the files
    def _status_file(self) -> tuple[dict, str | None]:
        return self._once("status", lambda: read_json_checked(self.files.status))

    @property
    def info(self) -> dict:
        """status.json as a dict ({} if it is missing or unreadable: see `problem`)."""
        return self._status_file()[0] or {}

    @property
    def problem(self) -> str | None:
        """Why this folder cannot be read as a run (status.json or plan.yaml broken), None if it can.
        Uses `info`, so a subclass that knows the status otherwise (LiveRun) is judged by that."""
        info = self.info
        if not info:
            return self._status_file()[1] or "status.json is empty"
        if info.get("status") not in STATUSES:
            return f"status.json has status={str(info.get('status'))[:40]!r}, not one of {', '.join(STATUSES)}"
        return self._plan()[1] if self._status_file()[0] is not None else None

    @property
    def status(self) -> str:
        """One of STATUSES, or `unreadable` (see `problem`), or `orphaned` (running, launcher gone)."""
        if self.problem is not None:
            return "unreadable"
        info = self.info
        if info["status"] == "running" and liveness.launcher_gone(info, self._first_events()):
            return "orphaned"
        return info["status"]

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def _plan(self):
        def read():
            from shardlab.plan import PlanError, load_plan

            text, why = read_text_checked(self.files.plan)
            if why:
                return None, why
            try:  # the trailing newline makes load_plan read it as YAML text, never as a file name
                return load_plan(text + "\n", check=False), None
            except (PlanError, ValueError, TypeError, RecursionError) as e:
                first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                return None, f"plan.yaml cannot be read as a plan ({first})"
        return self._once("plan", read, written_once=True)

    @property
    def plan(self):
        """The Plan as it ran, or None where plan.yaml is missing or unreadable (see `problem`)."""
        return self._plan()[0]

    @property
    def config(self) -> dict:
        """run.json: model, steps, device, seed, factory, trace_memory, instrument ({} if unreadable)."""
        return self._once("config", lambda: read_json_checked(self.files.config)[0] or {}, written_once=True)

    @property
    def launch_info(self) -> dict:
        """launch.json: the agents' argv and recorded environment ({} if unreadable)."""
        return self._once("launch", lambda: read_json_checked(self.files.launch)[0] or {}, written_once=True)

    @property
    def metrics(self):
        """metrics.jsonl as a DataFrame, one row per step per rank (lines checked by the metrics
        schema); nested dicts become dotted columns (state_bytes.params, comm_bytes.all_gather, ...)."""
        return self._once("metrics", lambda: _frame(clean_lines(read_jsonl(self.files.metrics)), ["step", "rank", "loss"]))

    @property
    def timeline(self):
        """timeline.jsonl as a DataFrame: t (time.time(), the metrics' clock), rank, gpu, source, bytes,
        plus the step and phase (setup, forward, backward, optimizer, other) each sample fell in."""
        from shardlab.run.timeline import label_phases

        def read():
            rows = [s for s in (clean_sample(x) for x in read_jsonl(self.files.timeline)) if s is not None]
            return label_phases(_frame(rows, ["t", "rank", "gpu", "source", "bytes"]), self.metrics)
        return self._once("timeline", read)

    def _event_lines(self) -> list[dict]:
        return self._once("events", lambda: [e for e in map(clean_event, read_jsonl(self.files.events)) if e])

    def _first_events(self) -> list[dict]:
        return self._event_lines()[:64]

    @property
    def events(self):
        return _frame(self._event_lines())

    def log(self, rank: int = 0, stream: str = "stderr") -> str:
        """A rank's captured stdout or stderr ('' if there is none yet)."""
        return read_text(self.files.rank_log(rank, stream))

    # ---- what the files say about the run, for readers
    def step_periods(self, warmup: int = 0):
        """One row per step after `warmup`: step, tokens (per rank), period_s and instrumented.

        A step's period runs from its start to the next step's start, so work done after the step's
        clock stops (writing the metrics line) still counts; the slowest rank sets it, and the last
        step has none. `instrumented` comes from each line of an alternating run, else from run.json.
        """
        m = self.metrics
        if m.empty or not {"t_start", "tokens"} <= set(m.columns):
            import pandas as pd

            return pd.DataFrame(columns=["step", "tokens", "period_s", "instrumented"])
        m = m.sort_values(["rank", "step"])
        m = m.assign(period_s=m.groupby("rank")["t_start"].shift(-1) - m["t_start"])
        if "instrumented" not in m:
            m = m.assign(instrumented=bool(self.config.get("instrument", True)))
        steps = m.groupby("step").agg(tokens=("tokens", "first"), period_s=("period_s", "max"),
                                      instrumented=("instrumented", "first")).reset_index()
        return steps[(steps["step"] > warmup) & steps["period_s"].notna()].reset_index(drop=True)

    @property
    def device(self) -> str:
        d = self.config.get("device") or self.info.get("device")
        return d if d in ("cpu", "cuda") else "cpu"

    @property
    def prediction(self) -> dict | None:
        """prediction.json: what the estimator predicted for this run at launch (run/prediction.py), or
        None (also where the file is unreadable)."""
        return self._once("prediction", lambda: read_json_checked(self.files.prediction)[0], written_once=True)

    @property
    def world_size(self) -> int | None:
        """Ranks that really ran: as the launcher set it, else from the metrics, the plan, status.json."""
        if self._world_size is not None:
            return self._world_size
        m = self.metrics
        if "world_size" in m and m["world_size"].notna().any():
            return int(m["world_size"].max())
        if self.plan is not None:
            return self.plan.world_size
        ws = self.info.get("world_size")
        return ws if isinstance(ws, int) and not isinstance(ws, bool) else None

    @world_size.setter
    def world_size(self, value: int) -> None:
        self._world_size = value

    @property
    def gpu(self) -> str | None:
        """The GPU-table name of the run's GPU where the folder records one (run.json or a start event)."""
        if isinstance(self.config.get("gpu"), str):
            return self.config["gpu"]
        for e in self._first_events():
            if e.get("event") == "start" and isinstance(e.get("gpu"), str):
                return e["gpu"]
        return None

    @property
    def model(self):
        """The ModelSpec the run trained (None for a factory model or an unreadable run.json)."""
        def read():
            from shardlab.models import resolve_model

            m = self.config.get("model")
            try:
                return resolve_model(m) if isinstance(m, (str, dict)) else None
            except (ValueError, TypeError, KeyError):  # PlanError is a ValueError
                return None
        return self._once("model", read)

    # ---- control for runs launched elsewhere
    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the run ends (a final status, or orphaned / unreadable) or `timeout` seconds
        pass; return the status."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if end is not None and time.monotonic() >= end:
                break
            time.sleep(poll)
        return self.status

    def cancel(self) -> None:
        """Mark the run cancelled, then stop the processes recorded in status.json and their children
        (faults.terminate: SIGTERM, then SIGKILL after 2 s). The launching process, if it is still there, sees the mark and ends the
        run itself, writing the final status."""
        info = self.info
        if not info or info.get("status") in FINAL:
            return
        from shardlab.run import faults

        procs = faults.own_processes([], None, info.get("processes") or [])
        try:  # the request the launcher cannot overwrite (status.json below is rewritten by it)
            self.files.cancel.touch()
        except OSError:
            pass  # a read-only folder: status.json's mark below is what is left
        info.update(status="cancelled", ended_at=time.time())
        write_json_atomic(self.files.status, info)
        faults.terminate(procs)


def load_run(run_dir: Any) -> Run:
    """A Run for an existing run folder (also a Run, or anything with `.dir`); PlanError if the path
    is not a directory or holds none of a run folder's files. A broken run folder still loads: its
    `status` says `unreadable` and `problem` says why."""
    if isinstance(run_dir, Run):
        return run_dir
    d = Path(getattr(run_dir, "dir", run_dir))
    from shardlab.plan import bad_input

    hint = "Give the folder of a run (e.g. runs/<id>, as listed by `shardlab runs`)."
    if not d.is_dir():
        raise bad_input("run_dir", f"run_dir={str(d)!r} is not a directory. {hint}")
    if not is_run_folder(d):
        raise bad_input("run_dir", f"run_dir={str(d)!r} is not a run folder (no plan.yaml, status.json, run.json "
                                   f"or metrics.jsonl in it). {hint}")
    return Run(d)


# The store's listing (list_runs, runs_in) is in listing.py; imported last, as it builds on Run.
from shardlab.run.listing import LIST_COLUMNS, list_runs, runs_in  # noqa: E402,F401
