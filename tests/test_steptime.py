"""Step time: the model's constants checked on GPU measurements they were not fitted to, the
calibration file's lookup, `shardlab calibrate` without a GPU, and every run reconciled with its
prediction (real CPU runs from cpu_runs.py, shared with the analysis tests).

The GPU rows are recorded measurements (benchmarks/results/, commands and dates in
docs/benchmarks.md): the H100 matrix and gap study (gpt-1b) and the H200 probe (other shapes).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from cpu_runs import ANALYSIS, needs, real_runs

from shardlab.estimate import estimate
from shardlab.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import steptime_accuracy  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _plain(o):
    """A Plan (issue 13's runner rows) in the pooling key. low_memory_init left out: it decides where
    the weights are first made, not the step (the HF set runs each configuration with it off and on)."""
    d = o.model_dump(mode="json")
    d.pop("low_memory_init", None)
    return d


@functools.lru_cache(maxsize=1)
def _rows() -> tuple:
    """Every recorded GPU row, with repeated measurements of one configuration pooled (median):
    the H100 ZeRO-3 rows ran 24 and 64 steps and differ by up to 47% run to run (docs/benchmarks.md).
    Computed once per session (12 tests read it; none changes it)."""
    pooled: dict[tuple, dict] = {}
    for r in steptime_accuracy.rows():
        plan = _plain(Plan.model_validate(r["plan"]) if isinstance(r["plan"], dict) else r["plan"])
        key = (r["gpu"], json.dumps(plan, sort_keys=True), json.dumps(r["model"], sort_keys=True))
        pooled.setdefault(key, {**r, "all": []})["all"].append(r["measured"])
    out = []
    for r in pooled.values():
        r["measured"] = statistics.median(r["all"])
        r["error"] = estimate(r["plan"], r["model"], r["gpu"], calibration=False).time["tokens_per_s"] / r["measured"] - 1
        out.append(r)
    return tuple(out)


def _named(rows, source, *names):
    return [r for r in rows if r["source"].startswith(source) and any(r["name"].startswith(n) for n in names)]


# Recorded rows the model misses by more than issue 14's 25% (uncalibrated), each with what is known.
# They stay in the test under a wider bound, so a change that makes them worse still fails.
# Left the list in session 21, back within 25%: #118, #508, #306, #1004, #1314 (DeepSpeed ZeRO-0/1 host-bound steps, once
# steptime._serial_share stopped adding SERIAL's share where the host is the longer side: -24.5, -24.4, -22.0, -20.5,
# -19.6%) and #909 (+23.8%, since session 18's host model). Their comments below stay as the history of each.
KNOWN_MISSES = {
    # session 6 (fidelity_h200_hf.json): after counting the real block's kernels (blockwork.py: 26 per
    # GPT-2 block against shardlab's 12) this row is predicted slow (-33%; -26% in session 7 with ZeRO-3's
    # host and GPU partly added and DS3_RECOMPUTE 1.0): the recomputed GPT-2 block's launches are over-counted
    "#406 hf-gpt2 deepspeed zero3": "HF GPT-2, ZeRO-3 + checkpointing: predicted 27% slow",
    # DeepSpeed ZeRO-0/1 on mid-size models, and #501: the host's work alone, as priced (launches, DeepSpeed's
    # per-tensor hooks and norms), exceeds the measured step, so no overlap can reach them: those hosts ran
    # DeepSpeed's host work 15-25% faster than the host probe's did (session 9: -26.1 / -24.9 / -23.9% before
    # the timeline, -29.8 / -26.7 / -26.4% with it, which also puts DeepSpeed's optimizer after its norm sync)
    "#501 llama80k deepspeed zero3": "held-out host: DeepSpeed's host work alone exceeds the measured step",
    # session 11's machine A (fidelity_h200_new.json, unseen): the same class as #508, a deep model (32 layers,
    # 390 parameter tensors) whose DeepSpeed host work as priced exceeds the measured step (-33.4%)
    "#703 gpt640x32 deepspeed zero1": "unseen host: DeepSpeed's host work alone exceeds the measured step",
    # session 18 (host priced by kernels and modules, hostcost.MODULE_KERNELS; the Llama block's 49 + 42 kernels counted on
    # an H200, where 24 + 48 were assumed): the same class, a Llama at micro-batch 1 on the validation host (-21.4% -> -28.4%)
    # (#115, FSDP2 + compile, was here at +27.1% until session 13 priced compile's host as eager's: -19.2%)
    # session 13's unseen set (fidelity_h200_new4b.json, machine E), after its changes:
    "#915 gpt1024x16 fsdp2 zero3": "predicted 41% fast: FSDP2 + compile (its eager twin #901 on another host +17%)",
    # session 16's unseen set (fidelity_h200_new5.json, one machine, calibrated there): the same class as #508 and
    # #703, now through transformers' blocks (Gemma: 45 counted kernels per block): the host's work as priced exceeds the
    # measured step (#1004: 116.6 ms of host for an 80.6 ms step; -38.5% until session 18, -27.3% with modules priced).
    # session 17's unseen set (fidelity_h200_new6.json, eight transformers architectures, one machine whose calibrate
    # timed 30.1 us of host per kernel against the default 45.5): every host-bound row predicted slow, whatever the
    # framework (the twins on a second machine, 34.0 us: #1109 -42.8% there, -27.3% here). Session 18's host model
    # (kernels and modules) brought #1103, #1105, #1106, #1117 and #1118 within 25% (-16.5 to -23.2%); these stay:
    "#1109 hf-olmo2 fsdp2": "fast unseen host: -36% (-18.5% on a second)",
    "#1111 hf-starcoder2 fsdp2": "fast unseen host: -37%", "#1112 hf-starcoder2 deepspeed": "fast unseen host: -40%",
    # session 18's third machine (fidelity_h200_new7c.json), the fastest host recorded (calibrate: 19.7 us per host unit
    # against the default 31.0): its twins of new7b's rows ran 9-25% faster than on machine 5, and this host-bound
    # DeepSpeed ZeRO-2 step with accumulation was predicted 36% slow
    "#1217 llama1280x14 deepspeed zero2": "fastest unseen host (0.64x the default per unit): -36%",
    # (session 20's #1308, +30.3% on the slowest host recorded (calibrate: 39.6 us per unit) and -15.9% on a fast one
    # (26.3 us), is not here: its twins pool to +2.2%, as #1305 -6.0 / -27.8% pools to -18.3% and #1310 -9.8 / -32.5% to
    # -22.7%; fidelity_h200_new8.json / new8c.json)
    # session 20's last machine (fidelity_h200_new8d.json, calibrate: 24.3 us per host unit, 0.78x the default), rows
    # written and predicted before they ran: host-bound steps predicted slow; with that machine's calibration (its host
    # unit applied since 2a4d404) -16.8% and -24.2%
    "#1315 hf-mistral-b fsdp2 zero3": "fast unseen host (0.78x the default per unit): -34%, calibrated -24%",
    # session 21's fourth machine for new8 (fidelity_h200_new8e.json, calibrate: 32.9 us per unit, 1.06x the default):
    # #1316 ran 18% faster there than on new8d's 24.3-us host (52,749 / 44,739 tokens/s), against its own probe; the
    # twins pool to -26.6%. The profile of its DeepSpeed ZeRO-1 neighbours there (host_split_h200_s21.json) measured
    # the GPU's busy time as predicted and the host 9% under it; the step was the host's, where the timeline adds
    # SERIAL["deepspeed"]'s share on top (docs/benchmarks.md, session 21)
    "#1316 gpt1024x12 deepspeed zero3": "ran 18% faster on a host probed slower: twins pool to -27%",
}
KNOWN_MISS_BAND = 0.45
WIDER: dict[str, float] = {}  # a known miss held to its own bound (none now: #309 left with ZeRO-3's offload copy)


# Measured on a host that ran the same plans up to 22% slower than another lent H200 had a session
# earlier (fsdp2 ddp mb16x1: 176,819 vs 227,415 tokens/s; docs/benchmarks.md, issue 20's grid): held to
# their own, wider band so that they still catch a model that drifts away from them.
# The gpt350cap grid (session 6, 17 of 32 configurations) ran on an allocator capped at 18 GiB: the
# rows at the cap (micro-batch 4 without checkpointing, predicted to reserve 20.4 GiB unconstrained)
# free and re-reserve the allocator's cache every step, which the step model does not price
# (fsdp1 zero2 mb4x2 +67%; +53% since FSDP1 is priced as the NO_SHARD it runs); each row is one 5-step timing.
# Issue 20's llama1b grid (session 9, nobody fitted to it; read only after the timeline was written): its
# first six rows (fsdp1 zero2, run first) ran while the machine was still busy: their step times fall within
# a run (1.05 -> 0.60 s), and FSDP1 at world size 1 is NO_SHARD whatever the plan says, so fsdp1 zero2 and
# fsdp1 zero3 are one program, yet the zero2 rows measured 11-46% slower than the zero3 rows run after them.
# Session 11's machine B (fidelity_h200_new2.json #710-717 and fidelity_h200_res16.json, the res set's #601/#602/#604
# again; no calibration made there): one host factor fitted to its 11 rows (calibrate.fit_from_runs) is x1.54,
# against x0.92 for machine A's nine rows (#701-709) and x1.14 for machine C's ten (#801-810), all three lent H200s
# of the same day; its one GPU-bound row (#712, fp32) is predicted 12% slow, as machine A's GPU-bound rows are. The
# res plans ran 15-40% slower there than on session 10's machine (#601: 116 ms per step over 14 timed steps, 92 over 2).
SLOW_HOST = {"tune_h200_gpt125_grid": (0.30, 0.60, 15), "tune_h200_gpt350cap_grid": (0.25, 0.60, 15),
             "tune_h200_llama1b_grid": (0.12, 0.35, 15), "fidelity_h200_new2": (0.40, 0.65, 8),
             "fidelity_h200_res16": (0.75, 0.80, 3)}  # source -> (median, each row, rows at least)


def test_slow_host_rows_stay_in_their_band():
    rows = _rows()
    for source, (median, each, n) in SLOW_HOST.items():
        errs = [abs(r["error"]) for r in rows if r["source"] == source]
        if source == "tune_h200_llama1b_grid" and not errs:
            continue  # recorded in session 9: absent from an older tree
        assert len(errs) >= n, source
        assert statistics.median(errs) <= median and max(errs) <= each, (source, statistics.median(errs), max(errs))


def test_every_recorded_gpu_row_within_25_percent_median_within_15_uncalibrated():
    rows = [r for r in _rows() if r["source"] not in SLOW_HOST]
    assert len(rows) >= 15
    errs = [abs(r["error"]) for r in rows]
    assert statistics.median(errs) <= 0.15
    for r in rows:
        known = any(r["name"].startswith(k) for k in KNOWN_MISSES)
        band = next((b for k, b in WIDER.items() if r["name"].startswith(k)), KNOWN_MISS_BAND if known else 0.25)
        assert abs(r["error"]) <= band, f"{r['source']} {r['name']}: {r['error']:+.1%}"


# Each fitted constant (steptime.py names its measurement) against rows it was not fitted to.
HELD_OUT = [
    # DS12_PARAM_S measured on the H200 host probe's tiny models -> gpt-1b's GPU-bound ZeRO-1/2 steps on
    # an H100, and the check set's ZeRO-0/1/2 rows (other shapes, run alone)
    ("DS12_PARAM_S", "gpu_validate_h100", ("deepspeed zero1 off=none", "deepspeed zero2 off=none"), 0.20),
    ("DS12_PARAM_S check", "fidelity_h200_check_alone", ("#105", "#110", "#114"), 0.25),  # #118: KNOWN_MISSES
    # DS3_MODULE_S / DS3_PARAM_S (H100 profile) -> the H200 host probe's ZeRO-3 rows, where the GPU's work is
    # negligible and the step is the host's alone (SERIAL["deepspeed_zero3"] was chosen on all H200 ZeRO-3
    # rows; DS3_RECOMPUTE fitted to the gpt125 grid's three checkpointing rows -> #113, #117)
    ("DS3_MODULE_S", "fidelity_h200_host", ("#204", "#213"), 0.15),
    ("DS3_RECOMPUTE", "fidelity_h200_check_alone", ("#113", "#117"), 0.25),
    # ALIGN_EFF measured by calibrate on an unaligned GEMM -> steps of GPT-2-vocabulary models
    # (gpt350m-fsdp1-mb8 left this list in session 9: FSDP1 at world size 1 is NO_SHARD, which makes it
    # host-bound, -19%; the all-rows test holds it to 25%)
    ("ALIGN_EFF", "steptime_probe_h200", ("gpt125m-mb8", "gpt350m-fsdp2"), 0.15),
    # FSDP's step is the host/GPU timeline's alone (no fitted overlap share since session 9; before, SERIAL
    # fitted to the first H200 probe's FSDP rows) -> the H100 FSDP rows
    ("timeline FSDP", "gpu_validate_h100", ("fsdp1", "fsdp2"), 0.15),
    # matmul / attention / HBM defaults from calibrate's micro-benchmarks -> GPU-bound training steps
    ("DEFAULT_*_EFF", "steptime_probe_h200", ("llama1b128k-mb", "llama3b", "llamawide", "gpt760m-fp32", "gpt2.5b"), 0.15),
    # DS3_OFFLOAD_COPY_BYTES_PER_S fitted to #309 on the validation host -> the held-out host's ZeRO-3 offload row
    ("DS3_OFFLOAD_COPY_BYTES_PER_S", "fidelity_h200_held", ("#505",), 0.15),
    # ZeRO-2 + optimizer offload + accumulation: a wait per parameter (stage_1_and_2.py; hostcost.py's
    # step_segments, no constant fitted) -> the gpt350cap grid's four such rows (no wait: +10 / +18 / +25 / +38%;
    # with it -1 / +2 / +11 / +17%)
    ("DS2 offload wait per block", "tune_h200_gpt350cap_grid",
     ("deepspeed zero2 mb2x4 offload-optimizer", "deepspeed zero2 mb4x2 offload-optimizer"), 0.20),
    # checkpointing's recomputed forward priced at the forward's host rate (hostcost.host_units since session 18; no constant
    # fitted; AC_BLOCK_S re-derived on its own four rows) -> the llama1b grid's DeepSpeed checkpointing rows at
    # micro-batch 1-2, host-bound (at the step's mean kernel cost: +20.4 / +18.5 / +16.9 / +22.3%)
    ("recompute at forward rate", "tune_h200_llama1b_grid",
     ("deepspeed zero2 mb1x4 ac", "deepspeed zero2 mb2x2 ac", "deepspeed zero3 mb1x4 ac", "deepspeed zero3 mb2x2 ac"), 0.20),
    # ATTN_HD_EXP (flash attention's T0 grows below head_dim 128), fitted to the calibrations' SDPA points ->
    # GPU-bound steps of gpt-125m (head_dim 64, T 1024) that the tune trials timed (pooled repeats; at the earlier
    # (head_dim/128)^0.4 factor +9.1 / +11.3 / +8.1 / +19.6 / +20.0%, with it +6.6 / +8.7 / +5.6 / +16.9 / +16.5%)
    ("ATTN_HD_EXP", "tune_h200_gpt125 trials",
     ("fsdp1 ddp mb16x1", "fsdp2 ddp mb16x1", "fsdp1 zero3 mb16x1", "fsdp2 zero3 mb16x1", "deepspeed ddp mb16x1"), 0.18),
    # fp32 attention measured at head_dim 128 only -> a head_dim 64 fp32 step (the widest band here)
    ("DEFAULT_ATTN_EFF fp32", "steptime_probe_h200", ("llama1b128k-fp32",), 0.25),
]


@pytest.mark.parametrize("const,source,names,band", HELD_OUT, ids=[h[0] for h in HELD_OUT])
def test_constants_hold_on_rows_they_were_not_fitted_to(const, source, names, band):
    rows = _named(_rows(), source, *names)
    assert rows, f"no recorded rows for {const}"
    for r in rows:
        assert abs(r["error"]) <= band, f"{const}: {r['source']} {r['name']} predicted {r['error']:+.1%}"


def test_optimizer_offload_costs_what_the_same_host_measured():
    """What offloading the optimizer adds to a DeepSpeed ZeRO-3 step, judged as a difference of two runs on one
    host: #309 (CPU Adam) minus #305 (the same plan on the GPU's optimizer), measured on two lent H200 hosts
    (fidelity_h200_val.json 0.78 s, fidelity_h200_val_s6.json 1.06 s). Before ZeRO-3's converting, pageable copy
    back (steptime.py DS3_OFFLOAD_COPY_BYTES_PER_S) the model gave 0.53 s: -32% and -50%."""
    rows = {(r["source"], r["name"].split()[0]): r for r in steptime_accuracy.rows()}
    for source in ("fidelity_h200_val", "fidelity_h200_val_s6"):
        off, on_gpu = rows[(source, "#309")], rows[(source, "#305")]
        measured, predicted = [], []
        for r in (off, on_gpu):
            t = estimate(r["plan"], r["model"], r["gpu"], calibration=False).time
            measured.append(t["tokens_per_step"] / r["measured"])
            predicted.append(t["step_time_s"])
        d_meas, d_pred = measured[0] - measured[1], predicted[0] - predicted[1]
        assert d_pred == pytest.approx(d_meas, rel=0.25), (source, d_pred, d_meas)


def test_zero3_offload_gradient_round_trip_per_micro_step():
    """DeepSpeed ZeRO-3 with the optimizer offloaded accumulates gradients in a CPU buffer: every micro-step
    copies each gradient partition through PCIe and back (steptime.py DS3_GRAD_ROUNDTRIP_BYTES, read in
    stage3.py, not fitted). Judged on the gpt350cap grid (tune_h200_gpt350cap_grid.json), accumulation 4:
    the offload row minus the same plan without offload, measured 0.60 s (the two rows ran in different device
    calls, 2026-12-01 23:46 and 2026-12-02 05:59 UTC). Without the round trip the model gave 0.32 s (-47%); with
    it 0.52 s (-14%)."""
    rows = {(r["source"], r["name"]): r for r in steptime_accuracy.rows()}
    pair = [rows[("tune_h200_gpt350cap_grid", k)] for k in ("deepspeed zero3 mb2x4 offload-optimizer", "deepspeed zero3 mb2x4")]
    measured, predicted = [], []
    for r in pair:
        t = estimate(r["plan"], r["model"], r["gpu"], calibration=False).time
        measured.append(t["tokens_per_step"] / r["measured"])
        predicted.append(t["step_time_s"])
    assert predicted[0] - predicted[1] == pytest.approx(measured[0] - measured[1], rel=0.25)


def test_the_capped_replay_flushes_where_the_capped_grid_ran_slow():
    """The gpt350cap grid ran under an 18 GiB allocator cap (tune_h200_gpt350cap_grid.json). Four FSDP plans
    reserved the whole cap; three of them ran 33-53% slower than predicted without it, FSDP2 ZeRO-3 mb4x2 did not
    (-8%). The step replayed through cachesim.py with the cap (stepsim.capped_churn; nothing fitted) gives its
    cache back every steady step in exactly those three and in no other FSDP plan of the grid."""
    from shardlab.estimate.basis import resolve
    from shardlab.estimate.memory import cublas_workspaces
    from shardlab.estimate.stepsim import capped_churn

    flushing = set()
    for r in steptime_accuracy.rows():
        if r["source"] != "tune_h200_gpt350cap_grid" or r["name"].startswith("deepspeed"):
            continue
        e = estimate(r["plan"], r["model"], r["gpu"], calibration=False)
        churn = capped_churn(e.plan, resolve(e.plan, e.model), cublas_workspaces("h200"), 18 * 2**30)
        if churn and churn[1] > 0:
            flushing.add(r["name"])
    assert flushing == {"fsdp1 zero2 mb4x2", "fsdp1 zero3 mb4x2", "fsdp2 zero2 mb4x2"}


def test_the_replay_under_a_limit_gives_what_the_unlimited_replay_and_the_whole_capped_replay_give():
    """stepsim._on_gpu replays the step once, under the GPU's limit, for both the reserved figure and the churn the
    step time prices (session 24: one replay instead of an unlimited one and a capped one, for the 5 ms budget). Judged
    by the two replays it stands for: its figure is the unlimited replay's where that stays under the limit, the limit
    where it passes it and the step fits, and the unlimited figure where the step does not fit; its churn is what four
    capped steps from the start-up count over their last two (nothing where the unlimited step stays under the limit
    or does not fit), over FSDP plans and caps above, at and far below the step's peak."""
    from shardlab.estimate import stepsim
    from shardlab.estimate.allocator import stranded
    from shardlab.estimate.basis import resolve
    from shardlab.estimate.memory import cublas_workspaces
    from shardlab.models import ModelSpec
    from shardlab.plan import plan_from_dict

    def whole(r, limit):  # four capped steps from the start-up, no shortcut
        st, seen = stepsim._Step(r), []
        st._start()
        st.sim.limit = limit - stepsim._small_pool(r)
        for step in range(stepsim.CHURN_STEPS):
            before = (st.sim.flushes, st.sim.flushed_bytes, st.sim.flushed_segments)
            for mb in range(r.micro):
                st._forward(mb)
                st._loss(mb)
                st._backward(mb, first=mb == 0)
            st._step()
            if step >= 2:
                seen.append((st.sim.flushes - before[0], st.sim.flushed_bytes - before[1], st.sim.flushed_segments - before[2]))
        return tuple(sum(x[i] for x in seen) / len(seen) for i in range(3))

    ws, kinds = cublas_workspaces("h100-80gb"), set()
    for d in ({"framework": "fsdp1", "sharding": "zero3"}, {"framework": "fsdp2", "sharding": "zero3"},
              {"framework": "fsdp2", "sharding": "zero3", "micro_batch_size": 2},
              {"framework": "fsdp1", "sharding": "zero2", "micro_batch_size": 2, "grad_accum_steps": 2}):
        plan = plan_from_dict(d, check=False)
        r = stepsim.covered_recipe(plan, resolve(plan, ModelSpec("churn30", 30, 3072, 24, 50000, 4096)), ws)
        peak, allocated = stepsim._replay_both(r)
        for limit in (int(peak * f) for f in (0.6, 0.9, 0.97, 1.1)):
            if peak <= limit:
                kind, want = "under", (peak, stepsim.NO_CHURN)
            elif allocated + stranded(allocated) > limit:
                kind, want = "does not fit", (peak, stepsim.NO_CHURN)
            else:
                kind, want = "at the limit", (limit, whole(r, limit))
            for known in (False, True):  # with the unlimited replay made before (its shortcut) and without
                stepsim._on_gpu.cache_clear()
                if not known:
                    stepsim._UNLIMITED.pop(r)
                assert stepsim._on_gpu(r, limit) == want, (d, limit, kind, known)
                stepsim._replay_both(r)
            kinds.add(kind)
    assert kinds == {"under", "does not fit", "at the limit"}


def test_host_cost_decides_small_steps_zero3_against_fsdp2_on_one_h200_host():
    """DeepSpeed ZeRO-3 against FSDP2 on the same shape, the same lent H200 host, one after the other: the
    validation set's llamawide6 (#311 / #310, mb 1: ZeRO-3 at 54% of FSDP2) and the held-out set's llama80k
    (#501 / #506, mb 2: 68%). The first host added ZeRO-3's host and GPU work, the second hid most of the
    GPU's under the host (steptime.py, SERIAL["deepspeed_zero3"]): the model sits between the two regimes,
    so each gap within 25%, with opposite signs. Not here: the HF set's Llama pair (#403-#404 / #401-#402,
    40% measured, 52% predicted), whose FSDP2 side is itself predicted 12-23% slow; the H100 gap study's
    ratios (67% at mb 4, 85% at mb 8), in KNOWN_MISSES' H100 rows."""
    rows = _rows()

    def tps(source, *names):
        sel = _named(rows, source, *names)
        assert sel, (source, names)
        return statistics.median(r["measured"] for r in sel), statistics.median(r["measured"] * (1 + r["error"]) for r in sel)

    for source, ds, fsdp in (("fidelity_h200_val", ("#311",), ("#310",)), ("fidelity_h200_held", ("#501",), ("#506",))):
        (m_ds, p_ds), (m_f, p_f) = tps(source, *ds), tps(source, *fsdp)
        assert p_ds / p_f == pytest.approx(m_ds / m_f, rel=0.25), (source, p_ds / p_f, m_ds / m_f)


def test_fsdp1_runs_no_shard_on_one_gpu_and_is_priced_as_it_runs():
    """torch's FSDP1 turns SHARD_GRAD_OP and FULL_SHARD into NO_SHARD when the group has one rank (the judge:
    torch's own FSDP state initialisation; a real FSDP1 wrap needs a GPU); the step model prices FSDP1 zero2 / zero3 on one GPU as that
    NO_SHARD step (steptime._effective), while FSDP2 keeps its stages."""
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp._init_utils import _init_core_state

    class OneRank:  # what FSDP's constructor has set on its state by then
        world_size, rank = 1, 0

    for strategy in (ShardingStrategy.SHARD_GRAD_OP, ShardingStrategy.FULL_SHARD):
        state = OneRank()
        _init_core_state(state, strategy, None, None, True, False, 1, 1)
        assert state.sharding_strategy == ShardingStrategy.NO_SHARD
    t = {st: estimate(Plan(framework="fsdp1", sharding=st, micro_batch_size=2), "gpt-350m", "h200", calibration=False)
         .time["step_time_s"] for st in ("ddp", "zero2", "zero3")}
    assert t["zero2"] == pytest.approx(t["ddp"]) and t["zero3"] == pytest.approx(t["ddp"]), t
    two = {st: estimate(Plan(framework="fsdp1", sharding=st, micro_batch_size=2, topology={"gpus_per_node": 2}), "gpt-350m",
                        "h200", calibration=False).time["step_time_s"] for st in ("ddp", "zero3")}
    assert two["zero3"] != pytest.approx(two["ddp"])  # with two ranks the stages differ again


def test_a_calibration_file_is_found_by_key_and_used(tmp_path, monkeypatch):
    from shardlab.estimate import calibrate as C

    monkeypatch.setenv(C.ENV_DIR, str(tmp_path))
    plan = Plan(framework="fsdp2", micro_batch_size=4)
    before = estimate(plan, "gpt-1b", "h200")
    assert before.time["calibrated"] is False and "uncalibrated" in before.summary()
    cal = json.loads((RESULTS / "calibration_h200.json").read_text())
    cal["key"] = C.key_for("h200")  # this machine's torch / DeepSpeed versions
    path = C.save(cal)
    assert path.parent == tmp_path and path.name.startswith("h200__torch-")
    after = estimate(plan, "gpt-1b", "h200")
    assert after.time["calibrated"] is True and "calibrated: calibration h200" in after.summary()
    assert estimate(plan, "gpt-1b", "h100-80gb").time["calibrated"] is False  # another GPU: not this file
    assert estimate(plan, "gpt-1b", "h200", calibration=False).time["calibrated"] is False
    cal["key"]["torch"] = "0.0.1"  # another software stack: not this file either
    C.save(cal)
    assert estimate(plan, "gpt-1b", "h200").time["calibrated"] is True  # the matching file still is
    assert estimate(plan, "gpt-1b", "h200", calibration=True).time["calibrated"] is True  # True: this machine's, as None
    from shardlab.plan import PlanError

    with pytest.raises(PlanError, match="calibration=3 is not a calibration"):  # was ignored: this machine's applied
        estimate(plan, "gpt-1b", "h200", calibration=3)


def test_a_calibration_applies_gpu_rates_its_host_unit_and_run_fitted_host_not_its_hook_timings():
    """calibrate.py: the micro-benchmark's hook timings (here DeepSpeed's hooks at twice the constants, and a stored
    launch_s in another file's units) leave a host-bound step where it was; its timed plain step sets the host unit
    (twice as slow a plain step: a slower step); a measured matmul rate moves a GPU-bound step, and `--from-runs`'
    host_fit (real steps) moves the host-bound one."""
    cal = json.loads((RESULTS / "calibration_h200.json").read_text())
    slow_hooks = {**cal, "rates": {**cal["rates"], "ds3_hook_scale": 2.0, "ds12_hook_scale": 2.0, "launch_s": 1e-4}}
    host = cal["microbench"]["host"]
    slow_host = {**cal, "microbench": {**cal["microbench"], "host": {**host, "plain_step_s": 2 * host["plain_step_s"]}}}
    fitted = {**cal, "rates": {**cal["rates"], "host_fit": 1.5}}
    fast_mm = {**cal, "rates": {**cal["rates"], "mm_eff": {"bf16": 0.95}}}
    tiny = {"name": "hostA", "family": "gpt", "layers": 16, "hidden": 256, "heads": 4, "vocab": 512, "seq_len": 256}
    plan = Plan(framework="deepspeed", sharding="zero3", micro_batch_size=1)
    t = {k: estimate(plan, tiny, "h200", calibration=c).time["step_time_s"] for k, c in
         (("cal", cal), ("slow_hooks", slow_hooks), ("fitted", fitted), ("slow_host", slow_host))}
    assert t["slow_hooks"] == pytest.approx(t["cal"]) and t["fitted"] > 1.3 * t["cal"], t
    assert t["slow_host"] > 1.3 * t["cal"], t
    big = Plan(framework="fsdp2", sharding="zero3", micro_batch_size=8)
    a, b = (estimate(big, "gpt-1b", "h200", calibration=c).time["step_time_s"] for c in (cal, fast_mm))
    assert b < 0.95 * a, (a, b)


def test_a_calibrated_cpu_adam_rate_prices_fsdp_offload_and_matches_the_h200_twins():
    """calibrate's CPU AdamW timing (microbench.cpu_adam) drives the optimizer part of FSDP1 and FSDP2
    offload and nothing else, and on the recorded twins #907 / #917 (fidelity_h200_new4b.json: FSDP1 and FSDP2,
    the same plan, one H200 host, whose calibration timed 0.64e9 parameters/s) it puts both within 5% of the
    measured step (1.539 / 1.552 s); DeepSpeed's CPU Adam is its own kernel and keeps its rate."""
    import fidelity  # benchmarks/fidelity.py: the rows' plans and models

    from shardlab.estimate.microbench import cpu_adam

    assert cpu_adam(numel=2**18, tensors=2, steps=1)["torch_cpu_adam_params_per_s"] > 0
    cal = json.loads((RESULTS / "calibration_h200_new4b.json").read_text())
    assert cal["rates"]["torch_cpu_adam_params_per_s"] == pytest.approx(0.64e9, rel=0.01)
    half = {**cal, "rates": {**cal["rates"], "torch_cpu_adam_params_per_s": 0.32e9}}
    rows = {r["id"]: r for r in json.loads((RESULTS / "fidelity_h200_new4b.json").read_text())}
    for rid in (907, 917):
        r = rows[rid]
        plan, model = fidelity.plan_for(r), fidelity.model_for(r)
        t = estimate(plan, model, "h200", calibration=cal).time
        assert t["step_time_s"] == pytest.approx(r["step_time_s"], rel=0.05), (rid, t["step_time_s"])
        slow = estimate(plan, model, "h200", calibration=half).time
        assert slow["offload_s"] > 1.8 * (t["offload_s"] - 0.2), (rid, slow["offload_s"], t["offload_s"])
    ds = Plan(framework="deepspeed", sharding="zero3", micro_batch_size=1, offload={"optimizer": "cpu"})
    a, b = (estimate(ds, "gpt-350m", "h200", calibration=c).time["step_time_s"] for c in (cal, half))
    assert a == pytest.approx(b)


def test_calibrate_without_a_gpu_says_so_and_exits_2(capsys):
    from shardlab.cli import main
    from shardlab.run.host import gpu_count

    if gpu_count():
        pytest.skip("this machine has a GPU")
    assert main(["calibrate"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_calibrate_from_runs_refuses_a_missing_folder_and_one_without_completed_runs(capsys, tmp_path):
    """`calibrate --from-runs` with nothing to refit writes nothing and says why: exit 2, the folder named."""
    from shardlab.cli import main

    assert main(["calibrate", "--from-runs", str(tmp_path / "nope"), "--calibration-dir", str(tmp_path / "cal")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["calibrate", "--from-runs", str(tmp_path), "--calibration-dir", str(tmp_path / "cal")]) == 2
    assert "none completed" in capsys.readouterr().err and not (tmp_path / "cal").exists()


def test_the_step_breakdown_adds_up_and_is_drawn():
    from shardlab_widgets.steptime import step_bar_html

    d = estimate(Plan(framework="deepspeed", sharding="zero3", offload={"optimizer": "cpu"}, topology={"nodes": 2, "gpus_per_node": 8}),
                 "gpt-1.3b", "a100-80gb").to_dict()
    br = d["step_breakdown"]
    assert set(br) == {"compute", "exposed_comm", "host_overhead", "offload"}
    assert sum(br.values()) == pytest.approx(d["step_time_s"])
    html = step_bar_html(d)
    assert html.count("%;background") == sum(1 for v in br.values() if v > 0) and "ms per step" in html


# ---- runs carry their predictions; --from-runs moves predictions toward the measurement


@pytest.fixture(scope="module")
@needs(*ANALYSIS)
def runs():
    return real_runs()


def test_runs_in_the_store_carry_their_prediction(runs):
    from shardlab.compare import compare
    from shardlab.run.prediction import reconcile
    from shardlab.run.store import load_run

    for live in runs:
        r = load_run(live.dir)
        p = r.prediction
        assert p and p["device"] == "cpu" and p["tokens_per_s"] > 0, p
        assert sum(p["breakdown"].values()) == pytest.approx(p["step_time_s"])
        assert {"params", "grads", "optimizer", "activations"} <= set(p["memory"])
        rec = reconcile(r)
        assert rec["measured"]["tokens_per_s"] > 0 and rec["tokens_per_s_residual"] is not None
        # the measured states are what the rank holds: the stored prediction names the same categories
        assert set(rec["memory_residuals"]) >= {"params", "grads", "optimizer"}
    df = compare([x.dir for x in runs])
    assert df["tokens_per_s_pred"].notna().all() and df["tokens_per_s_residual"].notna().all()


def test_calibrate_from_runs_moves_a_held_out_prediction_toward_its_measurement(runs, tmp_path):
    """Refit from two of the suite's CPU runs (FSDP1 DDP, DeepSpeed ZeRO-3); the third (FSDP2 ZeRO-3), held out, must
    move toward its measured step. Until session 18 DeepSpeed's run was the one held out, but its CPU step is not one
    figure: 38.8, 39.4, 65.6 and 68.1 ms in four runs of this suite on the 2-core machine against 26.1 predicted, so
    the refit (host x1.5-2.9 from the other two) overshot it in two of them (ci2 of session 18 failed on it)."""
    from shardlab.estimate.calibrate import CPU_DEVICE, calibrate_from_runs, find, run_observation
    from shardlab.run.store import load_run

    def is_held(r):
        return r.plan.framework == "fsdp2"

    fit_on, held = [x.dir for x in runs if not is_held(load_run(x.dir))], [load_run(x.dir) for x in runs if is_held(load_run(x.dir))][0]
    out = calibrate_from_runs(fit_on, directory=tmp_path)
    (c,) = out["calibrations"]
    assert c["device"] == "cpu" and c["runs"] == 2
    assert c["rms_log_error_after"] < c["rms_log_error_before"]
    o = run_observation(held)
    before = estimate(o["plan"], o["model"], CPU_DEVICE, calibration=False).time["step_time_s"]
    after = estimate(o["plan"], o["model"], CPU_DEVICE, calibration=find("cpu", tmp_path)).time["step_time_s"]
    assert abs(math.log(after / o["measured_s"])) < abs(math.log(before / o["measured_s"]))


def test_default_launch_is_calibrates_median_plain_step_in_host_units():
    """DEFAULT_LAUNCH_S changed meaning in session 18 (seconds per host unit, not per counted kernel) without a new
    measurement: the calibration step it stands for (45.5 us over the 358 kernels counted then, microbench's tiny GPT with
    its allowance of 40) must stay the same step."""
    from shardlab.estimate.hostcost import DEFAULT_LAUNCH_S, host_units
    from shardlab.estimate.microbench import host_model, launch_seconds

    _, w = host_model()
    assert launch_seconds(45.5e-6 * 358, w) == pytest.approx(DEFAULT_LAUNCH_S, rel=0.01)
    assert sum(host_units(w)) + 40 == pytest.approx(526)


def test_host_units_price_the_measured_host_of_seventeen_models():
    """hostcost.host_units (kernels as stepwork counts them, MODULE_KERNELS per module) against the H200 host times of
    shardlab's two models and fifteen transformers architectures (benchmarks/host_phase_probe.py --hf --rounds 3,
    results/host_phase_h200_hf3.json: forward and backward wall time at width 32, the GPU's work negligible). One price
    per unit, solved over the 17 (their median), leaves the median model within 6.7% and the largest miss 26%, Mixtral,
    whose routing makes its launches vary; held here to 8% and 30%. Priced per kernel alone (MODULE_KERNELS 0): median
    12.4%, shardlab's GPT 29% cheap, OLMo-2 25% dear."""
    import json

    from shardlab.estimate.hostcost import host_units
    from shardlab.estimate.stepwork import work

    sys.path.insert(0, str(RESULTS.parent))
    from host_phase_probe import spec_of

    data = json.loads((RESULTS / "host_phase_h200_hf3.json").read_text())["rows"]
    measured: dict[str, list[float]] = {}
    for r in data:
        measured.setdefault(r["family"], []).append(r["forward_s"] + r["backward_s"])
    units = {}
    for name in measured:
        spec = spec_of(name)
        units[name] = sum(host_units(work(spec, 1, spec.seq_len, 2, False)))
    secs = {n: statistics.median(v) for n, v in measured.items()}
    price = statistics.median(secs[n] / units[n] for n in secs)
    errs = {n: units[n] * price / secs[n] - 1 for n in secs}
    assert len(errs) == 17
    assert statistics.median(abs(e) for e in errs.values()) <= 0.08, errs
    assert max(abs(e) for e in errs.values()) <= 0.30, errs


def test_collective_rates_match_the_two_gpu_probe():
    """steptime's collective price (NCCL_BUS_EFF of the table's link rate, COLLECTIVE_LATENCY_S per call) against
    what NCCL measured between the two H200s (benchmarks/collective_probe.py, results/collectives_h200x2.json): the
    gather and the scatter within 12% at every size from 4 MiB, all_reduce (priced at the same rate, 0.71 measured)
    no more than 35% slow. A constant changed without a new measurement fails here."""
    from shardlab.estimate.gpus import get_gpu
    from shardlab.estimate.steptime import COLLECTIVE_LATENCY_S, NCCL_BUS_EFF

    probe = json.loads((RESULTS / "collectives_h200x2.json").read_text())
    n, link = probe["world_size"], get_gpu("h200").intra_node_bw * NCCL_BUS_EFF
    checked = 0
    for row in probe["rows"]:
        if row["payload_bytes"] < 4 * 2**20:
            continue  # 1 MiB: latency alone, within the 62 us by 10%
        ring = (2 if row["collective"] == "all_reduce" else 1) * (n - 1) / n
        predicted = COLLECTIVE_LATENCY_S["intra"] + ring * row["payload_bytes"] / link
        ratio = predicted / row["time_s"]
        if row["collective"] == "all_reduce":
            assert 0.9 <= ratio <= 1.35, (row, ratio)
        else:
            assert abs(ratio - 1) <= 0.12, (row, ratio)
        checked += 1
    assert checked == 15


def test_collbench_fit_recovers_the_probes_latency_and_rate():
    """collbench.fit over the two H200s' recorded timings: the latency and rate steptime's defaults name."""
    from shardlab.estimate.collbench import fit

    probe = json.loads((RESULTS / "collectives_h200x2.json").read_text())
    f = fit(probe["rows"], probe["world_size"])
    assert 55e-6 <= f["latency_s"] <= 70e-6 and 265e9 <= f["bus_bytes_per_s"] <= 290e9, f


def test_a_calibrated_collective_rate_prices_the_collectives():
    """A calibration carrying this host's collective latency and rate (calibrate on two or more GPUs) replaces the
    defaults in the step's communication; one without them keeps the defaults."""
    cal = json.loads((RESULTS / "calibration_h200_w2.json").read_text())
    plan = Plan.model_validate({"framework": "fsdp2", "sharding": "zero3", "topology": {"gpus_per_node": 8}})
    base = estimate(plan, "gpt-1.3b", "h200", calibration=cal).time["comm_s"]
    slow = {**cal, "rates": {**cal["rates"], "nccl_latency_s": 62e-6, "nccl_bus_bytes_per_s": 100e9}}
    fast = {**cal, "rates": {**cal["rates"], "nccl_latency_s": 1e-6, "nccl_bus_bytes_per_s": 1e12}}
    t_slow = estimate(plan, "gpt-1.3b", "h200", calibration=slow).time["comm_s"]
    t_fast = estimate(plan, "gpt-1.3b", "h200", calibration=fast).time["comm_s"]
    assert t_fast < base < t_slow
    assert t_slow / base == pytest.approx(0.61 * 450 / 100, rel=0.25)  # the wire bytes dominate at this size


def test_collbench_runs_on_cpu_processes_and_a_timeout_leaves_none():
    """The torchrun worker on two CPU processes (gloo) gives every collective at every size asked for; a run cut
    short by its timeout raises and leaves no process behind."""
    import psutil

    from shardlab.estimate.collbench import measure

    info = measure(2, "cpu", max_mib=4)
    assert info["world_size"] == 2 and len(info["rows"]) == 6 and all(r["time_s"] > 0 for r in info["rows"])
    assert info["fit"] is None or info["fit"]["bus_bytes_per_s"] > 0  # CPU timings may be too noisy to fit
    with pytest.raises(RuntimeError, match="stopped"):
        measure(2, "cpu", timeout_s=0.5)
    left = [p for p in psutil.process_iter(["cmdline"]) if "shardlab.estimate.collbench" in " ".join(p.info["cmdline"] or [])]
    assert not left, left


@pytest.mark.parametrize("bad", [-5.0, 0.0, float("nan")])
def test_a_calibration_with_a_rate_not_above_zero_is_refused(bad, tmp_path):
    """A hand-edited calibration whose rate is zero, negative or not a number would give negative or infinite
    times: refused as bad input, from a file and from a dict alike."""
    from shardlab.plan import PlanError

    cal = json.loads((RESULTS / "calibration_h200_w2.json").read_text())
    cal["rates"]["nccl_bus_bytes_per_s"] = bad
    with pytest.raises(PlanError, match="finite positive"):
        estimate(Plan(), "gpt-125m", "h200", calibration=cal)
    f = tmp_path / "cal.json"
    f.write_text(json.dumps(cal))
    with pytest.raises(PlanError, match="finite positive"):
        estimate(Plan(), "gpt-125m", "h200", calibration=str(f))
