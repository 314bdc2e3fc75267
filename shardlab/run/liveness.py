"""Whether the processes a run folder names are still there, told apart from later ones with their pids.

status.json records the launching process (`launcher_pid`, `launcher_boot_start`, `started_at`) and
the run's agents and ranks (`processes`: pid, create_time, boot_start, role). A pid alone can be
reused by an unrelated process once the original is gone, so a pid is only taken as the run's process
when that process started when the record says it did. Only those processes are ever signalled.

The start compared is `boot_start`, seconds after the machine booted, not psutil's `create_time`
(seconds since the epoch). On Linux create_time is the start in clock ticks since boot plus the boot
time from /proc/stat, which the kernel recomputes from the wall clock on every read and gives in whole
seconds: when the clock is slewed, two processes reading the same process's create_time can disagree
by a whole second. CI met exactly that: ranks took their live launcher for dead and stopped. The ticks
since boot never change, so every reader agrees. Runs recorded before boot_start existed are judged by
create_time.
"""

from __future__ import annotations

import os

# create_time from psutil is rounded to 10 ms; the launcher starts before it writes started_at
CLOCK_SLACK_S = 1.0
_SAME_START_S = 0.05  # two readings of one process's start; a clock tick is 10 ms


def boot_start(p) -> float:
    """When psutil.Process `p` started, in seconds after boot (from /proc/PID/stat's starttime field);
    off Linux, psutil's create_time less the boot time."""
    try:
        with open(f"/proc/{p.pid}/stat", "rb") as f:
            after_name = f.read().rsplit(b")", 1)[1].split()
        return int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22; field 3 is after_name[0]
    except (OSError, IndexError, ValueError):
        import psutil

        return p.create_time() - psutil.boot_time()


def process_record(p, role: str) -> dict:
    """The entry status.json's `processes` keeps for psutil.Process `p`."""
    return {"pid": p.pid, "create_time": p.create_time(), "boot_start": round(boot_start(p), 3), "role": role}


def same_process(p, rec: dict) -> bool:
    """Is psutil.Process `p` the very process `rec` records (its boot_start, else its create_time)?"""
    for key, now in (("boot_start", boot_start), ("create_time", lambda q: q.create_time())):
        then = rec.get(key)
        if isinstance(then, (int, float)) and not isinstance(then, bool):
            return abs(now(p) - then) < _SAME_START_S
    return False


def alive(pid: int, began_by: float | None = None, boot_started: float | None = None) -> bool:
    """Is `pid` running (not a zombie), and the process that started at `boot_started` after boot, or
    (older records) no later than `began_by`?"""
    import psutil

    try:
        p = psutil.Process(pid)
        if boot_started is not None:
            if not same_process(p, {"boot_start": boot_started}):
                return False  # the pid was reused by an unrelated process
        elif began_by is not None and p.create_time() > began_by + CLOCK_SLACK_S:
            return False  # started after the run did: not its launcher
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):
        return True  # there, but not ours to inspect: no evidence it is gone


def _number(x) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def launcher_gone(info: dict, events: list[dict] = ()) -> bool:
    """True when status.json names a launching process that no longer exists on this machine.

    False when there is no evidence: no launcher pid recorded, or the ranks ran on another host (a
    run store on a shared file system), where this machine's process table says nothing.
    """
    pid = info.get("launcher_pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    here = os.uname().nodename  # what the worker writes in its start event
    if any(isinstance(e.get("host"), str) and e["host"] != here for e in events if e.get("event") == "start"):
        return False
    return not alive(pid, began_by=_number(info.get("started_at")), boot_started=_number(info.get("launcher_boot_start")))
