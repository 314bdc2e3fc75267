"""Step time, tokens/s, TFLOPS and MFU from a model of where a training step's time goes.

(Named steptime.py so it does not shadow the stdlib `time`.) One optimizer step on one GPU is

    step = timeline(host, gpu) [+ SERIAL x overlapped, DeepSpeed: _serial_share] + exposed communication + offload

- gpu: the kernels' time (stepwork.py counts the work): each GEMM at the GPU's achievable rate for its
  shape (the `Rates` fraction of the data sheet's dense peak, times tile and wave quantization over
  the SMs, or bound by the bytes it moves), flash attention at its own rate, memory-bound kernels
  and the optimizer step by bytes at the achievable HBM bandwidth. fp32 runs at the fp32 (non-TF32)
  peak, torch's default (`torch.backends.cuda.matmul.allow_tf32` is False).
- host: the CPU time to issue the step (per kernel launched and per module; per FSDP unit; DeepSpeed's per-module
  and per-parameter hooks), priced per pass in hostcost.py.
- timeline: the host's launch stream and the GPU's queue simulated pass by pass and block by block
  (timeline.py over hostcost.step_segments): the GPU cannot run a kernel before the host issues it,
  the host runs ahead until a synchronisation found in the code makes it wait (the batch upload per
  micro-step, DeepSpeed's overflow-check .item(), the step's loss.item()). How much of the shorter clock is hidden
  follows from where each spends its time; no fitted overlap share for FSDP. DeepSpeed keeps one
  (hostcost.SERIAL) for the synchronisations not yet located in its source, applied to the time the
  timeline overlaps.
- exposed communication: wire bytes at the rate NCCL reaches on the link (intra/inter node) plus a
  latency per collective. Inside a node none of it is hidden (COMM_HIDDEN: measured none on two H200s);
  across nodes (not measured) FSDP's prefetch and ZeRO-3's overlap_comm may hide the NIC's time behind
  up to INTER_NODE_OVERLAP of the GPU's work; DeepSpeed ZeRO-1/2 reduce and re-gather with overlap_comm
  off by default: fully exposed. One GPU: none.
- offload: optimizer state traffic over PCIe and DeepSpeed's CPU Adam (torch's on FSDP offload).

The result carries the breakdown (compute, exposed_comm, host_overhead, offload, which sum to the
step) and whether the rates came from a calibration of this GPU (estimate/calibrate.py).
MFU = model TFLOPS (torchtitan's 6N + 12·L·d·T, no recomputation) / dense peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from shardlab.models import flops_per_token
from shardlab.plan import Plan

from .basis import Setup, fsdp_stage, shard_numel
from .gpus import GPU
from .hostcost import DEFAULT_LAUNCH_S, FSDP_UNIT_S, SERIAL, host_time, step_segments
from .stepwork import ATTN_BWD_FACTOR, BWD_MEM_FACTOR, Work, work
from .timeline import Timeline, simulate

BARE_SEQ_LEN = 2048  # a bare count has no sequence length; step time assumes this many tokens/sequence

# --- GPU rates when no calibration exists: fractions of the data sheet, measured by `shardlab
# calibrate` on two H200 machines (2026-12-01, torch 2.11 + CUDA 13; benchmarks/results/
# calibration_h200.json and calibration_h200_run1.json):
# MM_EFF the median of the compute-bound matmul grid (bf16 0.77 and 0.80, fp32 0.80 both);
# HBM_EFF a 1 GiB copy and add (4.29-4.31 TB/s of 4.8); ATTN_EFF and ATTN_T0 flash attention's rate
# A x T/(T + T0) (attention_eff) from SDPA forward + backward at head_dim 128, T 2048 and 4096
# (0.34 and 0.44 of the bf16 peak; narrower heads: ATTN_HD_EXP below), fp32
# (mem-efficient kernel) 0.50 at T 2048; ALIGN_EFF a GEMM whose dimension is not a multiple of
# 16 bytes (GPT-2's vocabulary 50257 in bf16: no aligned tensor-core kernel), 122 TFLOPS at
# (8192, 768, 50257) = 0.17 of the aligned rate.
DEFAULT_MM_EFF = {"bf16": 0.78, "fp16": 0.78, "fp32": 0.80}
DEFAULT_ATTN_EFF = {"bf16": 0.64, "fp16": 0.64, "fp32": 0.94}
ATTN_T0 = 1825
# ATTN_HD_EXP: below head_dim 128 flash attention reaches its rate only at longer sequences: T0 grows as
# (128/head_dim)^ATTN_HD_EXP. Each score element costs the same softmax work (exp, running max, rescale on
# the CUDA cores) whatever the head's width, while its matmul work shrinks with it, so a narrow head needs more
# keys per query block to hide that fixed part. Fitted (least squares in log space, A and T0 of head_dim 128
# held) to the head_dim-64 points of the seven H200 calibrations in benchmarks/results/calibration_h200*.json
# (SDPA forward + backward, B x H x T x hd = 8x12x1024x64: 0.079-0.179 of the bf16 peak, median 0.112;
# 2x16x4096x64: 0.315-0.333): 1.3 gives 0.119 and 0.305 (sum of squared log errors 0.56, against 1.86 for
# the earlier A x T/(T + T0) x (head_dim/128)^0.4, which gave 0.174 at T 1024, 1.5x the measured median).
# head_dim >= 128 unchanged. Checked on training rows it was not fitted to (docs/benchmarks.md, session 10).
ATTN_HD_EXP = 1.3
DEFAULT_HBM_EFF = 0.89
ALIGN_EFF = 0.17
KERNEL_FLOOR_S = 2.5e-6  # a kernel's shortest time on the GPU
TILE = 128  # cuBLAS Hopper/Ampere output tile (rows and columns) for the quantization factors
K_HALF = 96  # K at which a GEMM's main loop reaches half its rate (prologue/epilogue per tile)

# COMPILE_MEM: under torch.compile, the share of the blocks' memory-bound bytes left (hostcost.py: COMPILE_*). FSDP
# compiles its units (frameworks/fsdp2.py) and the worker's loss runs outside the model, so the fp32 logits' cast,
# log-softmax and the embedding gradient (stepwork's mem_bytes_fixed) stay eager: until session 16 they were halved
# too (H200 profile of #1013, llama200k compiled, results/host_split_h200_s16.json: 35.2 ms of memory-bound and other
# kernels measured, 9.3 predicted; the fidelity row +20.9% -> +12.6%, #915 +41.0% -> +38.9%, no other row moved).
COMPILE_MEM = 0.5
# Collectives inside a node, measured between the two H200s of a lent host over NVLink (NCCL 2.28.9, torch 2.11,
# NVLink multicast off; benchmarks/collective_probe.py, results/collectives_h200x2.json): all_gather_into_tensor
# and reduce_scatter_tensor take about 62 us plus their ring wire bytes at 271-280 GB/s (fitted over 1 MiB to 1 GiB,
# within 10% at every size), 0.61 of the data sheet's 450 GB/s per direction that gpus.py's intra_node_bw holds;
# all_reduce reaches 320 GB/s (0.71). NCCL_BUS_EFF is the gather's and scatter's share, the collectives FSDP and
# ZeRO-3 run. Not measured across nodes (no such machine is lent): the NIC rate and the same latency stand there.
# `shardlab calibrate` on a host with two or more GPUs times its own (collbench.py; Rates.nccl_*), which replace both.
NCCL_BUS_EFF = 0.61
COLLECTIVE_LATENCY_S = {"intra": 62e-6, "inter": 62e-6}
# COMM_HIDDEN: the share of FSDP's and ZeRO-3's collectives that their prefetch hides behind the GPU's work. Measured
# none: on two H200s (fidelity_h200_w2.json, 8 rows, calibrated on that host) FSDP1/FSDP2 ZeRO-2/3 and DeepSpeed
# ZeRO-3 stepped 9-13% slower than predicted with the collectives hidden (+8.9..+13.5%), and the missing time matched
# the collectives' own (gpt-1.3b FSDP2 ZeRO-3: 23.5 ms missing, 20.1 ms of collectives at the rates above); the same
# plan on one GPU of another host (#1301, no collectives) stepped 203 ms, on two 201 ms although each rank's optimizer
# step halved. Whether the GPU waits for the gathers or NCCL's kernels slow the matmuls beside them is not separated
# (a profile on two GPUs would); DeepSpeed ZeRO-1/2 run theirs with overlap_comm off and were always charged in full.
COMM_HIDDEN = 0.0
# INTER_NODE_OVERLAP: across nodes no run was measured (no machine of several nodes is lent), so the rule before
# session 21 stands there: the NIC's time of FSDP's and ZeRO-3's collectives hides behind up to this share of the
# GPU's work. Only the measured regime (inside a node) changed.
INTER_NODE_OVERLAP = 0.8
CPU_ADAM_PARAMS_PER_S = 2.5e9  # DeepSpeed CPU Adam, parameters per second per node (H100 offload rows: 78-92 TFLOPS)
# torch's AdamW on the CPU under FSDP offload, parameters per second per node, FSDP1 and FSDP2 alike:
# 0.65e9, from validation row #308 run alone on an H200 host (FSDP2, llama100k, 1.03B parameters,
# everything offloaded: 1.89 s per step; fidelity_h200_val.json). Until session 13 FSDP1 had its own
# 1.0e9 (check row #109 alone, llama65k, 503M parameters, on another host; fidelity_h200_check_alone.json);
# the same plan under FSDP1 and FSDP2 on ONE host then took the same time (#907 / #917, llama1792, 827M
# parameters: 1.539 / 1.552 s; fidelity_h200_new4b.json): the optimizer is the same torch AdamW over the
# same bytes, and the difference was the hosts'. The hosts span 0.51e9 (#907 on the first host of
# fidelity_h200_new4.json, implied) to 1.0e9 (#109's), so no default holds everywhere within 15%:
# `shardlab calibrate` times this host's own rate (microbench.cpu_adam, Rates.torch_cpu_adam), which put
# #907 / #917 at +3.7% / +0.1% (0.64e9 timed; +51.7% / +1.7% with the defaults of the time).
TORCH_CPU_ADAM_PARAMS_PER_S = 0.65e9
# DS3_OFFLOAD_COPY_BYTES_PER_S: how ZeRO-3 (optimizer offloaded, parameters on the GPU) brings the updated
# weights back differs from ZeRO-1/2's. ZeRO-1/2 (stage_1_and_2.py, step) convert the fp32 partition into a
# pinned 16-bit CPU buffer made once, then copy it up non-blocking: priced by CPU_ADAM_PARAMS_PER_S and the
# PCIe rate. ZeRO-3 (stage3.py, _reassign_or_swap_out_partitioned_parameters) calls
# `gpu_16bit_flat.copy_(cpu_fp32_flat)`; torch converts a CPU -> CUDA copy of another dtype on the CPU
# (aten/src/ATen/native/cuda/Copy.cu, copy_kernel_cuda: `src.to(dst dtype)` when the destination is CUDA)
# into a new, pageable tensor (freshly mapped pages every step), then copies that pageable buffer up in
# a blocking, staged copy. Priced per 16-bit byte landing on the GPU. Fitted to one row: validation #309
# (fidelity_h200_val.json, llama100k ZeRO-3 + CPU Adam, 1.03B parameters: 0.29 s per step above the
# other offload terms, against its no-offload twin #305 on the same host). Checked on rows not used:
# #309 again on the second host (fidelity_h200_val_s6.json: +70.7% -> +24.6%), the held-out #505
# (fidelity_h200_held.json, llama32L, 461M: +10.7% -> -8.3%). The parameter-offload path (#117, 'both')
# keeps its 16-bit partition on the CPU: no such copy.
# Session 11 (issue 14, helper i14): re-solved by the same rule (0.29 s for #309) once the gradient round trip
# below is priced apart: 0.29 s - 8 B x 1.03e9 / 50 GB/s (0.165 s) = 0.125 s for 2.06 GB -> 16.4e9 B/s. #309
# is therefore unchanged by construction; the earlier 7.1e9 held the round trip of #309's one micro-step.
DS3_OFFLOAD_COPY_BYTES_PER_S = 16.4e9
# DS3_GRAD_ROUNDTRIP_BYTES: ZeRO-3 with the optimizer offloaded keeps its gradient accumulation buffer
# (grad_partitions_flat_buffer, fp32) on the CPU: stage3.py sets self.device to the CPU when offload_optimizer
# is set and allocates that buffer there (pinned: offload_config.py pin_memory defaults to True). partition_grads
# then, every micro-step, for every parameter: at the first micro-step copies the gradient partition down into it
# (fp32: 4 B) and brings it straight back up (`grad_buffer.to(device)`, 4 B); at the later ones brings the
# buffer up (4 B), adds on the GPU and copies the sum down (4 B). The default reduce bucket (5e8 elements) holds
# a model of this size whole, so that happens at the end of the backward, and independent_gradient_partition_
# epilogue then synchronizes the reduce stream: exposed, 8 B per parameter per micro-step at the PCIe rate. The
# boundary's copy into the optimizer's fp32 gradients (4 B) is the 4 of _offload_time's (4 + P). Derived from
# the source, not fitted; checked on rows not used: tune_h200_gpt350cap_grid.json's two ZeRO-3 offload rows
# (accumulation 4 and 2) +35.5% -> +17.4% and +44.7% -> +34.4%; #505 and #309 (one micro-step) do not move (the
# constant above re-solved); #117 (parameters offloaded too: the same buffer) -6.3% -> -18.2%.
DS3_GRAD_ROUNDTRIP_BYTES = 8

# FLUSH_S_PER_BYTE: at the allocator's limit (a cap, or the GPU's memory) torch frees every cached segment that
# holds no live block (cudaFree, synchronising the device) and retries; the step then makes those segments again
# (cudaMalloc). stepsim.capped_churn replays the step with the limit and counts the bytes given back per step (no
# constant: the cap grid's gpt-350m FSDP plans at micro-batch 4 x 2 give back 6.9 GiB (FSDP1) and 11.4 GiB (FSDP2
# ZeRO-2) a step, FSDP2 ZeRO-3 settles after its second step and gives back none; every other plan of that grid
# none). The seconds per byte from benchmarks/allocator_flush_probe.py's measurement on an H200 (torch 2.11.0+cu130,
# 2026-12-02 11:42 UTC, benchmarks/results/allocator_flush_h200.json; no training step involved): under a 24 GiB cap,
# an 8 GiB request that first needs 40 cached 300 MiB segments (11.7 GiB) given back took 49.4 ms (median of 5;
# 39-73 ms; num_alloc_retries 1 each) against 3.3 ms for the same request with nothing to give back: 3.93 ms/GiB;
# making 36 x 320 MiB segments again, 0.45 ms/GiB (cudaMalloc, median of 5): 4.4 ms per GiB given back in all.
# Checked on the rows it was not fitted to (none was): the gpt350cap grid's three flushing plans.
FLUSH_S_PER_BYTE = 4.4e-3 / 2**30

# bytes per parameter the optimizer step moves on the GPU (fp32 params, grads and states):
# torch AdamW foreach (the default on CUDA): decay r/w 8, lerp m 12, v scale 8 + addcmul 12, sqrt 8,
# divide 8, add eps 8, addcdiv 16 = 80; DeepSpeed FusedAdam / torch fused: r p g m v, w p m v = 28;
# SGD with momentum foreach: 40.
OPT_BYTES = {("foreach", "adamw"): 80, ("foreach", "adam"): 80, ("foreach", "sgd"): 40,
             ("fused", "adamw"): 28, ("fused", "adam"): 28, ("fused", "sgd"): 40}


@dataclass(frozen=True)
class Rates:
    """Achievable rates on one GPU kind; defaults are the constants above, a calibration replaces them."""

    mm_eff: dict = field(default_factory=lambda: dict(DEFAULT_MM_EFF))
    attn_eff: dict = field(default_factory=lambda: dict(DEFAULT_ATTN_EFF))
    attn_t0: float = ATTN_T0
    align_eff: float = ALIGN_EFF
    hbm_eff: float = DEFAULT_HBM_EFF
    launch_s: float = DEFAULT_LAUNCH_S
    fsdp_unit_s: float = FSDP_UNIT_S
    gpu_scale: float = 1.0  # refit from runs (calibrate --from-runs): the GPU's work
    host_fit: float = 1.0  # refit from runs: all host time
    ds3_hook_scale: float = 1.0  # DeepSpeed's hooks timed on this host (calibrate) over DS3_* / DS12_PARAM_S
    ds12_hook_scale: float = 1.0
    torch_cpu_adam: float | None = None  # torch's AdamW on this host's CPU, parameters/s (calibrate); None: TORCH_CPU_ADAM_PARAMS_PER_S
    # collectives between this host's GPUs (calibrate on two or more GPUs, collbench.py); None: COLLECTIVE_LATENCY_S
    # and NCCL_BUS_EFF x the table's intra_node_bw
    nccl_latency_s: float | None = None
    nccl_bus_bytes_per_s: float | None = None
    calibrated: bool = False
    source: str = "defaults (GPU table data sheet, documented efficiencies)"

    def with_(self, **kw) -> "Rates":
        return replace(self, **kw)


def _gemm_time(m: int, k: int, n: int, count: int, peak: float, eff: float, bw: float, P: int, sms: int,
               align_eff: float = ALIGN_EFF) -> float:
    if P == 2 and (m % 8 or k % 8 or n % 8):  # 16-byte alignment of 2-byte tensor-core operands
        eff *= align_eff
    tiles_m, tiles_n = math.ceil(m / TILE), math.ceil(n / TILE)
    tiles = tiles_m * tiles_n
    tile_q = (m * n) / (tiles * TILE * TILE)
    wave_q = tiles / (math.ceil(tiles / sms) * sms)
    rate = peak * eff * tile_q * wave_q * k / (k + K_HALF)
    flops = 2.0 * m * k * n
    moved = (m * k + k * n + m * n) * P
    return count * (max(flops / rate, moved / bw) + KERNEL_FLOOR_S)


_GEMM_CACHE: dict[tuple, tuple[float, float]] = {}


def gpu_work_time(w: Work, gpu: GPU, precision: str, P: int, r: Rates) -> tuple[float, float, float]:
    """(matmul_s, attention_s, memory_s) of one micro-step's forward + backward."""
    key = (id(w), gpu.name, gpu.bf16_tflops, gpu.fp32_tflops, gpu.hbm_bw, gpu.sms, precision, r.mm_eff.get(precision),
           r.attn_eff.get(precision), r.hbm_eff, r.attn_t0, r.align_eff)
    got = _GEMM_CACHE.get(key)
    if got is not None and got[0] is w:
        return got[1]
    peak = gpu.peak_tflops(precision) * 1e12
    bw = gpu.hbm_bw * r.hbm_eff
    eff = r.mm_eff.get(precision, DEFAULT_MM_EFF["bf16"])
    mm = sum(_gemm_time(g.m, g.k, g.n, g.count, peak, eff, bw, P, gpu.sms, r.align_eff) for g in w.gemms)
    a_eff = eff if w.attn_math else attention_eff(r.attn_eff.get(precision, DEFAULT_ATTN_EFF["bf16"]), w.seq, w.head_dim, r.attn_t0, precision != "fp32")
    a_peak = peak
    if w.attn_fp32:  # the math path upcast 16-bit attention: its GEMMs at the fp32 rate
        a_peak, a_eff = gpu.peak_tflops("fp32") * 1e12, r.mm_eff.get("fp32", DEFAULT_MM_EFF["fp32"])
    flops = w.attn_flops + w.attn_small_k_flops * K_HALF / w.head_dim  # math path: K = head_dim GEMMs at K/(K+K_HALF)
    attn = flops / (a_peak * a_eff) if flops else 0.0
    mem = (w.mem_elems * P + w.mem_bytes_fixed) / bw + w.kernels * KERNEL_FLOOR_S
    out = (mm, attn, mem)
    _GEMM_CACHE[key] = (w, out)
    return out


def attention_eff(a: float, seq: int, head_dim: int, t0: float = ATTN_T0, flash: bool = True) -> float:
    """Fused attention's share of the peak. Flash (bf16 / fp16): A x T/(T + T0 x max(1, 128/head_dim)^ATTN_HD_EXP).
    fp32 runs SDPA's memory-efficient kernel, measured at head_dim 128 only: A x T/(T + T0) x min(1, head_dim/128)^0.4
    (the earlier curve, whose head_dim factor came from one flash point at T 4096)."""
    if not flash:
        return a * seq / (seq + t0) * min(1.0, (head_dim / 128) ** 0.4)
    return a * seq / (seq + t0 * max(1.0, 128 / head_dim) ** ATTN_HD_EXP)


def optimizer_bytes(plan: Plan, s: Setup, local: int) -> float:
    """Bytes the optimizer step and the framework's per-step copies move on the GPU (per GPU)."""
    step, per_micro = optimizer_bytes_split(plan, s, local)
    return step + per_micro * s.micro_steps


def optimizer_bytes_split(plan: Plan, s: Setup, local: int) -> tuple[float, float]:
    """(bytes of the optimizer step, bytes of the framework's copies in each micro-step's forward and
    backward: FSDP's all-gather / reduce-scatter copies, DeepSpeed's gradient buckets)."""
    if s.offload_opt != "none":
        return 2.0 * s.P * local, 0.0  # only the updated 16-bit weights come back and are copied in place
    opt = plan.optimizer.name
    if s.ds:
        b = OPT_BYTES[("fused", opt)] * local
        b += (2 * s.P + 20 if s.P != 4 else 12) * local  # grads to fp32, norm, unscale, fp32 -> 16-bit copy
        per_micro = 2 * s.P * (2 if s.stage == "zero3" else 1)  # bucket copies (+ ZeRO-3 gather copies)
        return b, per_micro * s.spec.params / max(1, s.shard if s.stage != "ddp" else 1)
    b = OPT_BYTES[("foreach", opt)] * local
    if plan.gradient_clipping:
        b += 12 * local  # norm (r 4) and scale (r/w 8)
    gathers = {"zero3": 2, "zero2": 1}.get(s.stage, 0)
    # all-gather copy-in (fp32 -> compute dtype) and copy-out per gather; reduce-scatter copy-in,
    # fp32 cast and accumulation per micro-step; NO_SHARD casts the parameters once per forward
    per_micro = gathers * (4 + 3 * s.P) + (3 * s.P + 4) if s.stage != "ddp" else (4 + s.P) + 2 * s.P
    return b, per_micro * local


def gpu_phases(w: Work, gpu: GPU, precision: str, P: int, r: Rates,
               work_s: tuple[float, float, float]) -> tuple[float, float, float, float]:
    """GPU seconds of (all blocks' forward, all blocks' backward, the rest's forward, the rest's backward)
    in one micro-step: the forward is each block GEMM's first product once (the recomputation under
    checkpointing runs in the backward), attention's forward, the blocks' memory-bound forward; the rest
    is the embedding, final norm, the vocabulary's GEMMs and the fp32 loss. work_s: gpu_work_time's
    (matmul, attention, memory-bound) seconds of the micro-step, which the phases split."""
    peak = gpu.peak_tflops(precision) * 1e12
    bw = gpu.hbm_bw * r.hbm_eff
    eff = r.mm_eff.get(precision, DEFAULT_MM_EFF["bf16"])
    mm, attn, mem = work_s
    t = [_gemm_time(g.m, g.k, g.n, g.count, peak, eff, bw, P, gpu.sms, r.align_eff) for g in w.gemms]
    if w.bare:
        return mm / 3 + mem / 3, mm * 2 / 3 + 2 * mem / 3, 0.0, 0.0
    fwd_times = w.gemms[0].count // max(1, w.gemms[1].count)
    blk_f = sum(t[i] for i in range(0, len(t) - 3, 3)) / fwd_times
    head_f, head = t[-3], sum(t[-3:])
    a_f = attn / (fwd_times + ATTN_BWD_FACTOR)
    blk_mem_f = w.fwd_elems * P / bw  # one forward pass; the backward moves BWD_MEM_FACTOR times that more
    rest_mem = max(0.0, mem - w.fwd_elems * (fwd_times + BWD_MEM_FACTOR) * P / bw - w.kernels * KERNEL_FLOOR_S)
    fwd = blk_f + a_f + blk_mem_f + w.fwd_kernels * KERNEL_FLOOR_S
    rest_f = head_f + w.fwd_fixed_bytes / bw
    rest_b = head - head_f + max(0.0, rest_mem - w.fwd_fixed_bytes / bw)
    return fwd, mm + attn + mem - fwd - rest_f - rest_b, rest_f, rest_b


def _timeline(plan: Plan, s: Setup, w: Work, r: Rates, gpu: GPU, work_s: tuple[float, float, float], compiled: float,
              local: int) -> Timeline:
    """The step's host and GPU clocks (timeline.py) over hostcost.step_segments: the GPU's work by pass,
    the framework's per-micro-step copies half in each pass, the optimizer step at the end."""
    hbm = gpu.hbm_bw * r.hbm_eff
    step_b, micro_b = optimizer_bytes_split(plan, s, local)
    blk_f, blk_b, loss_f, loss_b = (x * compiled * r.gpu_scale for x in gpu_phases(w, gpu, plan.precision, s.P, r, work_s))
    copies = micro_b / hbm / 2 * r.gpu_scale
    ph = (blk_f + copies, blk_b + copies, loss_f, loss_b)
    return simulate(step_segments(plan, s, w, r, ph, step_b / hbm * r.gpu_scale, KERNEL_FLOOR_S))


def _comm_time(s: Setup, gpu: GPU, wire: dict, w: Work, r: Rates) -> tuple[float, float]:
    """The collectives' seconds per optimizer step, as (inside the node with every call's latency, the NIC's bytes):
    wire bytes at NCCL's measured share of the link (this host's own rate where calibrate timed it), plus a latency
    per call: FSDP calls per unit (ZeRO-3: gather forward and backward, scatter; ZeRO-2: one gather, the scatter;
    NO_SHARD / replicate: the all-reduce), DeepSpeed ZeRO-3 likewise per module, ZeRO-1/2 and DDP per bucket."""
    t = wire["intra_node"] / (r.nccl_bus_bytes_per_s or gpu.intra_node_bw * NCCL_BUS_EFF)
    if s.world > 1:
        calls = {"zero3": 3, "zero2": 2}.get(s.stage, 1)  # hybrid is ZeRO-3 here (basis.Setup.stage)
        per_micro = calls * w.units if (not s.ds or s.stage == "zero3") else max(1, w.units // 4)
        lat = COLLECTIVE_LATENCY_S["inter"] if s.nodes > 1 else (r.nccl_latency_s or COLLECTIVE_LATENCY_S["intra"])
        t += per_micro * s.micro_steps * lat
    return t, wire["inter_node"] / gpu.inter_node_bw


def _offload_time(s: Setup, gpu: GPU, r: Rates) -> float:
    if s.offload_opt == "none" and s.offload_params == "none":
        return 0.0
    local = s.spec.params if s.stage == "ddp" else shard_numel(s)
    moved = (4 + s.P) * local
    if s.stage == "zero3" and s.offload_params != "none":
        moved += 2 * s.P * local * s.micro_steps  # gathered shards come up for forward and backward
    if s.ds and s.stage != "zero3" and s.micro_steps > 1:
        # DeepSpeed ZeRO-1/2 with the optimizer offloaded accumulates gradients in CPU memory: every
        # micro-step copies its gradients down, and each after the first brings the sum up to add to
        # (stage_1_and_2.py, async_accumulate_grad_in_cpu_via_gpu): (2 x micro-steps - 1) 16-bit copies.
        # Not fitted: tune_h200_gpt350cap_grid.json's ZeRO-2 mb2x4 offload row +31.8% -> +10.1%; the held-out
        # #504 (fidelity_h200_held.json, ga 2) -2.9% -> -17.2%, where the copies look hidden under the backward
        moved += (2 * s.micro_steps - 1) * s.P * local
    rate = CPU_ADAM_PARAMS_PER_S if s.ds else (r.torch_cpu_adam or TORCH_CPU_ADAM_PARAMS_PER_S)
    t = moved / gpu.pcie_bw + local * s.gpn / rate
    if s.ds and s.stage == "zero3" and s.offload_params == "none":
        t += s.P * local / DS3_OFFLOAD_COPY_BYTES_PER_S  # the converting, pageable copy back (above)
    if s.ds and s.stage == "zero3":  # the gradient's round trip through the CPU buffer, every micro-step (above)
        t += DS3_GRAD_ROUNDTRIP_BYTES * local * s.micro_steps / gpu.pcie_bw
    return t


# FSDP1 on one rank runs NO_SHARD whatever the plan asks (basis.fsdp_stage): its step has NO_SHARD's
# hooks and copies. Found while reading issue 20's llama1b grid (tune_h200_llama1b_grid.json), so that
# grid is not held out for this rule; checked on earlier rows.
def _effective(s: Setup) -> Setup:
    stage = fsdp_stage(s)
    return s if stage == s.stage else replace(s, stage=stage)


def _allocator_flush_time(plan: Plan, s: Setup, gpu: GPU) -> float:
    """Seconds per step the caching allocator spends giving its cache back at its limit and making it again
    (FLUSH_S_PER_BYTE): only where the replayed step (stepsim.py, FSDP without offload) reserves more than the
    allocator may hold, so every other plan pays nothing and costs no second replay."""
    from .allocator import allocator_limit
    from .memory import cublas_workspaces
    from .stepsim import capped_churn

    churn = capped_churn(plan, s, cublas_workspaces(gpu), allocator_limit(gpu))
    return churn[1] * FLUSH_S_PER_BYTE if churn else 0.0


SERIAL_RAMP = 0.5


def _serial_share(s: Setup, tl: Timeline) -> float:
    """The share of the overlapped time DeepSpeed's unlocated synchronisations expose (hostcost.SERIAL). ZeRO-0/1
    (which reduce at the accumulation boundary only): only where the GPU's work outlasts the host's issuing, growing
    from none where the two are equal to SERIAL's at (1 + SERIAL_RAMP) x the host's (a ramp, so that a plan crossing
    over does not jump; a step instead gave the same counts within 2 rows). Where the host is the longer side the
    GPU's queue is short at every synchronisation, so a wait costs what the timeline already has: the six profiled
    host-bound ZeRO-0/1 steps stepped 0-11 ms past their measured host time (host_split_h200_s15..s21.json: #508,
    #703, #118, #1004, #1310, #1314), where the share added 9-36 ms. All 383 recorded rows: uncalibrated median
    10.2% -> 10.1%, over 25% 39 -> 32; calibrated median 9.8% -> 9.7%, over 15% 67 -> 64, over 25% 14 -> 11
    (benchmarks/steptime_accuracy.py, session 21). ZeRO-2 keeps the share everywhere: its one profiled host-bound
    step (#1006) agreed, but three unprofiled ZeRO-2 rows with host and GPU near balance (#802, #1308, #302) moved
    past 25% without it."""
    if not s.ds:
        return 0.0
    if s.stage in ("zero3", "zero2"):
        return SERIAL["deepspeed_zero3" if s.stage == "zero3" else "deepspeed"]
    host = tl.host - tl.host_wait
    return SERIAL["deepspeed"] * min(1.0, max(0.0, (tl.gpu_busy - host) / (SERIAL_RAMP * max(host, 1e-9))))


def step_time(plan: Plan, s: Setup, gpu: GPU, wire: dict, rates: Rates | None = None) -> dict:
    r = rates or Rates()
    flush = _allocator_flush_time(plan, s, gpu)
    s = _effective(s)
    spec = s.spec
    seq = BARE_SEQ_LEN if spec.is_bare else spec.seq_len
    precision = plan.precision
    w = work(spec, plan.micro_batch_size, seq, s.P, plan.activation_checkpointing)
    work_s = gpu_work_time(w, gpu, precision, s.P, r)
    mm, attn, mem = work_s
    hbm = gpu.hbm_bw * r.hbm_eff
    if plan.compile and not s.ds:  # Inductor fuses the compiled blocks' memory-bound kernels; the loss stays eager
        fixed = w.mem_bytes_fixed / hbm
        mem = fixed + (mem - fixed) * COMPILE_MEM
    local = spec.params if s.stage == "ddp" else shard_numel(s)
    opt = optimizer_bytes(plan, s, local) / hbm
    gpu_s = ((mm + attn + mem) * s.micro_steps + opt) * r.gpu_scale
    host_s = host_time(plan, s, w, r)
    tl = _timeline(plan, s, w, r, gpu, work_s, (mm + attn + mem) / max(1e-30, sum(work_s)), local)
    core = tl.step + _serial_share(s, tl) * tl.overlapped
    intra, inter = _comm_time(s, gpu, wire, w, r)
    comm_s = intra + inter
    if s.ds and s.stage != "zero3":
        exposed = comm_s
    else:
        exposed = intra - COMM_HIDDEN * min(intra, gpu_s) + max(0.0, inter - INTER_NODE_OVERLAP * gpu_s)
    offload = _offload_time(s, gpu, r)
    core += flush * r.host_fit
    total = core + exposed + offload
    tokens = plan.micro_batch_size * seq * s.micro_steps
    fpt = flops_per_token(spec, seq)
    model_flops = fpt * tokens
    peak = gpu.peak_tflops(precision) * 1e12
    tflops = model_flops / total / 1e12
    scale = r.gpu_scale * s.micro_steps
    host_over = max(0.0, core - gpu_s)  # core >= gpu_s; the clamp keeps a rounding -0.0 out of the summary
    return {
        "step_time_s": total,
        "compute_s": gpu_s,
        "host_overhead_s": host_over,
        "comm_s": comm_s,
        "exposed_comm_s": exposed,
        "offload_s": offload,
        "breakdown": {"compute": gpu_s, "exposed_comm": exposed, "host_overhead": host_over, "offload": offload},
        "detail": {"matmul_s": mm * scale, "attention_s": attn * scale, "memory_bound_s": mem * scale,
                   "optimizer_s": opt * r.gpu_scale, "host_s": host_s, "kernels_per_micro_step": w.kernels,
                   "gpu_idle_s": tl.gpu_idle, "host_wait_s": tl.host_wait, "overlapped_s": tl.overlapped,
                   "allocator_flush_s": flush * r.host_fit},
        "calibrated": r.calibrated,
        "rates_source": r.source,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / total,
        "tokens_per_s_global": tokens * s.world / total,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak,
        "efficiency": model_flops / (gpu_s * peak) if gpu_s else 0.0,
        "flops_per_token": fpt,
    }
