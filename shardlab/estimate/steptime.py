"""Step time, tokens/s, TFLOPS and MFU (named steptime.py so it does not shadow the stdlib `time`).

step = compute + exposed communication + offload traffic and CPU optimizer time, where
- compute = executed FLOPs / (peak x efficiency). Executed FLOPs are torchtitan's model FLOPs
  (6N + 12·L·d·T per token) plus a recomputed forward (a third more) under activation checkpointing.
  EFFICIENCY is the fraction of the dense peak a framework's step reaches with no communication at
  all, from DESIGN.md's measurement on one H100 (0.94B GPT, T=2048, micro-batch 4, bf16): FSDP1/2
  about 470 TFLOPS, DeepSpeed ZeRO-1/2 400, ZeRO-3 300, out of 989.
- communication time = intra-node wire bytes / intra-node bandwidth + inter-node / inter-node.
  Collectives issued alongside compute (FSDP's prefetched all-gathers and per-unit reduce-scatters,
  DeepSpeed ZeRO-3 with overlap_comm) hide behind at most OVERLAP of the compute time; DeepSpeed
  ddp/ZeRO-1/2 reduce and re-gather with overlap_comm off by default, so those are fully exposed.
- offload: optimizer state traffic over PCIe (fp32 gradients down, updated weights up) plus the CPU
  optimizer at CPU_ADAM_PARAMS_PER_S (DeepSpeed's CPU Adam; torch's on FSDP offload is slower).
  These rates reproduce DESIGN.md's 87 TFLOPS for ZeRO-2 + CPU offload within about 10%.
MFU = model TFLOPS (without recomputation) / dense peak, as torchtitan reports it.
"""

from __future__ import annotations

from shardlab.models import flops_per_token
from shardlab.plan import Plan

from .gpus import GPU
from .basis import Setup, shard_numel

EFFICIENCY = {("fsdp", "any"): 0.475, ("deepspeed", "zero3"): 0.30, ("deepspeed", "other"): 0.40}
OVERLAP = 0.8
CPU_ADAM_PARAMS_PER_S = 2.5e9  # DeepSpeed CPU Adam, parameters updated per second per node's share
TORCH_CPU_ADAM_PARAMS_PER_S = 0.5e9
BARE_SEQ_LEN = 2048  # a bare count has no sequence length; step time assumes this many tokens/sequence


def efficiency(s: Setup) -> float:
    if not s.ds:
        return EFFICIENCY[("fsdp", "any")]
    return EFFICIENCY[("deepspeed", "zero3" if s.stage == "zero3" else "other")]


def step_time(plan: Plan, s: Setup, gpu: GPU, wire: dict) -> dict:
    spec = s.spec
    seq = BARE_SEQ_LEN if spec.is_bare else spec.seq_len
    tokens = plan.micro_batch_size * seq * s.micro_steps
    model_flops = flops_per_token(spec, seq) * tokens
    executed = model_flops * (4 / 3 if plan.activation_checkpointing else 1)
    peak = gpu.peak_tflops(plan.precision) * 1e12
    compute = executed / (peak * efficiency(s))
    comm_s = wire["intra_node"] / gpu.intra_node_bw + wire["inter_node"] / gpu.inter_node_bw
    if s.ds and s.stage != "zero3":
        exposed = comm_s
    else:
        exposed = max(0.0, comm_s - OVERLAP * compute)
    offload = 0.0
    if s.offload_opt != "none" or s.offload_params != "none":
        local = spec.params if s.stage == "ddp" else shard_numel(s)
        moved = (4 + s.P) * local
        if s.stage == "zero3" and s.offload_params != "none":
            moved += 2 * s.P * local * s.micro_steps  # gathered shards come up for forward and backward
        rate = CPU_ADAM_PARAMS_PER_S if s.ds else TORCH_CPU_ADAM_PARAMS_PER_S
        offload = moved / gpu.pcie_bw + local * s.gpn / rate
    total = compute + exposed + offload
    tflops = model_flops / total / 1e12
    return {
        "step_time_s": total,
        "compute_s": compute,
        "comm_s": comm_s,
        "exposed_comm_s": exposed,
        "offload_s": offload,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / total,
        "tokens_per_s_global": tokens * s.world / total,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak,
        "efficiency": efficiency(s),
        "flops_per_token": flops_per_token(spec, seq),
    }
