"""compare.py and tables.py on real CPU runs: what a user reads off the comparison table must be true.

The expected numbers come from the model's own parameter count (gpt-tiny, fp32) and from what ZeRO /
FSDP do by definition (ZeRO-3 holds 1/N of the parameters; DDP all-reduces every gradient once),
never from the code under test.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest
from cpu_runs import ANALYSIS, MODEL, NPROC, STEPS, label, needs, real_runs

from shardlab import compare as C
from shardlab import tables as T
from shardlab.models import resolve_model
from shardlab.plan import PlanError

FULL = resolve_model(MODEL).params * 4  # fp32 bytes of one full copy of the parameters


@pytest.fixture(scope="session")
@needs(*ANALYSIS)
def runs():
    return real_runs()


@pytest.fixture(scope="session")
def table(runs):
    return C.compare([r.dir for r in runs])


def test_one_row_per_run_with_setup_and_throughput(table):
    assert list(table.index) == [label("fsdp2", "zero3"), label("deepspeed", "zero3"), label("fsdp1", "ddp")]
    assert list(table["framework"]) == ["fsdp2", "deepspeed", "fsdp1"]
    assert list(table["strategy"]) == ["zero3", "zero3", "ddp"]
    assert set(table["world_size"]) == {NPROC} and set(table["precision"]) == {"fp32"} and set(table["offload"]) == {"none"}
    assert set(table["status"]) == {"completed"} and set(table["steps"]) == {STEPS}
    assert (table["tokens_per_s"] > 0).all() and (table["tflops"] > 0).all()
    assert table["mfu"].isna().all()  # no GPU peak to divide by on a CPU


def test_model_states_per_rank_follow_the_sharding(table):
    ddp, z3 = table.loc[label("fsdp1", "ddp")], table.loc[label("fsdp2", "zero3")]
    assert ddp["params_bytes"] == FULL and ddp["grads_bytes"] == FULL
    assert ddp["optimizer_bytes"] == 2 * FULL  # Adam: exp_avg + exp_avg_sq
    assert z3["params_bytes"] * NPROC == pytest.approx(FULL, rel=0.02)
    assert z3["state_bytes"] * NPROC == pytest.approx(ddp["state_bytes"], rel=0.02)


def test_predictions_sit_beside_measurements(table):
    for run, row in table.iterrows():
        assert row["peak_pred_bytes"] > 0 and row["state_pred_bytes"] > 0 and row["comm_pred_bytes"] > 0, run
        assert row["state_error"] == pytest.approx((row["state_bytes"] - row["state_pred_bytes"]) / row["state_pred_bytes"])
        assert row["peak_source"] == "process RSS (CPU)" and row["peak_bytes"] > 0
        assert pd.isna(row["peak_error"])  # RSS is no measure of a GPU prediction
    # FSDP keeps exactly fp32 params + grads + two Adam states: the estimator must say the same.
    for run in (label("fsdp2", "zero3"), label("fsdp1", "ddp")):
        assert abs(table.loc[run, "state_error"]) < 0.05, table.loc[run, ["state_bytes", "state_pred_bytes"]]


def test_communication_measured_per_collective(runs, table):
    comm = C.comm_frame(runs)
    measured = comm[comm["kind"] == "measured"].set_index(["run", "collective"])["bytes"]
    assert measured[(label("fsdp1", "ddp"), "all_reduce")] == FULL
    assert measured[(label("fsdp2", "zero3"), "reduce_scatter")] == FULL
    assert measured[(label("fsdp2", "zero3"), "all_gather")] == 2 * FULL  # forward and backward
    assert table.loc[label("fsdp2", "zero3"), "comm_bytes"] == 3 * table.loc[label("fsdp1", "ddp"), "comm_bytes"]
    assert set(comm["kind"]) == {"measured", "predicted"}


def test_losses_agree_across_frameworks_and_reference_is_selectable(runs, table):
    assert table.attrs["reference"] == label("fsdp2", "zero3")
    assert table.loc[label("fsdp2", "zero3"), "loss_diff"] == 0
    assert (table["loss_max_abs_diff"] < 1e-4).all()
    assert table["final_loss"].between(1, 20).all()
    by_label = C.compare(runs, reference=label("fsdp1", "ddp"))
    assert by_label.attrs["reference"] == label("fsdp1", "ddp") and by_label.loc[label("fsdp1", "ddp"), "loss_diff"] == 0
    by_dir = C.compare(runs, reference=runs[1].dir)
    assert by_dir.loc[label("deepspeed", "zero3"), "loss_diff"] == 0
    with pytest.raises(PlanError, match="reference="):
        C.compare(runs, reference="no-such-run")


def test_run_objects_and_folders_give_the_same_table(runs, table):
    pd.testing.assert_frame_equal(C.compare(runs), table)


def test_long_frames_have_documented_shapes(runs):
    loss = C.loss_frame(runs)
    assert set(loss.columns) >= {"run", "framework", "sharding", "step", "loss"} and len(loss) == 3 * STEPS
    ph = C.phase_frame(runs)
    assert set(ph["phase"]) == {"forward", "backward", "optimizer"} and (ph["end_s"] >= ph["start_s"]).all()
    tl = C.timeline_frame(runs)
    assert len(tl) and (tl["bytes"] > 0).any() and (tl["seconds"] >= 0).all()
    mb = C.memory_breakdown(runs)
    assert set(mb["kind"]) == {"predicted", "measured"} and set(mb["part"]) >= set(C.STATE_PARTS)


def test_bad_run_folders_are_bad_input(tmp_path):
    with pytest.raises(PlanError, match="run_dir=.*not a directory"):
        C.compare([tmp_path / "missing"])
    with pytest.raises(PlanError, match="no plan.yaml"):
        C.compare([tmp_path])
    with pytest.raises(PlanError, match="no runs given"):
        C.compare([])


def test_style_compare_units_separators_and_best(table):
    html = C.style_compare(table).to_html()
    # bytes in the binary unit that fits each column, named in the header (gpt-tiny: KiB/MiB, not 0.000 GiB)
    assert re.search(r"peak \((KiB|MiB|GiB)\)", html) and re.search(r"states/rank \((KiB|MiB|GiB)\)", html)
    assert "tokens/s per device" in html
    assert f"{resolve_model(MODEL).params:,}" in html  # thousands separators
    # The best tokens/s cell (and only cells in "best" columns) carry the highlight.
    row, col = table.index.get_loc(table["tokens_per_s"].idxmax()), table.columns.get_loc("tokens_per_s")
    bold = " ".join(sel for sel, body in re.findall(r"([^{}]+)\{([^}]*)\}", html) if "font-weight: bold" in body)
    assert re.search(rf"_row{row}_col{col}\b", bold)
    worst = table.index.get_loc(table["tokens_per_s"].idxmin())
    assert not re.search(rf"_row{worst}_col{col}\b", bold)


# --------------------------------------------------------------------------------------------
# Comparison tables


def test_tables_are_data_with_sources():
    tables = T.all_tables()
    assert set(tables) == {"features", "offloading", "precision", "launchers", "when to use which", "claims"}
    for name, df in tables.items():
        assert len(df) >= 4, name
        assert df["source"].astype(str).str.len().gt(5).all(), name
    topics = set(T.features().index)
    assert {"sharding", "offload", "model loading", "checkpointing", "prefetch", "wrapping", "torch.compile", "gradient accumulation"} <= topics
    assert set(T.features().columns) >= {"fsdp1", "fsdp2", "deepspeed", "verified_by", "verified"}


def test_rows_are_verified_by_the_frameworks_not_by_shardlab():
    """Rows about what a framework can do are checked against the installed framework's API; the
    plan rules that refuse the same things are shown beside them as shardlab's agreement."""
    for df in (T.features(), T.offloading(), T.precision(), T.when_to_use()):
        checked = df[df["verified_by"].str.startswith("framework API")]
        assert checked["verified"].eq(True).all(), checked[checked["verified"] != True]["verified_by"].tolist()  # noqa: E712
        assert not df["verified_by"].str.startswith("plan rule").any()
        rules = df[df["shardlab_rule"].str.len() > 0]
        assert len(rules) and rules["shardlab_refuses"].eq(True).all()
    assert T.features()["verified_by"].str.startswith("framework API").sum() >= 9


def test_the_api_check_can_fail(monkeypatch):
    """Negative control: a framework whose enum differs from what the row says is not verified."""
    import enum

    import torch.distributed.fsdp as fsdp

    from shardlab import tablecheck

    monkeypatch.setattr(fsdp, "ShardingStrategy", enum.Enum("ShardingStrategy", "FULL_SHARD OPTIMIZER_ONLY"))
    assert tablecheck.api("sharding")[1] is False


def test_launcher_rows_show_the_command_shardlab_builds():
    lt = T.launchers()
    assert lt.loc[["torchrun", "deepspeed", "accelerate launch"], "verified"].eq(True).all()  # their own parsers read it
    assert lt.loc["torchrun", "verified_by"].split(": ", 1)[1].startswith("torchrun --nnodes=2 --nproc-per-node=8")
    assert "--hostfile" in lt.loc["deepspeed", "verified_by"]
    assert "--num_processes=16" in lt.loc["accelerate launch", "verified_by"]


def test_claims_are_computed_by_the_estimator_live():
    from shardlab.estimate import estimate
    from shardlab.models import bare
    from shardlab.plan import Plan

    cl = T.claims().set_index("id")
    assert cl["shardlab"].notna().all() and cl["agrees"].notna().all()

    def comm(sharding):
        plan = Plan(framework="fsdp2", sharding=sharding, precision="fp32", topology={"nodes": 1, "gpus_per_node": 8})
        return estimate(plan, bare(7.5e9), "h100-80gb").to_dict()["comm_per_step"]["total"]

    assert cl.loc["comm_zero3_vs_ddp", "shardlab"] == pytest.approx(comm("zero3") / comm("ddp"), abs=1e-3)
    assert cl.loc["comm_zero3_vs_ddp", "agrees"]
    # The ZeRO paper's Figure 1 (7.5B parameters, 64 GPUs): model states per GPU in GB.
    for sharding, paper in (("ddp", 120), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9)):
        assert cl.loc[f"states_{sharding}", "shardlab"] == pytest.approx(paper, rel=0.03)
    assert "estimate:" in cl.loc["states_zero3", "verified_by"]
    # ZeRO++ paper: qwZ + hpZ + qgZ take ZeRO-3's cross-node volume from 3M to 0.75M (16-bit model)
    assert cl.loc["zeropp_inter_node", "shardlab"] == pytest.approx(0.25, abs=0.02)


def test_claims_checked_by_the_runs(runs):
    cl = T.claims(runs=runs).set_index("id")
    assert cl.loc["same_losses", "agrees"] and cl.loc["same_losses", "shardlab"] < 1e-3
    assert cl.loc["zero3_params_fraction", "shardlab"] == pytest.approx(1.0, abs=0.05)
    assert cl.loc["zero3_params_fraction", "verified_by"].startswith("runs:")


@pytest.mark.gpu
def test_cuda_run_compares_device_memory_and_mfu(tmp_path):
    """On a GPU: peak memory from the device (NVML or the allocator), an error against the prediction,
    MFU from the GPU table, and the part of the peak that is not model state shown as activations."""
    import torch

    import shardlab
    from shardlab.plan import Plan

    n = min(2, torch.cuda.device_count())
    plan = Plan(framework="fsdp2", sharding="zero3", precision="bf16", topology={"nodes": 1, "gpus_per_node": n})
    run = shardlab.launch(plan, model=MODEL, steps=STEPS, nproc=n, device="cuda", out=tmp_path, timeout_s=300)
    assert run.wait() == "completed"
    row = C.compare([run]).iloc[0]
    assert row["device"] == "cuda" and row["peak_source"] != "process RSS (CPU)"
    assert row["peak_bytes"] > 0 and row["peak_allocated_bytes"] > 0 and pd.notna(row["peak_error"])
    assert 0 < row["mfu"] < 1
    parts = C.memory_breakdown([run]).query("kind == 'measured'")
    assert "activations" in set(parts["part"])
