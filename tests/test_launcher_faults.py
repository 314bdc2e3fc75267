"""Faults of real CPU runs (real worker, gpt-tiny, 2 ranks): a killed rank, out of memory, a hang,
cancel() and Ctrl-C. Each must end in the right status, name what failed, and leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from proc import leftovers, start_cli_run

from shardlab.run.launcher import launch

PLAN = {"framework": "fsdp2", "sharding": "zero3", "topology": {"gpus_per_node": 2}}
MANY = 500  # steps: more than a test ever waits for, so the run is still training when the fault comes


def first_step(run) -> int:
    """Wait until every rank has finished a step (one rank's first metrics line is not enough: rank 1 may
    still be inside its first step); return rank 1's pid (from its start event)."""
    for item in run:
        if item["type"] == "metrics" and run.steps_done > 0:
            break
        if item["type"] == "status" and item["status"] != "running":
            pytest.fail(f"run ended before its first step: {run.info}")
    ev = run.events
    return int(ev[(ev["event"] == "start") & (ev["rank"] == 1)]["pid"].iloc[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("oom_killer", [False, True])
def test_a_rank_killed_with_sigkill_fails_the_run_within_10s_naming_the_rank(tmp_path, monkeypatch, oom_killer):
    """A SIGKILL from a person fails the run; the same SIGKILL while the kernel's out-of-memory killer count rises
    (/proc/vmstat oom_kill, read at the start and at the end: faults.kernel_oom_kills) is out of memory, said so."""
    from shardlab.run import faults

    counts = iter([7, 7 + oom_killer])
    monkeypatch.setattr(faults, "kernel_oom_kills", lambda: next(counts))
    run = launch(PLAN, steps=MANY, device="cpu", out=tmp_path, timeout_s=240)
    pid = first_step(run)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert run.wait(timeout=30) == ("oom" if oom_killer else "failed")
    assert time.monotonic() - t0 < 10
    info = run.info
    assert info["failed_rank"] == 1
    assert "SIGKILL" in info["error"]
    assert ("out-of-memory killer (SIGKILL; the machine's oom_kill count rose from 7 to 8" in info["error"]) is oom_killer
    assert info["exit_codes"]["1"] == -9
    assert 0 < info["steps_done"] < MANY
    assert not leftovers(run.dir)


@pytest.mark.timeout(300)
def test_out_of_memory_becomes_status_oom_with_phase_and_memory(tmp_path):
    # 2048 sequences of gpt-tiny need ~1 GiB of activations; each rank may map 1.2 GiB in all.
    plan = {**PLAN, "micro_batch_size": 2048}
    run = launch(plan, steps=2, device="cpu", out=tmp_path, mem_limit_bytes=int(1.2 * 2**30), timeout_s=240)
    assert run.wait(timeout=280) == "oom", run.info
    info = run.info
    assert info["failed_rank"] in (0, 1)
    assert info["phase"] in ("forward", "backward", "optimizer")
    assert "allocate" in info["error"]
    assert info["memory_at_failure"]["rss_bytes"] > 100 * 2**20
    assert not leftovers(run.dir)


@pytest.mark.timeout(300)
def test_no_progress_for_timeout_s_ends_the_run_as_timeout(tmp_path):
    run = launch(PLAN, steps=MANY, device="cpu", out=tmp_path, timeout_s=15)
    pid = first_step(run)
    os.kill(pid, signal.SIGSTOP)  # rank 1 freezes; rank 0 waits for it in the next collective
    t0 = time.monotonic()
    assert run.wait(timeout=60) == "timeout"
    assert 10 < time.monotonic() - t0 < 30
    assert not leftovers(run.dir)


@pytest.mark.timeout(300)
def test_cancel_ends_every_process_within_5s(tmp_path):
    run = launch(PLAN, steps=MANY, device="cpu", out=tmp_path, timeout_s=240)
    first_step(run)
    t0 = time.monotonic()
    run.cancel()
    assert time.monotonic() - t0 < 5
    assert run.status == "cancelled"
    assert not leftovers(run.dir)
    assert json.loads((run.dir / "status.json").read_text())["ended_at"] is not None


@pytest.mark.timeout(300)
def test_ctrl_c_on_the_cli_cancels_the_run(tmp_path):
    cli, run_dir = start_cli_run(tmp_path, MANY)
    try:
        cli.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = cli.communicate(timeout=30)
        assert time.monotonic() - t0 < 5 + 1  # the CLI prints and exits right after the processes are gone
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 1
    assert json.loads(out)["status"] == "cancelled"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "cancelled"
    assert not leftovers(run_dir)


@pytest.mark.timeout(300)
def test_a_run_launched_elsewhere_is_cancelled_through_load_run(tmp_path):
    """A notebook can stop a run the CLI (or another kernel) started: load_run(dir).cancel()."""
    from shardlab.run.store import load_run

    cli, run_dir = start_cli_run(tmp_path, MANY)
    try:
        run = load_run(run_dir)
        assert {p["role"] for p in run.info["processes"]} >= {"agent0", "rank0", "rank1"}
        t0 = time.monotonic()
        run.cancel()
        assert time.monotonic() - t0 < 5
        out, _ = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert json.loads(out)["status"] == "cancelled" and run.status == "cancelled"
    assert not leftovers(run.dir)
