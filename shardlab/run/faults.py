"""How a run fails, and how it is ended: failure detection, killing every process, the final report.

Sources of truth, in order of trust: the worker's own oom / error events (they name the rank and the
phase); torchrun's failure summary in the agent log ("rank : R (local_rank: L) / exitcode : C", root
cause first); and what the timeline sampler saw (a rank's process vanishing, e.g. kill -9, before it
said "done"). On a CPU an allocation beyond the memory limit is a RuntimeError ("can't allocate
memory"), not torch.OutOfMemoryError, so error text is also checked for out-of-memory wording.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil

from shardlab.constants import EXIT_OOM as OOM_EXIT  # the worker's exit code for out of memory

# after a failure, torchrun gets this long to end its workers itself before we do. Its summary (each failed worker's
# exit code: torchrun_summary) is written only if it gets there; at 2 s a SIGKILLed rank's -9 was missing once on the
# loaded 2-core CI machine (session 23: the surviving rank still shutting down), and with it the kernel-OOM check
GRACE_S = 5.0
_OOM_TEXT = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|OutOfMemoryError|MemoryError", re.I)
_SUMMARY = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


@dataclass
class Failure:
    status: str  # failed | oom
    rank: int | None
    phase: str | None = None
    error: str | None = None
    event: dict | None = None
    agent: int | None = None  # a torchrun agent that failed itself (node rank), not one of its ranks


def _is_oom_event(ev: dict) -> bool:
    return ev.get("event") == "oom" or (ev.get("event") == "error" and bool(_OOM_TEXT.search(str(ev.get("error") or ev.get("message") or ""))))


def detect(events: list[dict], sampler, agent_codes: list[int | None]) -> Failure | None:
    """The run's root failure as far as it is known now, or None.

    When one rank dies the others fail too (a peer's closed connection, torchrun's SIGTERM), so the
    cause is chosen by kind, not by time: out of memory first, then a rank that vanished without a
    word (kill -9, a segfault), then the earliest error event, then a failed agent.
    """
    said = {ev.get("rank") for ev in events if ev.get("event") in ("oom", "error", "done")}
    oom = [ev for ev in events if _is_oom_event(ev)]
    if oom:
        ev = min(oom, key=lambda e: e.get("t", 0))
        return Failure("oom", ev.get("rank"), phase=ev.get("phase"), error=ev.get("message") or ev.get("error"), event=ev)
    killed = [(n, c) for n, c in enumerate(agent_codes) if c is not None and c < 0]
    if killed:  # a torchrun agent killed by a signal: its ranks' errors only say that it went away
        n, c = killed[0]
        return Failure("failed", None, error=f"the torchrun agent of node {n} was killed by {_signame(-c)} (exit code {c}); its ranks were stopped", agent=n)
    gone = [(t, r) for r, t in getattr(sampler, "gone", {}).items() if r not in said]
    if gone:
        t, rank = min(gone)
        return Failure("failed", rank, error=f"rank {rank} ended without reporting an error (killed, or crashed in native code)")
    errors = sorted((ev for ev in events if ev.get("event") == "error"), key=lambda e: (e.get("message") == "interrupted", e.get("t", 0)))
    if errors:
        ev = errors[0]
        return Failure("failed", ev.get("rank"), phase=ev.get("phase"), error=ev.get("message") or ev.get("error"), event=ev)
    if any(c not in (None, 0) for c in agent_codes):
        return Failure("failed", None)
    return None


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def recorded_processes(processes: list[dict]) -> list[psutil.Process]:
    """The live processes status.json records (liveness.process_record), each checked to be the same
    process (its start time), so a pid reused by an unrelated program is never signalled."""
    from shardlab.run.liveness import same_process

    out = []
    for rec in processes or ():
        try:
            p = psutil.Process(int(rec["pid"]))
            if same_process(p, rec):
                out.append(p)
        except (psutil.Error, KeyError, TypeError, ValueError, AttributeError):
            pass
    return out


def own_processes(agents, sampler=None, recorded: list[dict] | None = None) -> list[psutil.Process]:
    """Every process of the run, found only from what the launcher started: the agents (by pid) and
    their descendants, the ranks the sampler tracks, and the processes recorded in status.json.
    Never by command line: an unrelated `tail -f runs/<id>/metrics.jsonl` must survive."""
    procs: dict[int, psutil.Process] = {}
    for a in agents:
        try:
            ap = a if isinstance(a, psutil.Process) else psutil.Process(a.pid)
            procs[ap.pid] = ap
            for c in ap.children(recursive=True):
                procs.setdefault(c.pid, c)
        except psutil.Error:
            pass
    for p in sampler.processes() if sampler is not None else ():
        procs.setdefault(p.pid, p)
    for p in recorded_processes(recorded or []):
        procs.setdefault(p.pid, p)
        try:
            for c in p.children(recursive=True):
                procs.setdefault(c.pid, c)
        except psutil.Error:
            pass
    procs.pop(os.getpid(), None)
    return list(procs.values())


def kill_all(agents, sampler, recorded: list[dict] | None = None) -> None:
    """End every process of the run: SIGCONT (a stopped one cannot act on SIGTERM), SIGTERM, and after
    2 s SIGKILL; then reap the agents. Returns when none is left (or after ~5 s)."""
    terminate(own_processes(agents, sampler, recorded))
    for a in agents:
        try:
            a.wait(timeout=1)
        except Exception:
            pass


def terminate(procs: list[psutil.Process], grace_s: float = 2.0) -> None:
    """SIGCONT + SIGTERM to each of `procs`, SIGKILL to those left after `grace_s`."""
    live = [p for p in procs if _alive(p)]
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for p in live:
            try:
                p.send_signal(sig)  # psutil checks the pid still belongs to the same process
            except psutil.Error:
                pass
    _, live = psutil.wait_procs(live, timeout=grace_s)
    live = [p for p in live if _alive(p)]
    for p in live:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(live, timeout=3)


def limit_memory(limit_bytes: int):
    """A sampler hook putting an address-space limit on each rank as it is found (Linux prlimit)."""
    def hook(p: psutil.Process) -> None:
        p.rlimit(psutil.RLIMIT_AS, (limit_bytes, limit_bytes))
    return hook


def link_rank_logs(run_dir: Path, sampler) -> None:
    """logs/rank{r}.stdout.log / .stderr.log -> torchrun's per-rank files (relative links)."""
    logs = run_dir / "logs"
    where = dict(getattr(sampler, "where", {}))
    for rank, (node, local) in where.items():
        for stream in ("stdout", "stderr"):
            found = sorted(logs.glob(f"node{node}/*/attempt_*/{local}/{stream}.log"))
            link = logs / f"rank{rank}.{stream}.log"
            if found and not link.exists():
                try:
                    link.symlink_to(found[-1].relative_to(logs))
                except OSError:
                    pass


def _tail(path: Path, n: int = 15) -> str | None:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return "\n".join(lines[-n:]) if lines else None


def torchrun_summary(run_dir: Path) -> list[tuple[int, int, int]]:
    """(rank, local rank, exit code) of each failed worker from the agents' logs, root cause first."""
    out = []
    for log in sorted((run_dir / "logs").glob("agent*.log")):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        # The summary lists "Failures:" (the others) before "Root Cause"; put the root cause first.
        root = text.rfind("Root Cause")
        found = [(m.start(), (int(m.group(1)), int(m.group(2)), int(m.group(3)))) for m in _SUMMARY.finditer(text)]
        out += [x for at, x in found if root != -1 and at > root] + [x for at, x in found if root == -1 or at < root]
    return out


def kernel_oom_kills() -> int | None:
    """How many processes the Linux kernel's out-of-memory killer has ended since boot (/proc/vmstat oom_kill, Linux
    4.13+), or None where that cannot be read. A rank it ends dies by SIGKILL without a word: the count rising
    during a run is what tells that SIGKILL from anyone else's."""
    try:
        with open("/proc/vmstat") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), None)
    except (OSError, ValueError, IndexError):
        return None


def report(run_dir: Path, status: str, failure: Failure | None, events: list[dict], sampler,
           agent_codes: list[int | None], steps_done: int, steps: int, oom_kills_at_start: int | None = None) -> dict:
    """The final fields of status.json. oom_kills_at_start: kernel_oom_kills() when the run began (status.json)."""
    summary = torchrun_summary(run_dir)
    exit_codes = {str(r): c for r, _, c in summary}
    for ev in events:
        if ev.get("event") == "done" and isinstance(ev.get("rank"), int):
            exit_codes.setdefault(str(ev["rank"]), 0)
    out = {"status": status, "exit_codes": exit_codes or None, "agent_exit_codes": agent_codes,
           "failed_rank": None, "error": None, "phase": None}
    if status == "completed" and steps_done < steps:
        status = "failed"
        failure = Failure("failed", None, error=f"the workers exited cleanly after {steps_done} of {steps} steps")
    if status in ("failed", "oom") or (failure is not None and status not in ("cancelled", "timeout")):
        failure = failure or Failure("failed", None)
        rank = failure.rank
        if rank is None and summary and failure.agent is None:
            rank = summary[0][0]
        if rank is None and getattr(sampler, "gone", None) and failure.agent is None:
            rank = min((t, r) for r, t in sampler.gone.items())[1]
        oom = (failure.status == "oom" or any(_is_oom_event(e) for e in events)
               or (rank is not None and exit_codes.get(str(rank)) == OOM_EXIT))
        log_tail = _tail(run_dir / "logs" / f"rank{rank}.stderr.log") if rank is not None else None
        if oom and not failure.phase:
            ev = next((e for e in events if _is_oom_event(e)), None)
            failure.phase = ev.get("phase") if ev else None
            failure.event = failure.event or ev
        code = exit_codes.get(str(rank)) if rank is not None else None
        # a SIGKILL, or a rank that vanished without a word whose code torchrun did not get to report
        silent = code == -signal.SIGKILL or (code is None and rank in getattr(sampler, "gone", {}))
        kills = kernel_oom_kills() if silent and not oom and oom_kills_at_start is not None else None
        if kills is not None and kills > oom_kills_at_start:  # the kernel's out-of-memory killer, not a person
            oom = True
            failure.error = (f"rank {rank} was killed by the kernel's out-of-memory killer (SIGKILL; the machine's oom_kill "
                             f"count rose from {oom_kills_at_start} to {kills} during the run): this machine's memory ran out. "
                             "Use a smaller model, fewer processes or a smaller micro-batch (`shardlab estimate` says what a plan needs).")
            log_tail = "\n".join(x for x in (failure.error, log_tail) if x)
        if code is not None and code < 0 and not oom:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            failure.error = f"rank {rank} was killed by {name} (exit code {code})"
            log_tail = "\n".join(x for x in (failure.error, log_tail) if x)
        if log_tail is None or (not oom and rank is None):
            log_tail = log_tail or failure.error or _tail(run_dir / "logs" / "agent0.log")
        # The worker's own one-line message leads unless the log's last lines already end with it
        # (an out-of-memory exit prints no traceback, so its log holds only warnings, if anything).
        msg = (failure.error or "").strip().splitlines()[0] if (failure.error or "").strip() else ""
        if msg and log_tail and msg not in log_tail:
            log_tail = f"{msg}\n{log_tail}"
        out.update(status="oom" if oom else "failed", failed_rank=rank, phase=failure.phase,
                   error=log_tail or failure.error)
        if oom:
            mem = {k: v for k, v in (failure.event or {}).items() if k.endswith("_bytes") or k == "memory"}
            if rank is not None and rank in getattr(sampler, "last", {}):
                mem["rss_bytes_sampled"] = sampler.last[rank]
            if rank is not None and rank in getattr(sampler, "last_gpu", {}):
                mem["gpu_bytes_sampled"] = sampler.last_gpu[rank]
            out["memory_at_failure"] = mem
    return out
