"""Issue 4's matrix on CPU through launch(): every sharding of FSDP1, FSDP2 and DeepSpeed (offload and
hpZ included, hybrid as two "nodes" of two processes on this machine) trains gpt-tiny with metrics
from every rank; and what the ranks measured agrees with the estimator.

The runs are the suite's shared CPU runs (cpu_runs.py: each setup trains once, a few at a time, and
test_worker and the analysis tests read the same runs). The estimator is asked about each run's own
plan.yaml (fp32; DeepSpeed ZeRO-3 with a persistence threshold of 0), so it predicts what ran.
"""

from __future__ import annotations

import math

import pytest
from cpu_runs import SETUPS, STEPS, cpu_runs

from shardlab.estimate import estimate


@pytest.fixture(scope="module")
def runs():
    return cpu_runs(list(SETUPS))


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", list(SETUPS))
def test_each_setup_completes_with_metrics_from_every_rank(runs, name):
    run = runs[name]
    assert run.status == "completed", (run.info.get("error"), run.info.get("failed_rank"))
    world = run.plan.world_size
    m = run.metrics
    assert sorted(m["rank"].unique()) == list(range(world))
    assert len(m) == world * STEPS
    assert (m["world_size"] == world).all()
    assert all(math.isfinite(x) for x in m["loss"])
    # the ranks train one model: within a step every rank reports the same (averaged) loss
    assert (m.groupby("step")["loss"].nunique() == 1).all()


def _last_step(run):
    m = run.metrics
    return m[m["step"] == m["step"].max()]


# DeepSpeed 0.19.8's ZeRO-3 keeps an fp32 master partition even in fp32: stage3.py's _create_fp32_partitions
# would reuse the parameter partition only where `partition.device == self.device`, a torch.device compared
# with the string 'cpu' (or 'cuda:N'), which is never equal; so it clones. The estimator (estimate/memory.py)
# counts no master for ZeRO-3 in fp32, 2/3 of what the ranks hold. Seen 2026-12-01 when these runs became
# fp32 (they were bf16, where both count the master). Estimator code is issue 13's: drop the mark with its fix.
_DS3_FP32_MASTER = pytest.mark.xfail(strict=True, reason="estimator counts no fp32 master for DeepSpeed ZeRO-3 in fp32")


@pytest.mark.parametrize("name, part", [
    *((n, p) for n in ("fsdp1-zero3", "fsdp2-zero3") for p in ("params", "grads", "optimizer")),
    ("deepspeed-zero3", "params"), ("deepspeed-zero3", "grads"),
    pytest.param("deepspeed-zero3", "optimizer", marks=_DS3_FP32_MASTER)])
def test_model_state_bytes_per_rank_under_zero3_match_the_estimator_within_5_percent(runs, name, part):
    run = runs[name]
    assert run.status == "completed"
    predicted = estimate(run.plan, "gpt-tiny").to_dict()["per_gpu"][part]
    for _, row in _last_step(run).iterrows():
        measured = row[f"state_bytes.{part}"]
        assert measured == pytest.approx(predicted, rel=0.05), (name, int(row["rank"]), part, measured, predicted)


@pytest.mark.parametrize("name", list(SETUPS))
def test_comm_bytes_per_step_match_the_estimator_within_10_percent(runs, name):
    run = runs[name]
    assert run.status == "completed"
    est = estimate(run.plan, "gpt-tiny").to_dict()["comm_payload_per_step"]
    for _, row in _last_step(run).iterrows():
        measured = {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("comm_bytes.") and v == v}
        total = est["total"]
        assert sum(measured.values()) == pytest.approx(total, rel=0.10), (name, int(row["rank"]), measured, est)
        for coll, predicted in est.items():
            if coll == "total":
                continue
            got = measured.get(coll, 0)
            if predicted:
                assert got == pytest.approx(predicted, rel=0.10), (name, int(row["rank"]), coll, got, predicted)
            else:
                # the estimator leaves out scalar collectives (overflow checks, norms): a few bytes
                assert got < 0.01 * total, (name, int(row["rank"]), coll, got)
