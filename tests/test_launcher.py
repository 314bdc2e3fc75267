"""The launcher and the run store, with real CPU runs of the real worker (gpt-tiny, 2 ranks, 3 steps).

Two runs are started at the same time once for the module; the tests then read what they left behind.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from proc import leftovers

from shardlab.export.launch import launch_command
from shardlab.plan import PlanError, load_plan
from shardlab.run.launcher import launch
from shardlab.run.progress import Progress
from shardlab.run.store import list_runs, load_run, read_jsonl

PY = sys.executable
PLAN = {"framework": "fsdp2", "sharding": "zero3", "precision": "bf16", "topology": {"gpus_per_node": 2}}
STEPS = 3
FAKE_SECRET = "SHARDLAB_TEST_API_KEY"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def two_runs(store):
    """Two runs launched at once; one streams through on_event, the other is iterated. (`shardlab run
    --json` in a new interpreter: test_usermodel_runs.py's factory run checks its line.)"""
    os.environ[FAKE_SECRET] = "do-not-record-me"
    seen: list[dict] = []
    try:
        a = launch(PLAN, model="gpt-tiny", steps=STEPS, device="cpu", out=store, on_event=seen.append, timeout_s=240)
        b = launch(PLAN, model="gpt-tiny", steps=STEPS, device="cpu", out=store, seed=1, timeout_s=240)
    finally:
        os.environ.pop(FAKE_SECRET, None)
    streamed = list(b)  # blocks until b ends
    a.wait(timeout=300)
    return a, b, seen, streamed


@pytest.mark.timeout(400)
def test_two_runs_at_once_complete_on_their_own_ports(two_runs):
    a, b, _, _ = two_runs
    assert a.id != b.id and a.dir != b.dir
    assert a.status == "completed", a.info
    assert b.status == "completed", b.info
    ports = {json.loads((r.dir / "launch.json").read_text())["master_port"] for r in (a, b)}
    assert len(ports) == 2
    for r in (a, b):
        m = r.metrics
        assert sorted(m["rank"].unique()) == [0, 1]
        assert len(m) == 2 * STEPS
        assert r.info["steps_done"] == STEPS
        assert not leftovers(r.dir)
    # seed 0 and seed 1 draw different batches: the runs really are separate
    assert a.metrics.sort_values(["step", "rank"])["loss"].tolist() != b.metrics.sort_values(["step", "rank"])["loss"].tolist()


def test_event_stream_and_callback_deliver_every_metrics_line_then_the_status(two_runs):
    a, b, seen, streamed = two_runs
    for items, run in ((seen, a), (streamed, b)):
        metrics = [x for x in items if x["type"] == "metrics"]
        assert len(metrics) == 2 * STEPS
        assert {(x["rank"], x["step"]) for x in metrics} == {(int(r), int(s)) for r, s in zip(run.metrics["rank"], run.metrics["step"])}
        assert {x["event"] for x in items if x["type"] == "event"} >= {"start", "done"}
        assert items[0] == {"type": "status", "status": "running", "id": run.id}
        assert items[-1] == {"type": "status", "status": "completed", "id": run.id}


def test_run_folder_holds_every_file_with_the_contract_keys(two_runs):
    a = two_runs[0]
    for name in ("plan.yaml", "run.json", "launch.json", "status.json", "metrics.jsonl", "events.jsonl", "timeline.jsonl"):
        assert (a.dir / name).is_file(), name
    assert load_plan(a.dir / "plan.yaml").topology.gpus_per_node == 2
    cfg = json.loads((a.dir / "run.json").read_text())
    assert cfg == {"model": "gpt-tiny", "steps": STEPS, "device": "cpu", "seed": 0, "factory": None,
                   "trace_memory": False, "instrument": True}
    st = json.loads((a.dir / "status.json").read_text())
    for key in ("status", "exit_codes", "failed_rank", "error", "phase", "started_at", "ended_at", "steps_done", "model"):
        assert key in st, key
    assert st["ended_at"] > st["started_at"] and st["model"] == "gpt-tiny" and st["failed_rank"] is None
    for line in read_jsonl(a.dir / "metrics.jsonl"):
        for key in ("step", "rank", "loss", "state_bytes", "comm_bytes"):
            assert key in line
        assert set(line["state_bytes"]) >= {"params", "grads", "optimizer"}
    # every rank's own output, linked by global rank
    for r in (0, 1):
        for stream in ("stdout", "stderr"):
            assert (a.dir / "logs" / f"rank{r}.{stream}.log").exists()


def test_launch_json_is_the_exported_command_and_keeps_secrets_out(two_runs):
    a = two_runs[0]
    rec = json.loads((a.dir / "launch.json").read_text())
    (agent,) = rec["agents"]
    argv = [x for x in agent["argv"] if not x.startswith(("--log-dir=", "--redirects="))]
    expect, _ = launch_command(load_plan(PLAN), ["-m", "shardlab.run.worker", str(a.dir)], nproc_per_node=2,
                               master_port=rec["master_port"], run_id=a.id, torchrun=[PY, "-m", "torch.distributed.run"])
    assert argv == expect
    env = agent["env"]
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["PYTHONUNBUFFERED"] == "1" and env["DS_ACCELERATOR"] == "cpu"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert FAKE_SECRET not in env and "do-not-record-me" not in json.dumps(rec)


def test_timeline_samples_each_rank_at_least_10_times_a_second_on_the_metrics_clock(two_runs):
    for run in two_runs[:2]:
        tl, m = run.timeline, run.metrics
        assert set(tl["source"]) == {"rss"} and (tl["bytes"] > 0).all()
        for rank, g in tl.groupby("rank"):
            span = g["t"].max() - g["t"].min()
            assert span > 1.0
            assert len(g) / span >= 10, (rank, len(g), span)
        # the same clock as the worker's phase stamps: the samples cover every step, and each one is
        # labelled with the step and phase its rank was in
        assert tl["t"].min() <= m["t_start"].min() and tl["t"].max() >= m["t_opt_end"].max()
        assert "setup" in set(tl["phase"]) and set(tl["phase"]) & {"forward", "backward", "optimizer"}
        inside = tl[tl["phase"].isin(["forward", "backward", "optimizer"])].merge(m, on=["rank", "step"])
        assert len(inside) and ((inside["t"] >= inside["t_start"]) & (inside["t"] < inside["t_opt_end"])).all()


def test_runs_load_back_after_the_fact_and_are_listed(two_runs, store):
    a, b = two_runs[:2]
    again = load_run(a.dir)
    assert again.status == "completed" and again.id == a.id
    assert again.metrics.shape == a.metrics.shape and len(again.timeline) == len(a.timeline)
    df = list_runs(store)
    assert set(df["id"]) >= {a.id, b.id}
    assert (df.set_index("id").loc[[a.id, b.id], "status"] == "completed").all()
    out = subprocess.run([PY, "-m", "shardlab.cli", "runs", str(store)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and a.id in out.stdout and b.id in out.stdout


def test_load_run_of_a_folder_that_is_not_a_run_is_bad_input(tmp_path):
    with pytest.raises(PlanError, match="not a run folder"):
        load_run(tmp_path)


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": 0}, "steps"),
    ({"plan": {"framework": "deepspeed", "sharding": "zero3", "zeropp": {"quantized_weights": True}, "topology": {"gpus_per_node": 2}}}, "zeropp.quantized_weights"),
    ({"plan": {"framework": "deepspeed", "sharding": "zero3", "zeropp": {"quantized_gradients": True}, "topology": {"gpus_per_node": 2}}}, "zeropp.quantized_gradients"),
    ({"model": 7e9}, "model"),
    ({"model": "gpt-tinyy"}, "--model"),
    ({"plan": {"framework": "fsdp2", "sharding": "zero1"}}, "sharding"),
    ({"device": "tpu"}, "device"),
    ({"launcher": "mpirun"}, "launcher"),
    ({"instrument": "sometimes"}, "instrument"),
    ({"profile_step": 3}, "profile_step"),  # past the run's 2 steps
    ({"profile_step": "2"}, "profile_step"),
    # from Python these started a run that failed later, or raised a TypeError (session 19)
    ({"timeout_s": "x"}, "timeout_s"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"seed": "x"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"out": 5}, "out"),
])
def test_runner_level_bad_input_is_refused_before_anything_starts(tmp_path, kwargs, field):
    args = {"plan": PLAN, "model": "gpt-tiny", "steps": 2, "device": "cpu", "out": tmp_path, **kwargs}
    with pytest.raises(PlanError) as e:
        launch(args.pop("plan"), **args)
    assert e.value.findings[0].field == field
    assert not any(tmp_path.iterdir())  # no run folder for a refused run


def test_more_processes_than_gpus_is_bad_input(tmp_path, monkeypatch):
    import shardlab.run.host as host

    monkeypatch.setattr(host, "gpu_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(PlanError, match="needs 2 GPUs") as e:
        launch(PLAN, model="gpt-tiny", steps=2, device="cuda", nproc=2, out=tmp_path)
    assert e.value.findings[0].field == "nproc"


def test_a_model_this_machines_memory_cannot_hold_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """A 6.7B-parameter hf:llama on the 24 GiB machine's CPU started, and the kernel's out-of-memory killer ended its rank
    ("rank 0 was killed by SIGKILL", exit 1). llama-70b's fp32 weights alone (282 GB) are past any machine this runs on."""
    with pytest.raises(PlanError, match=r"needs at least \d+\.\d GiB of this machine's memory for its training states") as e:
        launch(PLAN, model="llama-70b", steps=2, device="cpu", out=tmp_path)
    assert e.value.findings[0].field == "model" and not any(tmp_path.iterdir())
    import shardlab.run.host as host

    # the bound by the build: each rank builds the whole model in fp32 (2 x 4 B x 169,728 for gpt-tiny), unless
    # low_memory_init leaves it to rank 0
    monkeypatch.setattr(host, "available_memory", lambda: 4 * 169_728 + 1)
    with pytest.raises(PlanError, match="each of its 2 processes") as e:
        host.check_host_memory(load_plan(PLAN), 169_728, 2, "cuda", "gpt-tiny", zero_init=False)
    assert "low_memory_init: true" in str(e.value)
    host.check_host_memory(load_plan({**PLAN, "low_memory_init": True}), 169_728, 2, "cuda", "gpt-tiny", zero_init=False)


def test_deepspeed_fp16_on_a_cpu_is_bad_input(tmp_path):
    plan = {"framework": "deepspeed", "sharding": "zero2", "precision": "fp16", "topology": {"gpus_per_node": 2}}
    with pytest.raises(PlanError, match="bf16") as e:
        launch(plan, model="gpt-tiny", steps=2, device="cpu", out=tmp_path)
    assert e.value.findings[0].field == "precision"


def test_cli_run_bad_steps_exits_2_without_traceback(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("framework: fsdp2\n")
    out = subprocess.run([PY, "-m", "shardlab.cli", "run", str(plan), "--model", "gpt-tiny", "--steps", "0",
                          "--device", "cpu", "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "steps=0" in out.stderr and "Traceback" not in out.stderr


def test_progress_bar_counts_steps_every_rank_finished():
    buf = io.StringIO()
    bar = Progress(total=2, world_size=2, desc="t", file=buf)
    bar.update({"rank": 0, "step": 1, "loss": 2.5, "step_time_s": 0.1})
    assert bar.bar.n == 0  # rank 1 has not finished step 1 yet
    bar.update({"rank": 1, "step": 1, "loss": 2.5})
    bar.update({"rank": 0, "step": 2, "loss": 2.4})
    bar.update({"rank": 1, "step": 2, "loss": 2.4})
    bar.close("completed")
    assert bar.bar.n == 2 and "completed" in buf.getvalue() and "2.4" in buf.getvalue()
