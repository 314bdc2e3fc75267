"""The background queue of the suite's shared runs (_prestart.py), with `sleep` processes for runs: what is
started runs at the lowered priority the kernel reports (pytest's own threads do not), in order, a
fixture's own jobs first, never more than at_once at a time, and a start that fails fails the test that
needs it; a run the driver starts while a foreground test has changed os.environ and the working folder
starts from the suite's collection-time environment and folder (one real torchrun with the stand-in worker).
A Queue of its own, so the suite's queue (busy with real runs in a whole-suite session) is not touched.
About ten seconds."""

from __future__ import annotations

import json
import os
import subprocess
import time

import _prestart
import psutil
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


@pytest.mark.timeout(120)
def test_a_run_started_in_the_background_ignores_the_foregrounds_environment_and_folder(tmp_path, monkeypatch):
    """What failed 13 tests of the fresh clone at 7288d3a: the driver thread started runs with whatever
    os.environ a foreground test had at that moment. Here the foreground changes a recorded variable, plants
    one and replaces PYTHONPATH, and leaves the repository folder (the stand-in worker is imported from it as
    tests.standin_worker, like a module:function factory); the run must not see any of it."""
    assert _prestart.ENV, "conftest takes the collection-time snapshot"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("SHARDLAB_FOREGROUND_ONLY", "planted")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent/foreground-only")
    monkeypatch.chdir(tmp_path)
    q = Queue(at_once=1, nice=7)
    plan = {"framework": "fsdp2", "sharding": "zero3", "topology": {"gpus_per_node": 2}}
    q.register("run", lambda: _prestart.launch(plan, steps=3, device="cpu", out=tmp_path / "runs", timeout_s=60,
                                               worker_module="tests.standin_worker"),
               lambda run: run.done, _prestart.run_pids)
    run = q.get("run", timeout=60)
    agent_env = psutil.Process(run.agents[0].pid).environ()  # read from the kernel: what the agent really got
    assert "SHARDLAB_FOREGROUND_ONLY" not in agent_env and "foreground-only" not in agent_env.get("PYTHONPATH", "")
    assert agent_env["OMP_NUM_THREADS"] != "7"
    recorded = json.loads((run.dir / "launch.json").read_text())
    assert recorded["agents"][0]["env"]["OMP_NUM_THREADS"] == agent_env["OMP_NUM_THREADS"]
    assert recorded["cwd"] == _prestart.CWD != str(tmp_path)
    run.wait(timeout=90)
    assert run.status == "completed", (run.dir / "logs" / "agent0.log").read_text()[-2000:]
