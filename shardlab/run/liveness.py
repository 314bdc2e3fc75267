"""Whether the processes a run folder names are still there, and stopping them by id.

status.json records the launching process (`launcher_pid`, written before any agent starts, and
`started_at`) and the run's agents and ranks (`processes`: pid, create_time, role). A pid alone can
be reused by an unrelated process once the original is gone, so a pid is only taken as the run's
process when that process began no later than the run did (the launcher) or at the recorded
create_time (agents and ranks). Only those processes are ever signalled.
"""

from __future__ import annotations

import os
import signal
import time

# create_time from psutil is rounded to 10 ms; the launcher starts before it writes started_at
CLOCK_SLACK_S = 1.0


def _alive(pid: int, began_by: float | None = None, create_time: float | None = None) -> bool:
    """Is `pid` running (not a zombie) and the same process as the one recorded?"""
    import psutil

    try:
        p = psutil.Process(pid)
        ct = p.create_time()
        if create_time is not None and abs(ct - create_time) > 0.01:
            return False  # the pid was reused by an unrelated process
        if began_by is not None and ct > began_by + CLOCK_SLACK_S:
            return False  # started after the run did: not its launcher
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):
        return True  # there, but not ours to inspect: no evidence it is gone


def launcher_gone(info: dict, events: list[dict] = ()) -> bool:
    """True when status.json names a launching process that no longer exists on this machine.

    False when there is no evidence: no launcher pid recorded, or the ranks ran on another host (a
    run store on a shared file system), where this machine's process table says nothing.
    """
    pid, started = info.get("launcher_pid"), info.get("started_at")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    here = os.uname().nodename  # what the worker writes in its start event
    if any(isinstance(e.get("host"), str) and e["host"] != here for e in events if e.get("event") == "start"):
        return False
    return not _alive(pid, began_by=started if isinstance(started, (int, float)) else None)


def recorded_processes(info: dict) -> list[tuple[int, float | None]]:
    """(pid, create_time) of the agents and ranks status.json records (malformed entries skipped)."""
    out = []
    for p in info.get("processes") or []:
        if isinstance(p, dict) and isinstance(p.get("pid"), int) and p["pid"] > 0:
            ct = p.get("create_time")
            out.append((p["pid"], ct if isinstance(ct, (int, float)) else None))
    return out


def stop(procs: list[tuple[int, float | None]], grace_s: float = 3.0) -> None:
    """SIGTERM the recorded processes that are still the recorded ones, then SIGKILL after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, ct in procs:
            if _alive(pid, create_time=ct):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p, create_time=c) for p, c in procs):
            time.sleep(0.1)
