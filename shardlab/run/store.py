"""The run store: one folder per run under `runs/<id>/`, readable back as DataFrames after a restart.

A run folder holds
  plan.yaml        the Plan as it ran (topology adjusted to the process count actually started)
  run.json         what the worker reads besides the plan (model, steps, device, seed, ...)
  launch.json      the exact argv of every torchrun agent and the environment variables that matter
  status.json      running | completed | failed | oom | cancelled | timeout, exit codes, failing rank,
                   its last error lines, timings; rewritten atomically (tmp + rename)
  metrics.jsonl    one line per step per rank (written by the worker)
  events.jsonl     start / oom / error / done per rank (worker), launch / end (launcher)
  timeline.jsonl   memory sampled by the launcher (see timeline.py)
  logs/            agent{n}.log (each torchrun agent's own output), node{n}/ (torchrun's per-rank
                   stdout.log / stderr.log tree) and rank{r}.stdout.log / rank{r}.stderr.log links to it

Every .jsonl file is append-only and flushed line by line, so a crash loses nothing written before it;
readers skip a torn last line. Ids sort by start time: `YYYYmmdd-HHMMSS-<6 hex>` (UTC).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

STATUSES = ("running", "completed", "failed", "oom", "cancelled", "timeout")
FINAL = frozenset(STATUSES) - {"running"}


def new_run_id(now: float | None = None) -> str:
    """A time-sortable id with a short random suffix, so runs started in the same second do not collide."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def create_run_dir(out: str | Path) -> tuple[str, Path]:
    """A fresh, empty run folder under `out` (created if missing)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        rid = new_run_id()
        d = root / rid
        try:
            d.mkdir()
        except FileExistsError:
            continue
        (d / "logs").mkdir()
        return rid, d


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so a reader sees the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: str | Path, obj: dict) -> None:
    """Append one JSON line and flush it (the file is shared with the workers: one write per line)."""
    line = json.dumps(obj, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def parse_lines(lines: Iterable[str]) -> list[dict]:
    """JSON objects from lines; a torn or garbled line (a crash mid-write) is skipped, not fatal."""
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    try:
        with open(path) as f:
            return parse_lines(f)
    except FileNotFoundError:
        return []


class JsonlTail:
    """Reads the complete lines appended to a .jsonl file since the last call (a partial line waits)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pos = 0
        self.buf = ""

    def new(self) -> list[dict]:
        try:
            with open(self.path) as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        text = self.buf + chunk
        complete, _, self.buf = text.rpartition("\n")
        return parse_lines(complete.splitlines()) if complete else []


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.json_normalize(rows) if rows else pd.DataFrame()


def _pid_alive(pid: int, create_time: float | None) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.01:
            return False  # the pid was reused by an unrelated process
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class Run:
    """A run folder, read on demand: `status`, `metrics`, `timeline`, `events` always show the files' state.

    A Run from `load_run` can still `wait()` for (and `cancel()`) a run another process launched: the
    launcher records its processes' ids in status.json. `launch()` returns a LiveRun (launcher.py)
    that also owns the processes and streams events.
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.id = self.dir.name

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.status} {self.dir}>"

    # ---- the files
    @property
    def info(self) -> dict:
        """status.json as a dict ({} if the launcher has not written it yet)."""
        return read_json(self.dir / "status.json", {}) or {}

    @property
    def status(self) -> str:
        return self.info.get("status", "running")

    @property
    def done(self) -> bool:
        return self.status in FINAL

    @property
    def plan(self):
        from shardlab.plan import load_plan

        return load_plan(self.dir / "plan.yaml", check=False)

    @property
    def config(self) -> dict:
        """run.json: model, steps, device, seed, factory, trace_memory, instrument."""
        return read_json(self.dir / "run.json", {}) or {}

    @property
    def metrics(self):
        """metrics.jsonl as a DataFrame, one row per step per rank; nested dicts become dotted columns
        (state_bytes.params, comm_bytes.all_gather, ...)."""
        return _frame(read_jsonl(self.dir / "metrics.jsonl"))

    def step_periods(self, warmup: int = 0):
        """One row per step after `warmup`: step, tokens (per rank), period_s and instrumented.

        A step's period runs from its start to the next step's start, so work done after the step's
        clock stops (writing the metrics line) still counts; the slowest rank sets it, and the last
        step has none. `instrumented` comes from each line of an alternating run, else from run.json.
        """
        m = self.metrics
        if m.empty:
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
    def prediction(self) -> dict | None:
        """prediction.json: what the estimator predicted for this run at launch (run/prediction.py), or None."""
        return read_json(self.dir / "prediction.json", None)

    @property
    def timeline(self):
        """timeline.jsonl as a DataFrame: t (time.time(), the metrics' clock), rank, gpu, source, bytes,
        plus the step and phase (setup, forward, backward, optimizer, other) each sample fell in."""
        from shardlab.run.timeline import label_phases

        return label_phases(_frame(read_jsonl(self.dir / "timeline.jsonl")), self.metrics)

    @property
    def events(self):
        return _frame(read_jsonl(self.dir / "events.jsonl"))

    def log(self, rank: int = 0, stream: str = "stderr") -> str:
        """A rank's captured stdout or stderr ('' if there is none yet)."""
        p = self.dir / "logs" / f"rank{rank}.{stream}.log"
        try:
            return p.read_text(errors="replace")
        except (FileNotFoundError, OSError):
            return ""

    # ---- control for runs launched elsewhere
    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until status.json holds a final status (or `timeout` seconds pass); return the status.
        A run whose launcher died leaves 'running' forever: give a timeout when unsure."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if end is not None and time.monotonic() >= end:
                break
            time.sleep(poll)
        return self.status

    def cancel(self) -> None:
        """Mark the run cancelled, then stop the processes recorded in status.json (SIGTERM, then
        SIGKILL after 3 s). The launching process, if it is still there, sees the mark and ends the
        run itself, writing the final status."""
        info = self.info
        if info.get("status") in FINAL:
            return
        procs = [(p["pid"], p.get("create_time")) for p in info.get("processes", [])]
        info.update(status="cancelled", ended_at=time.time())
        write_json_atomic(self.dir / "status.json", info)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, ct in procs:
                if _pid_alive(pid, ct):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(_pid_alive(p, c) for p, c in procs):
                time.sleep(0.1)


def load_run(run_dir: str | Path) -> Run:
    """A Run for an existing run folder (PlanError if it is not one)."""
    d = Path(run_dir)
    if not (d / "status.json").is_file() and not (d / "plan.yaml").is_file():
        from shardlab.plan import bad_input

        raise bad_input("run_dir", f"{d} is not a run folder (no status.json or plan.yaml). Give a folder under the run store, e.g. runs/<id>.")
    return Run(d)


LIST_COLUMNS = ["id", "status", "framework", "sharding", "precision", "model", "device", "world_size",
                "steps", "steps_done", "started_at", "duration_s", "failed_rank", "dir"]


def list_runs(dir: str | Path = "runs"):
    """The run store as a DataFrame, one row per run, oldest first (columns LIST_COLUMNS)."""
    import pandas as pd

    root = Path(dir)
    rows = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / "status.json").is_file()):
            info = read_json(d / "status.json", {}) or {}
            started, ended = info.get("started_at"), info.get("ended_at")
            rows.append({
                "id": d.name,
                "status": info.get("status"),
                "framework": info.get("framework"),
                "sharding": info.get("sharding"),
                "precision": info.get("precision"),
                "model": info.get("model"),
                "device": info.get("device"),
                "world_size": info.get("world_size"),
                "steps": info.get("steps"),
                "steps_done": info.get("steps_done"),
                "started_at": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if started else None,
                "duration_s": round(ended - started, 1) if started and ended else None,
                "failed_rank": info.get("failed_rank"),
                "dir": str(d),
            })
    return pd.DataFrame(rows, columns=LIST_COLUMNS)
