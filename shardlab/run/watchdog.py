"""The run's watchdog: ends a run whose launching process died without ending it.

`launch()` starts `python -m shardlab.run.watchdog RUN_DIR LAUNCHER_PID` in a session of its own,
with its stdin a pipe from the launcher. The launcher never writes to the pipe until the run is over
(then it writes "done"); any other end of the pipe (EOF) means the launching process is gone: a
SIGKILL, an uncaught SIGTERM / SIGHUP in a notebook kernel, a crash. The kernel closes the pipe
whatever killed it, so the watchdog needs no polling and cannot be fooled by a reused pid.

It then stops every process the launcher recorded in status.json (each checked by its start time,
plus their children: never by matching command lines) and writes the final status: `failed`, with
the reason in `error`. The workers also watch their launcher and torchrun agent (worker.py), so a
rank whose parents are gone stops even if this process was killed too.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def orphaned_reason(launcher_pid: int | str) -> str:
    return (f"the launching process (pid {launcher_pid}) ended without stopping the run (killed, or its terminal "
            "closed); shardlab's watchdog stopped the run's processes. Metrics written until then are kept.")


def steps_done(run_dir: Path) -> int:
    """Steps every rank finished, counted from metrics.jsonl as the metrics schema reads it."""
    from collections import Counter

    from shardlab.run.files import RunFiles, read_jsonl
    from shardlab.run.metrics import clean_lines

    counts = Counter(line["rank"] for line in clean_lines(read_jsonl(RunFiles(run_dir).metrics)))
    return min(counts.values()) if counts else 0


def stop_orphaned_run(run_dir: Path, launcher_pid: int | str) -> bool:
    """Stop the run recorded in `run_dir` and mark it failed; False if it had already ended."""
    from shardlab.run import faults
    from shardlab.run.store import RunFiles, read_json, write_json_atomic

    status_file = RunFiles(run_dir).status
    try:
        info = read_json(status_file, None)
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("status") != "running":
        return False
    faults.terminate(faults.own_processes([], None, info.get("processes") or []))
    info.update(status="failed", error=orphaned_reason(launcher_pid), failed_rank=None,
                steps_done=steps_done(run_dir), ended_at=time.time())
    try:
        write_json_atomic(status_file, info)
    except OSError:
        return True  # the folder is gone or read-only: the processes are stopped all the same
    return True


def _launcher_alive(spec: str) -> bool:
    """SHARDLAB_LAUNCHER is "pid:seconds after boot it started": alive if that very process still runs (liveness.alive;
    a spec it cannot read says nothing: the watchdog process decides then)."""
    from shardlab.run.liveness import alive

    try:
        pid, started = spec.split(":")
        pid, started = int(pid), float(started)
    except ValueError:
        return True
    return alive(pid, boot_started=started)


def watch_parents(on_gone, interval: float = 0.5) -> None:
    """In a worker: call on_gone(reason) (which should end the process) once its torchrun agent or the
    launching process (env SHARDLAB_LAUNCHER) is gone, so no rank trains on under PID 1."""
    import threading

    agent = os.getppid()
    launcher = os.environ.get("SHARDLAB_LAUNCHER")

    def loop() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != agent:
                return on_gone(f"its torchrun agent (pid {agent}) is gone")
            if launcher and not _launcher_alive(launcher):
                return on_gone(f"the launching process (pid {launcher.split(':')[0]}) is gone")

    threading.Thread(target=loop, name="shardlab-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m shardlab.run.watchdog RUN_DIR LAUNCHER_PID", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the pipe decides
    try:
        said = sys.stdin.buffer.read()  # blocks until the launcher writes "done" and closes, or dies
    except OSError:
        said = b""
    if b"done" in said:
        return 0
    stop_orphaned_run(Path(argv[0]), argv[1])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
