"""The suite's shared real runs, started in the background as soon as collection shows a selected test needs them.

Most of the suite's wall time went to real CPU runs (gpt-tiny, transformers models) that a few fixtures
started only when their first test asked, while the rest of the suite (single-threaded unit tests, a
browser waiting on a page) left one of the two cores idle. Here a fixture that reads shared runs names the
jobs it needs (`@needs(...)` under its `@pytest.fixture`); conftest queues the jobs of every selected,
not-skipped test right after collection, in suite order; one driver thread starts them, AT_ONCE going at a
time; the fixture's `get(job)` moves its jobs to the front of the queue and returns each one's handle once
started. What each run checks is unchanged: the same runs, the same files, read by the same tests.

Each process a job starts (a torchrun agent, the launcher's watchdog, a CLI process) is given a lower
scheduling priority (nice NICE) right after its start, before it starts the ranks, which inherit it (and so
do DeepSpeed's JIT builds): the foreground tests keep the CPU they need, so their timing checks ("cancel
ends every process within 5 s") judge the code, not the background; the background runs take what the
foreground leaves, and a test waiting for its runs leaves the cores to them. The threads in pytest's own
process (the launcher's watcher and sampler) keep their priority: a low-priority thread holding the GIL
would stall the foreground. Nothing here is used by shardlab itself.

Every job starts from the environment and working folder the suite had at collection (`snapshot()`, which
conftest calls once; `ENV`, `CWD`), never from os.environ as it is when the driver thread gets to it: some
foreground tests change os.environ for a while (test_labs clears and restores it around each notebook,
test_launcher_signals replaces PYTHONPATH, judges.py chdirs), and runs started beside them died with
"Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (the fresh clone at 7288d3a, 13 failed tests).
`launch(...)` is shardlab's launch() with that environment and folder; a job that starts processes of its
own passes `ENV` / `CWD` to them the same way.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

AT_ONCE = 2  # runs going at once: 2 runs (4 ranks) fill 2 cores (cpu_runs.py's comment has the measurement)
NICE = 10  # the background's niceness: CFS weight 110 against the foreground's 1024 (~10% of a contended core)
ENV: dict[str, str] = {}  # os.environ at collection (snapshot()): every background job's environment
CWD: str = os.getcwd()  # the working folder at collection (a 'module:function' factory imports from it)


def snapshot() -> None:
    """Take ENV and CWD from this process now (conftest: once, at collection, before any test runs)."""
    ENV.clear()
    ENV.update(os.environ)
    global CWD
    CWD = os.getcwd()


def base_env() -> dict[str, str]:
    """A copy of the collection-time environment (os.environ now, if snapshot() was never called)."""
    return dict(ENV or os.environ)


def launch(plan, **kwargs):
    """shardlab.run.launcher.launch, started from the collection-time environment and folder."""
    from shardlab.run.launcher import launch as real_launch

    return real_launch(plan, env=base_env(), cwd=CWD, **kwargs)


class _Failed:
    """A job whose start raised: get() raises the same error in the test that needs it."""

    def __init__(self, error: BaseException):
        self.error = error


class Queue:
    """Jobs started in order by one low-priority driver thread, at most `at_once` of them not done."""

    def __init__(self, at_once: int | None = None, nice: int = NICE):
        self.at_once, self.nice = at_once, nice
        self.jobs: dict[str, tuple[Callable[[], Any], Callable[[Any], bool], Callable[[Any], list[int]]]] = {}
        self.prepare: dict[str, Callable[[], None]] = {}  # run once, in the thread that first wants the job
        self.started: dict[str, Any] = {}
        self.ended: set[str] = set()  # started jobs seen done (each is asked only until then)
        self.wanted: list[str] = []
        self._cond = threading.Condition()
        self._driver: threading.Thread | None = None

    def register(self, name: str, start: Callable[[], Any], done: Callable[[Any], bool],
                 pids: Callable[[Any], list[int]] = lambda handle: [handle.pid],
                 prepare: Callable[[], None] | None = None) -> None:
        """A job: `start()` starts it and returns a handle at once; `done(handle)` says whether it still holds a
        slot; `pids(handle)` the processes it started (their priority is lowered with their children's);
        `prepare()`, if given, runs once in the thread that first wants the job (collection's or a fixture's,
        never the driver's), e.g. to start a helper process while os.environ is still the suite's own."""
        self.jobs[name] = (start, done, pids)
        if prepare is not None:
            self.prepare[name] = prepare

    def want(self, names, first: bool = False) -> None:
        """Queue these jobs (not yet started ones), at the front when `first`; start the driver if it is idle."""
        with self._cond:
            new = [n for n in dict.fromkeys(names) if n not in self.started]
            for n in new:
                if n not in self.jobs:
                    raise KeyError(f"no background job {n!r} is registered")
            for n in list(new):
                try:
                    self.prepare.pop(n, lambda: None)()
                except BaseException as e:  # noqa: BLE001 - handed to the test that needs it, as a failed start
                    self.started[n] = _Failed(e)
                    new.remove(n)
            if first:
                self.wanted[:] = new + [n for n in self.wanted if n not in new]
            else:
                self.wanted.extend(n for n in new if n not in self.wanted)
            if self.wanted and not (self._driver and self._driver.is_alive()):
                self._driver = threading.Thread(target=self._drive, name="shardlab-tests-prestart", daemon=True)
                self._driver.start()

    def get(self, name: str, timeout: float = 1800) -> Any:
        """The handle of a job, once started (queued first if it was not yet); raises what its start raised."""
        self.want([name], first=True)
        end = time.monotonic() + timeout
        with self._cond:
            while name not in self.started:
                if time.monotonic() >= end:
                    raise TimeoutError(f"background job {name!r} did not start within {timeout} s")
                self._cond.wait(timeout=max(0.01, end - time.monotonic()))
            handle = self.started[name]
        if isinstance(handle, _Failed):
            raise handle.error
        return handle

    def _lower(self, pids: list[int]) -> None:
        """These processes and their children so far at nice `self.nice` (children started later inherit it)."""
        import psutil

        for pid in pids:
            try:  # (only ever lowered: a process whose nice is already higher keeps it)
                top = psutil.Process(pid)
                for p in (top, *top.children(recursive=True)):
                    p.nice(max(p.nice(), self.nice))
            except psutil.Error:  # already gone: nothing to lower
                pass

    def _drive(self) -> None:
        while True:
            with self._cond:
                self.ended.update(n for n, h in self.started.items()
                                  if n not in self.ended and (isinstance(h, _Failed) or self.jobs[n][1](h)))
                going = len(self.started) - len(self.ended)
                while self.wanted and going < (self.at_once or AT_ONCE):
                    name = self.wanted.pop(0)
                    start, _, pids = self.jobs[name]
                    try:
                        self.started[name] = start()
                    except BaseException as e:  # noqa: BLE001 - handed to the test that needs it
                        self.started[name] = _Failed(e)
                    else:
                        going += 1
                        try:
                            self._lower(pids(self.started[name]))
                        except Exception as e:  # noqa: BLE001 - the run goes on at normal priority; say so
                            print(f"_prestart: could not lower the priority of {name}: {e!r}")
                    self._cond.notify_all()
                if not self.wanted:
                    self._driver = None
                    return
            time.sleep(0.25)


def run_pids(run) -> list[int]:
    """A LiveRun's own processes: its torchrun agents and its watchdog."""
    return [a.pid for a in run.agents] + ([run.watchdog.pid] if run.watchdog is not None else [])


QUEUE = Queue()  # the suite's one queue: its runs share the 2 cores
register, want, get, lower = QUEUE.register, QUEUE.want, QUEUE.get, QUEUE._lower


def needs(*names: str):
    """Under `@pytest.fixture`: the jobs the fixture reads, queued at collection when a selected test uses it."""

    def tag(fixture_function):
        fixture_function.prestart = tuple(names)
        return fixture_function
    return tag


def queue_for(items) -> list[str]:
    """The jobs the fixtures of these (selected, not skipped) test items need, in suite order; queued."""
    names = []
    for item in items:
        if item.get_closest_marker("skip") or any(m.args and m.args[0] is True for m in item.iter_markers("skipif")):
            continue
        info = getattr(item, "_fixtureinfo", None)
        for fixture in getattr(item, "fixturenames", ()):
            for fd in (info.name2fixturedefs.get(fixture, ()) if info else ()):
                names.extend(getattr(fd.func, "prestart", ()))
    names = list(dict.fromkeys(names))
    if names:
        want(names)
    return names
