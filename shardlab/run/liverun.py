"""A run this process launched, while it goes: `LiveRun`, its watcher thread and its final status.

`launch()` (launcher.py) starts the processes and hands them to a LiveRun. Its watcher thread tails
the worker's metrics and events through the run store's readers (every metrics line passes the one
cleaner, `metrics.clean_line`, before anyone sees it), keeps status.json current, and ends the run on
the first failure (faults.py), on `timeout_s` seconds without progress, or on cancel(). `_finish`
stops every process before status.json turns final.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from shardlab.run import faults
from shardlab.run.liveness import process_record
from shardlab.run.metrics import clean_event, clean_line
from shardlab.run.store import FINAL, JsonlTail, Run, RunFiles, read_json, write_json_atomic

_LIVE: "set[LiveRun]" = set()
DONE_GRACE_S = 1.0  # after every rank said done, how long their processes get to exit on their own
QUEUE_MAX = 10_000  # items kept for a slow (or absent) iterator; older metrics lines are dropped, never blocking


class StatusWriteError(RuntimeError):
    """status.json could not be written: the run is ended, since its state can no longer be recorded."""


def write_status(run_dir: Path, info: dict, *, last: bool = False) -> None:
    """Write status.json atomically. When that fails (the folder deleted or made read-only), raise
    StatusWriteError; for the `last` write, first try rewriting the file in place, which a
    read-only folder still allows, so the store shows the final status and its reason."""
    path = RunFiles(run_dir).status
    try:
        write_json_atomic(path, info)
        return
    except OSError as e:
        first = e
    if last:
        try:
            with open(path, "r+") as f:
                f.write(json.dumps(info, indent=1, default=str))
                f.truncate()
            return
        except OSError:
            pass
    raise StatusWriteError(f"status.json in {run_dir} cannot be written ({first.strerror or first}); the run was stopped "
                           "because its state could no longer be recorded. Check that the run folder exists and is writable.")


class _Feed:
    """The watcher -> iterator queue, bounded: when nobody reads, memory stays at QUEUE_MAX items
    (the launcher kept every metrics line, ~2.9 KB each, for the whole run); the oldest metrics are
    dropped first, status items and the end mark never."""

    def __init__(self, maxlen: int = QUEUE_MAX):
        import collections

        self.items: "collections.deque" = collections.deque()
        self.maxlen = maxlen
        self.cond = threading.Condition()
        self.dropped = 0

    def put(self, item) -> None:
        with self.cond:
            if len(self.items) >= self.maxlen:
                for i, old in enumerate(self.items):
                    if old is not None and old.get("type") == "metrics":
                        del self.items[i]
                        self.dropped += 1
                        break
            self.items.append(item)
            self.cond.notify()

    def get(self):
        with self.cond:
            while not self.items:
                self.cond.wait()
            return self.items.popleft()


class LiveRun(Run):
    """A run this process launched: the files (as Run) plus its processes, events and control.

    Iterate over it (or pass on_event to launch) to receive, in order, {"type": "metrics", ...line},
    {"type": "event", ...line} and finally {"type": "status", "status": ...}; `on_event` is called on
    the watcher thread, so keep it short and thread-safe (widgets: schedule the UI update).
    """

    def __init__(self, run_dir: Path, *, agents, sampler, steps: int, world_size: int,
                 timeout_s: float | None, on_event: Callable[[dict], None] | None, progress, info: dict,
                 watchdog=None):
        super().__init__(run_dir)
        self.agents = agents  # list of subprocess.Popen, index = node rank
        self.watchdog = watchdog  # subprocess.Popen of run/watchdog.py, its stdin our pipe
        self.sampler = sampler
        self.steps = steps
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.on_event = on_event
        self.progress = progress
        self._info = info
        self._queue = _Feed()
        self._finished = threading.Event()
        self._cancel = threading.Event()
        self._metrics = JsonlTail(self.files.metrics)
        self._events = JsonlTail(self.files.events)
        self.steps_by_rank: dict[int, int] = {}
        self.worker_events: list[dict] = []
        self._recorded: dict[int, int] = {}
        self._watcher = threading.Thread(target=self._watch, name=f"shardlab-watch-{self.id}", daemon=True)

    # ---- what the files say, or what this process knows when they cannot say it
    @property
    def info(self) -> dict:
        """status.json; once the run is over, this process's own final record when the file was
        deleted or could not be written (a run folder removed or made read-only mid-run)."""
        on_disk = super().info
        if self._finished.is_set() and on_disk.get("status") not in FINAL:
            return dict(self._info)
        return on_disk or dict(self._info)

    # ---- public control
    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the run ends (or `timeout` seconds pass); return its status. Ctrl-C raises
        KeyboardInterrupt here as usual; the run goes on until cancel()."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            self._finished.wait(poll if left is None else min(poll, left))
        return self.status

    def cancel(self, wait: float = 8.0) -> None:
        """Stop the run: every process is sent SIGTERM, then SIGKILL after 2 s; status becomes cancelled."""
        if self._finished.is_set():
            return
        self._cancel.set()
        if threading.current_thread() is not self._watcher:
            self._finished.wait(wait)

    def __iter__(self) -> Iterator[dict]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item

    @property
    def steps_done(self) -> int:
        """Steps every rank has finished."""
        if len(self.steps_by_rank) < self.world_size:
            return 0
        return min(self.steps_by_rank.values())

    # ---- the watcher
    def _emit(self, item: dict) -> None:
        self._queue.put(item)
        if self.on_event is not None:
            try:
                self.on_event(item)
            except Exception as e:  # a broken callback must not stop the watching
                print(f"shardlab: on_event callback raised {type(e).__name__}: {e}", file=sys.stderr)

    def _write_info(self, **changes) -> None:
        if self._info.get("status") == "running" and changes.get("status", "running") == "running" and self._outside_cancel():
            return  # never write over another process's cancel mark; the watcher acts on it next
        self._info.update(changes)
        write_status(self.dir, self._info)

    def _outside_cancel(self) -> bool:
        """load_run(dir).cancel() in another process marked the run cancelled (before killing it)."""
        if self.files.cancel.exists() or (read_json(self.files.status, {}) or {}).get("status") == "cancelled":
            self._cancel.set()
        return self._cancel.is_set()

    def _record_ranks(self) -> None:
        """Put the ranks' pids in status.json once known, so another process can cancel the run."""
        ranks = self.sampler.rank_of_pid()
        if len(ranks) == len(self._recorded):
            return
        self._recorded = ranks
        agents = [p for p in self._info["processes"] if p["role"].startswith("agent")]
        procs = []
        for rank in sorted(ranks.values()):
            try:
                procs.append(process_record(self.sampler.ranks[rank], f"rank{rank}"))
            except Exception:
                pass
        self._write_info(processes=agents + procs)

    def _drain(self) -> bool:
        """Pass on the metrics and event lines written since the last call; True if there were any."""
        lines, events = self._metrics.new(), self._events.new()
        for line in filter(None, map(clean_line, lines)):  # the readers' own cleaner: ints, numbers or missing
            self.steps_by_rank[line["rank"]] = self.steps_by_rank.get(line["rank"], 0) + 1
            if self.progress is not None:
                self.progress.update(line)
            self._emit({"type": "metrics", **line})
        for ev in filter(None, map(clean_event, events)):
            self.worker_events.append(ev)
            if self.progress is not None:
                self.progress.event(ev)
            self._emit({"type": "event", **ev})
        return bool(lines or events)  # any complete line is progress, even one the cleaner drops

    def _watch(self) -> None:
        self._emit({"type": "status", "status": "running", "id": self.id})
        last_progress = time.monotonic()
        last_written = 0.0
        failure: faults.Failure | None = None
        first_failure = all_done = None
        next_link = 0.0
        status = None
        try:
            while True:
                now = time.monotonic()
                if not self.dir.is_dir():
                    status, failure = "failed", faults.Failure("failed", None, error=f"the run folder {self.dir} was deleted while the run was going; the run was stopped.")
                    break
                if self._drain():
                    last_progress = now
                    if now - last_written > 0.5:
                        self._write_info(steps_done=self.steps_done)
                        last_written = now
                if self._cancel.is_set():
                    status = "cancelled"
                    break
                codes = [a.poll() for a in self.agents]
                # Every rank said done: the work and its metrics are complete. Interpreter and
                # torchrun teardown can take seconds on a busy machine; wait briefly, then end it.
                if len({e.get("rank") for e in self.worker_events if e.get("event") == "done"}) >= self.world_size:
                    all_done = all_done or now
                    if all(c is not None for c in codes) or now - all_done > DONE_GRACE_S:
                        status = "completed"
                        break
                if now >= next_link:
                    next_link = now + 1.0
                    faults.link_rank_logs(self.dir, self.sampler)
                    self._record_ranks()
                if self._outside_cancel():
                    status = "cancelled"
                    break
                found = faults.detect(self.worker_events, self.sampler, codes)
                if found is not None:
                    failure = found  # re-judged each pass: later evidence can name the root cause better
                    first_failure = first_failure or now
                    if now - first_failure > faults.GRACE_S or all(c is not None for c in codes):
                        status = failure.status
                        break
                if all(c is not None for c in codes):
                    status = "completed" if all(c == 0 for c in codes) else "failed"
                    break
                if self.timeout_s is not None and now - last_progress > self.timeout_s:
                    status = "timeout"
                    break
                time.sleep(0.1)
        except StatusWriteError as e:
            status, failure = "failed", faults.Failure("failed", None, error=str(e))
        except Exception as e:  # the watcher itself broke: end the run rather than leave it unwatched
            status, failure = "failed", faults.Failure("failed", None, error=f"shardlab watcher: {type(e).__name__}: {e}")
        if status in ("failed", "timeout") and self._outside_cancel():
            status, failure = "cancelled", None  # the ranks died because another process cancelled the run
        self._finish(status, failure)

    def _finish(self, status: str, failure) -> None:
        """Stop every process, write the final status; whatever fails here, wait() returns."""
        report = {"status": status, "error": failure.error if failure else None}
        try:
            faults.kill_all(self.agents, self.sampler, self._info.get("processes"))
            self.sampler.stop()
            self._drain()  # lines written in the last moments before the end still count
            faults.link_rank_logs(self.dir, self.sampler)
            codes = [a.returncode for a in self.agents]
            report = faults.report(self.dir, status, failure, self.worker_events, self.sampler, codes,
                                   self.steps_done, self.steps, self._info.get("oom_kills_at_start"))
            self._info.update(**report, steps_done=self.steps_done, ended_at=time.time())
            write_status(self.dir, self._info, last=True)
        except Exception as e:  # noqa: BLE001 - e.g. the folder deleted or read-only: the status stays in memory
            self._info.update(status=report.get("status", status), ended_at=time.time())
            if not self._info.get("error"):
                self._info["error"] = f"{type(e).__name__}: {e}"
            print(f"shardlab: run {self.id} ended {self._info['status']}, but its status could not be written: {e}", file=sys.stderr)
        finally:
            self._release_watchdog()
            if self.progress is not None:
                try:
                    self.progress.close(self._info.get("status", status))
                except Exception:
                    pass
            _LIVE.discard(self)
            self._finished.set()
            self._emit({"type": "status", "status": self._info.get("status", status), "id": self.id})
            self._queue.put(None)

    def _release_watchdog(self) -> None:
        """Tell the watchdog the run ended normally (it exits); it never acts after this."""
        w = self.watchdog
        if w is None:
            return
        try:
            w.stdin.write(b"done\n")
            w.stdin.close()
            try:
                w.wait(timeout=1)
            except Exception:  # a starved machine: reap it later, the run is over either way
                threading.Thread(target=w.wait, name="shardlab-watchdog-reap", daemon=True).start()
        except Exception:
            try:
                w.kill()
                w.wait(timeout=1)
            except Exception:
                pass
