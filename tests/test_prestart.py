"""The background queue of the suite's shared runs (_prestart.py), with `sleep` processes for runs: what is
started runs at the lowered priority the kernel reports (pytest's own threads do not), in order, a
fixture's own jobs first, never more than at_once at a time, and a start that fails fails the test that
needs it. A Queue of its own, so the suite's queue (busy with real runs in a whole-suite session) is not
touched. About two seconds."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from _prestart import Queue, needs


def _queue(names, at_once=2, seconds=0.3):
    q, log = Queue(at_once=at_once, nice=7), []

    def start(name):
        log.append((name, time.monotonic(), sum(1 for h in q.started.values() if hasattr(h, "poll") and h.poll() is None)))
        return subprocess.Popen(["sleep", str(seconds)])

    for n in names:
        q.register(n, lambda n=n: start(n), lambda proc: proc.poll() is not None)
    return q, log


def test_jobs_start_in_order_at_most_at_once_at_the_lowered_priority():
    q, log = _queue(["a", "b", "c", "d"])
    q.want(["a", "b", "c", "d"])
    procs = [q.get(n, timeout=30) for n in "abcd"]
    assert os.getpriority(os.PRIO_PROCESS, os.getpid()) != 7  # only the driver thread (and its children) lowered
    for p in procs:
        p.wait(timeout=30)
    assert [n for n, _, _ in log] == ["a", "b", "c", "d"]
    assert max(alive for _, _, alive in log) <= 1  # each start saw at most one other still going
    assert log[2][1] - log[0][1] >= 0.25  # c waited for a slot: a or b had to end first


def test_started_processes_run_at_the_queues_niceness_as_the_kernel_reports():
    q, _ = _queue(["long"], seconds=5)
    proc = q.get("long", timeout=30)
    try:
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 7
    finally:
        proc.kill()
        proc.wait()


def test_a_fixtures_own_jobs_go_first_and_a_failed_start_raises_in_get():
    q, log = _queue(["x", "y", "z"], at_once=1, seconds=0.2)

    def broken():
        raise RuntimeError("torchrun missing")

    q.register("broken", broken, lambda h: True)
    q.want(["x", "y", "z"])
    q.want(["z"], first=True)
    with pytest.raises(RuntimeError, match="torchrun missing"):
        q.get("broken", timeout=30)
    for n in "xyz":
        q.get(n, timeout=30).wait(timeout=30)
    order = [n for n, _, _ in log]
    assert order.index("z") < order.index("y")
    with pytest.raises(KeyError):
        q.want(["never-registered"])


def test_a_fixture_names_its_jobs_for_collection():
    @needs("a", "b")
    def fixture_function():
        return None

    assert fixture_function.prestart == ("a", "b")
