"""What the host costs in a training step, and where it waits for the GPU: the host side of steptime.py.

The host (Python, autograd, the frameworks' hooks) issues every kernel; timeline.py plays its launch
stream against the GPU's queue. This file prices the host's work per micro-step and lays the step out
as segments for that simulation (`step_segments`):

- kernels launched, as stepwork.py counts them in each pass, and the model's modules (MODULE_KERNELS: a module's
  Python call, hooks and autograd bookkeeping, in kernels' worth), half in each pass;
- FSDP's unit hooks (half in each pass), checkpointing's machinery (backward), DeepSpeed's module,
  parameter and gradient hooks (ZeRO-3 forward and backward, ZeRO-2 backward, ZeRO-0/1 at the
  accumulation boundary);
- the synchronisations found in the code that runs: the worker's per-micro-step batch upload from
  pageable memory (BATCH_UPLOAD_SYNC), DeepSpeed's overflow-check `.item()` before its norms and optimizer step
  (DS_OPT_SERIAL), ZeRO-2 + optimizer offload's wait per parameter under accumulation, and the step's
  closing loss.item().

Every constant names the measurement it comes from (steptime.py's docstring gives the step's formula).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .stepwork import TOP_KERNELS
from .timeline import Seg

if TYPE_CHECKING:
    from shardlab.plan import Plan

    from .basis import Setup
    from .steptime import Rates
    from .stepwork import Work

# Host: DEFAULT_LAUNCH_S, seconds per kernel stepwork.py counts (dispatch, autograd, launch), and
# FSDP_UNIT_S, FSDP2's hooks per unit per micro-step (all-gather/reduce-scatter issue, copy-in/out),
# from calibrate's tiny-model steps (plain, and FSDP2 with 9 units): 41 us / 1.91 ms on the first
# H200 host, 50 us / 3.68 ms on the second; the defaults are their geometric means. Host speed
# differs from machine to machine by this much: calibrating on the machine removes it.
# calibrate's step is the whole FSDP2 step less the plain one, so FSDP_UNIT_S also holds FSDP2's per-tensor
# host work at its model's 11.2 tensors per unit (101 in 9): DTensor dispatch in AdamW (~25 us per tensor on the
# CPU), per-tensor unshard copies at world size 1 (a unit ~0.7 ms + 60-70 us per tensor on the CPU;
# benchmarks/fsdp_host_probe.py). Priced per tensor instead, rows of one model and framework all move one way
# (docs/benchmarks.md, "FSDP's host cost by mechanism"): not done.
# Where these defaults sit among the lent hosts (benchmarks/host_population.py, session 11): one factor of all host
# time fitted per machine to its own rows (18 H200 machines, 240 rows timed alone) spans 0.82-1.48, median 1.04,
# so the defaults are at the population's middle. Leave one machine out (the default at the median of the other
# machines' factors) does not beat them: pooled median |error| 10.5% -> 10.8%, largest 73.0% -> 67.8%, machines
# whose median is within 15% 16 -> 16 of 18. What is left is the spread itself (machine B: 1.48).
# Since session 18 DEFAULT_LAUNCH_S is the seconds per host unit (host_units: kernels plus MODULE_KERNELS per module). The
# calibration step above is unchanged: 45.5 us over its 358 counted kernels (stepwork's count then, with microbench's
# allowance of 40) is a plain step of 16.3 ms, which host_units counts as 486 units (+ 40): 31.0 us a unit.
# tests/test_steptime.py holds the two to the same step.
DEFAULT_LAUNCH_S = 31.0e-6
FSDP_UNIT_S = 2.65e-3
# share of a FULL_SHARD unit's hook cost other stages pay per micro-step. Every stage runs a unit's
# pre/post forward and backward hooks; NO_SHARD's cost as much (host probe, fidelity_h200_host.json:
# FSDP1/FSDP2 NO_SHARD 75-89 ms vs FULL_SHARD 68-79 ms on tiny models). SHARD_GRAD_OP skips the
# post-forward reshard and pre-backward gather: the probe's host measured it at full cost (61, 77 ms),
# the check set's host at about half (#111, llama152k: 116 ms of a predicted 112 at half, 147 at
# full); machines' hosts differ by this much, so the middle.
UNIT_HOOK_SHARE = {"zero3": 1.0, "zero2": 0.75, "ddp": 1.0}
# MODULE_KERNELS: what one module costs the host in a training step (its Python __call__ and forward code, hook dispatch,
# its share of the autograd graph), in kernels' worth. Measured on an H200 host (benchmarks/host_phase_probe.py --device
# cuda --hf --rounds 3, results/host_phase_h200_hf3.json: 17 models at width 32, where the GPU's work is negligible,
# forward and backward wall time against the kernels each launched and the modules each holds): least squares over the
# 17 gives 13.3 us per kernel and 39.4 us per module, median error 7.3%, largest 22.7% (transformers' Mixtral, whose
# routing makes its launches vary); per kernel alone the same 17 spread 13-22 us, shardlab's GPT at 20, its Llama at 22 and
# transformers' Llama-style models at 14-17. Until session 18 the host was priced per kernel alone (DEFAULT_LAUNCH_S,
# fitted on shardlab's GPT, whose module holds few kernels) and FWD_HOST_RATIO split it between the passes: every
# transformers model was then predicted slow (39 recorded H200 rows, signed median -17.7%), shardlab's own rows not
# (+4.4% GPT, +2.4% Llama). Half of the module cost falls in each pass, which puts the forward's share of the host at
# 0.43 (GPT), 0.53 (Llama) and 0.40 (transformers' Llama) where the probe measured 0.34, 0.48 and 0.40. Under
# checkpointing the recomputed forward is priced as the forward (kernels and the blocks' modules again).
MODULE_KERNELS = 3.0


def host_units(w: Work) -> tuple[float, float]:
    """(forward, backward) host cost of one micro-step in kernels' worth: the kernels each pass launches plus
    MODULE_KERNELS per module, half in each pass; checkpointing's recomputed forward in the backward."""
    k_f, k_r = w.fwd_kernels, w.recompute_kernels
    k_b = w.kernels - k_f - k_r
    mod = MODULE_KERNELS * w.modules
    recomputed = k_r * (1 + mod / 2 / k_f) if k_f else 0.0
    return k_f + mod / 2, k_b + mod / 2 + recomputed
# BATCH_UPLOAD_SYNC: the worker moves each micro-batch to the GPU with x.to("cuda", non_blocking=True) from
# an ordinary (pageable) CPU tensor (run/data.py). CUDA stages pageable memory through a pinned buffer and
# "may synchronize with the stream" to do so (CUDA runtime API, "API synchronization behavior", Memcpy,
# asynchronous): the host waits for the previous micro-step's backward before it issues the next forward.
# Under DeepSpeed the wait is certain: its ThroughputTimer (config `timers.throughput`, enabled and
# synchronized by default; deepspeed/utils/timer.py) calls get_accelerator().synchronize() when each forward
# starts (engine.forward, no training_data given) and in every engine.step(), which the worker calls after
# each micro-step. No constant: a synchronisation in the timeline. Checked (not fitted) on the rows with accumulation 2
# (tune_h200_gpt125_grid.json's eight FSDP mb8x2 rows: median +33% -> +24%; the tune trials' fsdp2 ddp
# mb8x2 +10.6% -> +0.4%). Rows with accumulation 4 at micro-batch 4 do not move (host-bound either way).
BATCH_UPLOAD_SYNC = True
# --- DeepSpeed host costs, from the H100 profile in docs/benchmarks.md (zero3_gap_h100.json,
# gpt-1b, micro-batch 4): ZeRO-3's gradient hooks took 30 ms over 197 parameter tensors ->
# DS3_PARAM_S; the host time per step (160 ms, solved from the micro-batch 4 step time 188.5 ms with
# the GPU's work as modelled here; micro-batch 8 then comes out within 6%) less those hooks, 606
# kernels and 2 per-parameter norm kernels at DEFAULT_LAUNCH_S, over 150 modules -> DS3_MODULE_S
# DS3_RECOMPUTE: extra module-hook cost under activation checkpointing: the recomputed forward fires
# every module's pre/post-forward hooks (gather, trace bookkeeping, release) once more, i.e. one more
# forward's worth of module hooks: 1.0. Chosen with SERIAL["deepspeed_zero3"] 1.0 on the three ZeRO-3
# checkpointing rows of issue 20's gpt125 grid (tune_h200_gpt125_grid.json, mb4x4/8x2/16x1 ac: +7%, +0%,
# -3%); at the final 0.55 they are +16%, +15%, +21% (that grid's slow host) and the rows not used: #113
# -16%, #117 -5%, the held-out #502 +4%, the H100's two timings +27% / -14%. The earlier 1.5 (fitted to
# the H100 rows) over-counted #113 (-27%) and #406.
# DS12_PARAM_S: ZeRO-0/1/2's Python work per parameter tensor (gradient hook, bucketing, partition
# bookkeeping) on top of the kernels counted: from the host probe (fidelity_h200_host.json #201-#203,
# #210-#212, #220: tiny models where the GPU's work is hidden, 58-82 ms per step, 197 tensors, at
# widths 256 and 1024 alike, so it is per tensor, not per byte). An earlier value (0.41 ms, fitted to
# gpt-1b on an H100 where the step was GPU-bound) absorbed GPU time and overpredicted every host-bound
# DeepSpeed ZeRO-0/1/2 step by 35-55%. A calibration's kernel-launch cost does not rescale DeepSpeed's
# hook costs: on the validation host (fidelity_h200_val.json) launches were 25% cheaper than the default
# while DeepSpeed's steps ran 24-41% slower than predicted, and scaling by the launch cost made the
# calibrated DeepSpeed rows 60-79% fast. Without that scaling, the 131 recorded rows calibrated: median
# 12.3% -> 11.2%, max 78.9% -> 54.4% (benchmarks/steptime_accuracy.py). `shardlab calibrate` now times
# DeepSpeed's hooks themselves (microbench.py: Rates.ds3_hook_scale / ds12_hook_scale).
DS3_PARAM_S = 150e-6
DS3_MODULE_S = 0.565e-3
DS3_RECOMPUTE = 1.0
DS12_PARAM_S = 0.12e-3
DS_NORM_KERNELS_PER_PARAM = 2
# DS_NORM_UNITS_PER_PARAM: those two launches come from a Python loop over the tensors, and DS_OPT_SERIAL was checked with
# them at the per-kernel price of that time (45.5 us, DEFAULT_LAUNCH_S before session 18), which host units (31.0 us each)
# keep: 2 x 45.5 / 31.0. Priced as two plain units instead, the DeepSpeed ZeRO-0/1/2 rows of the host probe moved fast
# (fidelity_h200_host.json #201 +5.4% -> +12.5%, #202 +16.9% -> +24.7%, #212 +4.0% -> +10.6%).
DS_NORM_UNITS_PER_PARAM = DS_NORM_KERNELS_PER_PARAM * 45.5e-6 / DEFAULT_LAUNCH_S
# DS_OPT_SERIAL, located (session 9, wave 2, DeepSpeed 0.19.8 as installed): with bf16, `bf16.check_grad_overflow`
# defaults to true (runtime/precision_config.py), so ZeRO-1/2's step() first runs has_overflow_partitioned_grads_serial
# (about 7 kernels per gradient tensor: amax, amin, two isfinite, logical_and, logical_not, an add) and then
# overflow_gpu[0].item(): the host waits for the backward there, before the per-tensor norms
# (get_grad_norm_direct); is_invalid_grad_norm then reads the norm back as a bool, a second wait before the
# optimizer. ZeRO-0 with bf16 runs FP16_Optimizer (the engine's DDP_BFLOAT16 choice, with FusedAdam), whose has_overflow_serial
# tests each gradient with a Python `if`: a wait per tensor, the norm on the flattened group. The per-tensor
# overflow kernels run before the wait, as DS12_PARAM_S's work does here; they are not counted apart from it.
# fp32 (check_grad_overflow off for it, engine._configure_zero_optimizer) has no overflow .item(): ZeRO-1/2's first
# wait is that bool of the norm, after the norm launches, which then run under the backward's GPU tail. The
# only such row: #105 (fidelity_h200_check_alone.json, fp32 ZeRO-1) -11.9% -> -7.1%; not held out (it is why
# this was read), no other row moves.
# DS_OPT_SERIAL: those per-tensor norm launches come after the backward has drained the GPU's queue
# (the engine synchronises before its step), so they are added to the step rather than hidden under the
# GPU's work. Checked, not fitted: the GPU-bound H100 DeepSpeed rows (gpu_validate_h100.json) went from a
# median error of 8.0% to 3.9%, zero3_gap_h100.json from max 14.7% to 4.4%, issue 20's gpt125 grid from
# 24.2% to 21.2%; one row worsened (fidelity_h200_check_alone.json #105, fp32 ZeRO-1: -6.7% -> -11.8%).
# SERIAL: share of the time in which host and GPU both work (timeline.py's `overlapped`) that DeepSpeed's
# synchronisations not located in its source leave exposed, on top of those the timeline does model
# (step_segments). Before session 9 it was the share of min(gpu, host) in max + SERIAL x min; the values
# are kept, since the timeline's overlap equals min(gpu, host) wherever host and GPU are balanced across
# the step. DeepSpeed ZeRO-3 (25 cudaStreamSynchronize per step): solved with DS3_MODULE_S from the same
# two H100 step times. FSDP has no such share any more (session 9): its steps are the timeline's alone.
# DeepSpeed ZeRO-3 (deepspeed_zero3) at world size 1 runs in two regimes, and which one a run gets is
# not a property of its shape: with the host cost pinned by the host probe (fidelity_h200_host.json #204 /
# #213: the GPU's work negligible, 163 / 168 ms measured for the 161 ms the hook constants give), the
# GPU-heavy rows either add host and GPU (SERIAL 1: the validation hosts' #305 and #311 twice, #108,
# #403/#404, #407, the gpt125 grid's mb16x1) or hide most of the GPU under the host (SERIAL ~0.27: the
# H100 gap study's 188.5 ms at mb4, the held-out set's #501, fidelity_h200_held.json, and #103); the
# H100 host itself gave the same plan 184-257 ms in six timings, and the held-out host ran #502 / #505
# (32 thin layers) as a sum and #501 (14 wide ones) hidden. 0.55 is the value that keeps both regimes
# closest (minimax over the 15 H200 ZeRO-3 rows without offload or GPT-2 checkpointing: largest error
# 42% at 0.27, 35% at 1.0, 25% at 0.55; benchmarks/steptime_accuracy.py). It was chosen after
# fidelity_h200_held.json ran (with 1.0 that set had median 8.9%, #501 -34.7%; with 0.27, 6.2% / 24.9%),
# so that set no longer counts as held out for this constant. What decides the regime is not in the recorded
# rows (session 8, `benchmarks/steptime_accuracy.py --zero3`): the same plan measured twice lands in both
# (H100 gpt-1b mb4: exposed share 0.90 in one run, 0.23 and 0.27 in two others; HF Llama #403 / #404: 1.33
# / 0.54); across the 25 H200 rows the share does not follow the GPU/host ratio (0.74 gives 0.23 and 0.90)
# nor the host time per module hook; every row uses DeepSpeed's default prefetch bucket, so its size cannot
# be tested. Three of the "hidden" rows (#501, #406, #113) are predicted slower by their host time alone than
# they ran: their host cost is over-predicted, whatever the overlap. The H200 rows' median share is ~1.0
# (host and GPU add); 0.55 stays as the minimax. A GPU run to settle it: benchmarks/ds_host_probe.py (the
# step's synchronisations with their Python origin) on one plan repeated on two hosts.
# Since session 21 the ZeRO-0/1 share applies only where the GPU's work outlasts the host's (steptime._serial_share:
# the profiled host-bound steps ran at their host's time).
SERIAL = {"deepspeed": 0.27, "deepspeed_zero3": 0.55}
# ZeRO-2 with the optimizer offloaded and gradients accumulated (micro-steps > 1): every micro-step, each
# parameter's gradient goes through stage_1_and_2.py's async_accumulate_grad_in_cpu_via_gpu, which first
# calls _wait_for_offload_copies (an event.synchronize() on the previous parameter's copy to the CPU): the
# host waits for the GPU once per parameter, so the backward's GPU work does not run under the host's
# hooks (step_segments: a wait per block, the hooks after it). No constant fitted (before session 9 a
# share of 1 in the max + share x min formula, SERIAL_DS2_OFFLOAD_ACCUM): checked on the gpt350cap grid's
# four ZeRO-2 offload rows (tune_h200_gpt350cap_grid.json, accumulation 4 and 2: +10.1 / +18.0 / +24.7 /
# +38.4% with no wait) and the held-out #504 (fidelity_h200_held.json, accumulation 2, a host whose CPU
# optimizer ran faster than CPU_ADAM_PARAMS_PER_S). With one micro-step the path is skipped (no wait).
# torch.compile (plan.compile): Inductor fuses the memory-bound kernels of each compiled block
# (steptime.COMPILE_MEM scales their bytes on the GPU), but the host does not get cheaper: the FSDP runs
# compile each block (frameworks/fsdp2.py: `m.compile()` per unit), FSDP's hooks stay eager around them,
# and each call of a compiled block evaluates its guards and goes through AOTAutograd's runtime wrappers
# and Inductor's Python launcher for every fused kernel. Until session 13 the host's launches were priced
# at 0.3x under compile (a guess never checked on a run that ran alone); the three FSDP2 compile rows that
# ran alone were all predicted fast with it (#115 fidelity_h200_check_alone.json +25.7%, #711
# fidelity_h200_new2.json +56.2%, #915 fidelity_h200_new4b.json +57.9%), and #915 ran no faster than its
# eager twin #901 (fidelity_h200_new4.json: 0.100 s eager, 0.110 s compiled, on hosts whose calibrations
# time launches 41.5 and 52.9 us). So the host is priced as in eager mode: -19.2%, -1.9%, +41.0% (#901,
# the same shape eager, is +17.0% on its own host). DeepSpeed's engine.compile() made ZeRO-3 ~20% slower
# on an H200 (DESIGN.md's measured facts) -> COMPILE_DS_HOST.
COMPILE_DS_HOST = 1.2
# AC_BLOCK_S: under FSDP, torch.utils.checkpoint (non-reentrant, one region per block:
# frameworks/base.py) costs the host more than re-issuing the block's forward kernels (counted in
# stepwork.py): the saved-tensor hooks of the forward and of the recomputation, the RNG state saved and
# restored, the recomputation started from the backward. Host work, so hidden when the GPU is the
# bottleneck (the H100 gpt-1b rows stay within 12%). From the four FSDP rows with checkpointing run
# alone on H200 hosts (fidelity_h200_check_alone.json #102, #107, fidelity_h200_val.json #304, #312):
# the value that reproduces each row, 0.37, 1.51, 0.79 and 2.29 ms per block per micro-step; the median
# (session 9, wave 2, with the recomputed forward priced at the forward's rate; before, 1.5 ms from 1.31,
# 5.81, 1.60 and 1.42). What it prices is per block, not per recomputed kernel: GPT's 12-kernel block
# (#102) and Llama's 24 (#107, #304, #312) give 0.03-0.10 ms per kernel, no tighter than per block.
# Checked (wave 1, at 1.5 ms) on tune_h200_gpt125_grid.json's 12 FSDP checkpointing rows (not fitted): their
# median error went from +37% to +30%, the largest from +70% to +36% (that host ran the same plans
# up to 22% slower than the host of the earlier tune trials did). DeepSpeed's checkpointing rows do not show it (the gpt350cap ZeRO-2 trial
# would be -28% with it, the H100 ZeRO-1/2 rows are within 9% without); ZeRO-3's DS3_RECOMPUTE is
# fitted to its own.
AC_BLOCK_S = 1.15e-3


def host_phases(plan: Plan, s: Setup, w: Work, r: Rates) -> tuple[float, float, float]:
    """Host seconds of one micro-step: (forward, backward, the accumulation boundary's extra), all blocks
    and the rest. Kernel launches and modules (host_units); FSDP's unit
    hooks half in each pass; checkpointing's machinery (AC_BLOCK_S) and the recomputed forward's launches
    (at the forward's rate) in the backward; DeepSpeed ZeRO-3's module hooks (pre/post forward, pre/post
    backward, once more for a recomputed forward) and parameter hooks (backward); ZeRO-2's gradient hooks
    every backward, ZeRO-0/1's at the boundary."""
    u_f, u_b = host_units(w)
    fwd, bwd, boundary = u_f * r.launch_s, u_b * r.launch_s, 0.0
    if not s.ds:
        unit = w.units * r.fsdp_unit_s * UNIT_HOOK_SHARE.get(s.stage, 1.0)
        ac = AC_BLOCK_S * max(0, w.units - 1) if plan.activation_checkpointing else 0.0
        return (fwd + unit / 2) * r.host_fit, (bwd + unit / 2 + ac) * r.host_fit, 0.0
    comp = COMPILE_DS_HOST if plan.compile else 1.0
    if s.stage == "zero3":
        mod = w.modules * DS3_MODULE_S * r.ds3_hook_scale
        recompute = mod * DS3_RECOMPUTE if plan.activation_checkpointing else 0.0
        fwd += mod / 2
        bwd += mod / 2 + recompute + w.param_tensors * DS3_PARAM_S * r.ds3_hook_scale
    elif s.stage == "zero2":
        bwd += w.param_tensors * DS12_PARAM_S * r.ds12_hook_scale
    else:  # ZeRO-1 / no ZeRO reduce at the accumulation boundary only (comm.py): the bucketing work is once per step
        boundary = w.param_tensors * DS12_PARAM_S * r.ds12_hook_scale
    return fwd * comp * r.host_fit, bwd * comp * r.host_fit, boundary * r.host_fit


def host_time(plan: Plan, s: Setup, w: Work, r: Rates) -> float:
    """CPU seconds to issue one optimizer step (all micro-steps; the optimizer's launches under FSDP)."""
    f, b, boundary = host_phases(plan, s, w, r)
    return (f + b) * s.micro_steps + boundary + _opt_launch(s, w, r)


def _opt_launch(s: Setup, w: Work, r: Rates) -> float:
    """FSDP: torch's foreach optimizer launches in chunks of tensors. DeepSpeed: its per-tensor norms
    (DS_OPT_SERIAL), after the engine's synchronisation."""
    if s.ds:
        return w.param_tensors * DS_NORM_UNITS_PER_PARAM * r.launch_s * r.host_fit
    return (8 * max(1, w.param_tensors // 64) + 10) * r.launch_s * r.host_fit


def step_segments(plan: Plan, s: Setup, w: Work, r: Rates, gpu_ph: tuple, opt_gpu: float, floor: float) -> list[Seg]:
    """One optimizer step as the host issues it, for timeline.simulate. gpu_ph: GPU seconds of one
    micro-step's (blocks' forward, blocks' backward, loss forward, loss backward); opt_gpu: the optimizer
    step's; floor: a kernel's shortest GPU time. Per micro-step the batch upload (waits for the GPU after
    the first), the blocks' forward, the loss, the blocks' backward; then the optimizer; then the worker's
    loss.item(), so every step starts with an empty queue."""
    blk_f, blk_b, loss_f, loss_b = gpu_ph
    h_f, h_b, boundary = host_phases(plan, s, w, r)
    L = max(1, w.units - 1)
    per_kernel = r.launch_s * r.host_fit
    h_loss = 0.0 if w.bare else sum(TOP_KERNELS) * per_kernel  # the embedding, final norm and loss (stepwork's TOP_KERNELS)
    h_f, h_b = max(0.0, h_f - h_loss / 3), max(0.0, h_b - 2 * h_loss / 3)
    wait_per_block = s.ds and s.stage == "zero2" and s.offload_opt != "none" and s.micro_steps > 1
    segs = []
    for micro in range(s.micro_steps):
        if micro and BATCH_UPLOAD_SYNC:
            segs.append(Seg("batch upload", 0.0, 0.0, sync=True))
        segs += [Seg("forward", h_f / L, blk_f / L, L), Seg("loss", h_loss, loss_f + loss_b)]
        if wait_per_block:  # each block's gradient copy is waited for before its hooks run
            segs += [Seg("backward", 0.0, blk_b / L, L, sync=True), Seg("gradient hooks", h_b / L, 0.0, L)]
        else:
            segs.append(Seg("backward", h_b / L, blk_b / L, L))
    segs.append(Seg("boundary", boundary, 0.0))
    if s.ds:  # DS_OPT_SERIAL: the bf16 overflow check's .item() waits for the backward, then per-tensor norms
        n = w.param_tensors * DS_NORM_KERNELS_PER_PARAM
        norms = Seg("norms", _opt_launch(s, w, r), n * floor)
        # fp32 checks no overflow (check_grad_overflow off): the first wait is the norm's read-back, after the norms
        first = [norms, Seg("norm sync", 0.0, 0.0, sync=True)] if plan.precision == "fp32" and s.stage in ("zero1", "zero2") \
            else [Seg("norm sync", 0.0, 0.0, sync=True), norms]
        segs += first + [Seg("optimizer", 0.0, opt_gpu)]
    else:
        segs.append(Seg("optimizer", _opt_launch(s, w, r), opt_gpu))
    return segs + [Seg("loss.item()", 0.0, 0.0, sync=True)]
