"""The Tune tab / lab widget: an estimate-only search fills its table and Pareto plot; a tune
cancelled while its trial trains stops, and leaves no process of that run alive."""

from __future__ import annotations

import time

import psutil
import pytest

from shardlab.run.store import load_run
from shardlab.tune import Space


def test_dry_run_fills_the_table_and_the_plot_without_starting_anything(tmp_path):
    from shardlab_widgets import TuneRunner

    space = Space(frameworks=("fsdp2", "deepspeed"), shardings=("zero2", "zero3"), offloads=("none",), micro_batches=(1, 4),
                  compile=(False,), knobs=False)
    w = TuneRunner(out=str(tmp_path / "runs"), space=space)
    w.dry_run.value = True
    w.start()
    r = w.wait(timeout=60)
    assert r is not None and r.stop == "estimate-only" and r.pick is not None
    assert len(w.table.object) > 0 and w.plot.objects and not (tmp_path / "runs").exists()
    assert "completed" in w.status.object and w.start_button.disabled is False


@pytest.mark.heavy  # a real trial started and cancelled: ~15 s alone, ~50 s on the shared 2-core machine
def test_cancel_during_a_trial_ends_its_processes(tmp_path):
    from shardlab_widgets import TuneRunner

    space = Space(frameworks=("fsdp2",), shardings=("zero2",), offloads=("none",), checkpointing=(False, True),
                  micro_batches=(2,), compile=(False,), knobs=False)
    w = TuneRunner(out=str(tmp_path / "runs"), budget="2", space=space, steps=200)
    w.start()
    end = time.monotonic() + 120
    run_dir = None
    while time.monotonic() < end:  # until the first trial's run has trained a step
        w.poll()
        dirs = [d for d in (tmp_path / "runs").glob("2*") if d.is_dir()]
        if dirs and load_run(dirs[0]).info.get("steps_done"):
            run_dir = dirs[0]
            break
        time.sleep(0.3)
    assert run_dir is not None, "the trial never trained a step"
    pids = [p["pid"] for p in load_run(run_dir).info["processes"]]
    w.cancel()
    r = w.wait(timeout=60)
    assert r.stop == "cancelled" and "cancelled" in w.status.object
    assert load_run(run_dir).status == "cancelled"
    assert [t["status"] for t in w.trial_frame().to_dict("records")] == ["cancelled"]
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive
