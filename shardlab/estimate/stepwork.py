"""The work of one training micro-step, from the model's shapes: what steptime.py puts a time on.

A step is counted as the runner's model (shardlab/run/gpt.py) executes it, per GPU, for one
micro-batch of `tokens = micro_batch x seq_len`:

- matmuls: every nn.Linear runs three GEMMs (forward M=tokens, K=in, N=out; input gradient K=out,
  N=in; weight gradient M=in, K=tokens, N=out), each 2·M·K·N FLOPs; activation checkpointing runs
  each block's forward GEMMs once more;
- attention: the fused (flash) SDPA kernel, causal: forward 2·tokens·T·d FLOPs (half of QK^T + AV),
  backward 2.5x forward (it recomputes the scores);
- memory-bound kernels (norms, rotary embedding, activations, residual adds, the transpose copy,
  the fp32 cross entropy over the vocabulary, the embedding gradient) by the bytes they read and
  write: one pass counts an element read or written once;
- counts for the host side: kernels launched, modules and parameter tensors (the hooks DeepSpeed
  ZeRO-3 runs per module and per parameter), FSDP units.

Element counts per token per block (forward; backward moves about twice as much):
- gpt: LayerNorm 2d each (2), out-projection's transpose copy 2d, residual adds 3d each (2), GELU 2f
  -> 12d + 2f elements;
- llama: RMSNorm 6d each (torch's decomposed rms_norm: square, mean, rsqrt, two products, with an
  fp32 intermediate), the rotary embedding 9 passes over q and k (four products, a sum, a
  difference, a concatenation), SwiGLU 5f (SiLU 2f, product 3f) -> 20d + 9(d + kv) + 5f.
Loss per token: logits cast to fp32 (2·(P + 4) bytes with the backward cast, none in fp32), and per
vocabulary entry LOSS_FWD_BYTES forward and LOSS_BWD_BYTES backward (below).
A transformers LlamaForCausalLM of the same shape is priced as the llama family: issue 13's H200
rows with the Hugging Face factory came within 2-12% of that (three runs sharing the GPU), so no
separate term is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardlab.models import ModelSpec

from .activations import sdpa_math

BWD_MEM_FACTOR = 2.0  # backward of an elementwise op reads its inputs and the incoming gradient, writes one or two gradients
ATTN_BWD_FACTOR = 2.5  # flash attention backward: 5 matmuls of the forward's 2 (scores recomputed)
# SDPA's math path (activations.sdpa_math: fp32 with grouped-query heads on CUDA, torch 2.11; H200 probe
# benchmarks/results/sdpa_backend_probe_h200_fp32.jsonl) runs attention as separate kernels on the whole
# [B, heads, T, T] score matrix, causal or not: two batched GEMMs forward (q k^T, probabilities x v) and four
# backward, at the matmul rate (Work.attn_math), the two whose K is head_dim (q k^T, dO v^T) slowed as any GEMM
# of that K (steptime.K_HALF; cuBLAS picks narrower tiles for N = head_dim, so no tile quantization), and the
# memory-bound passes over the scores between them, in 4-byte elements per score: the causal mask added (read
# the scores and the broadcast [T, T] mask, write: 3) and the softmax (read, write: 2) forward; the softmax
# backward (read the output and its gradient, write: 3). Read from aten's _scaled_dot_product_attention_math,
# nothing fitted. Judged by the fp32 GQA rows (steptime_accuracy.py): #911 (T=8192) +87.7% -> +17.1%, #806
# +12.9% -> -1.5%, #708 +6.7% -> +2.0%, #712 -12.1% -> -12.2%.
MATH_SCORE_FWD_ELEMS = 5
MATH_SCORE_BWD_ELEMS = 3
# KERNELS_PER_BLOCK: kernels (aten operators that reach the GPU) one block of shardlab's own model launches in its forward and
# in its backward, counted on an H200 with the runner's model at 4, 8 and 12 blocks (benchmarks/host_phase_probe.py
# --device cuda --layers N, results/host_phase_h200_L4.json, _L12.json: the same count per added block). Llama's forward
# makes its rotary angles in every block (arange, cos, sin and their casts: no backward), so it launches more forward than
# backward. Until session 18 these were 12 and 24 forward with twice that backward, which priced a Llama block's host at
# the GPT block's rate per kernel by way of FWD_HOST_RATIO. A block counted from the model (blockwork.py) has its own.
KERNELS_PER_BLOCK = {"gpt": (10, 19), "llama": (49, 42)}
# LOSS_FWD_BYTES / LOSS_BWD_BYTES: HBM bytes per fp32 logit of the loss, forward and backward. A vocabulary row does not
# fit the softmax kernel's shared memory, so its forward reads the row three times (maximum, sum of exponentials, the
# output) and writes it once: 16; its backward reads the incoming gradient twice and the output once and writes once (16),
# after nll_loss's backward has zero-filled its [tokens, vocab] gradient (4): 20. Measured in the H200 profiles
# (results/host_split_h200_s15b/s16/s17.json, cunn_SoftMaxForward / cunn_SoftMaxBackward against tokens x vocab at the
# calibrated bandwidth, 12 rows, vocabularies 32k-256k): forward 13.5-17.0 B (median 16.4), backward 16.8-18.5 (median
# 17.4) with the fill apart (FillFunctor, #1013: 3.8 B). Until session 18: 8 and 12, which the profiles' memory-bound
# "other" kernels measured 1.5-2.6x over the prediction partly come from (#1013, llama200k: 12.8 ms of softmax against
# 5.5 ms priced for the whole loss).
LOSS_FWD_BYTES = 16
LOSS_BWD_BYTES = 20
# TOP_KERNELS: the rest of the model per micro-step (embedding, final norm, LM head, the fp32 loss), forward and backward:
# 9 + 10 (GPT) and 6 + 8 (Llama) on the H200 (the same files: total less the blocks), 8 + 7 for transformers' Llama
# (host_phase_h200_hf3.json against its counted block).
TOP_KERNELS = (10, 10)


@dataclass(frozen=True)
class Gemm:
    m: int
    k: int
    n: int
    count: int  # how many times per micro-step

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class Work:
    """One micro-step's work on one GPU (forward + backward, no optimizer)."""

    tokens: int
    seq: int
    gemms: tuple[Gemm, ...]
    attn_flops: float
    head_dim: int
    mem_elems: float  # activation-dtype elements moved by memory-bound kernels
    mem_bytes_fixed: float  # bytes moved in fixed dtypes (fp32 loss, embedding gradient)
    kernels: int  # kernels launched in forward + backward
    modules: int
    param_tensors: int
    units: int  # FSDP transformer-policy units (blocks + root)
    bare: bool = False
    # the forward's share, for the host/GPU timeline (timeline.py): what one forward pass of all blocks
    # moves and launches (recomputation under checkpointing is the backward's), and the loss's forward bytes
    fwd_elems: float = 0.0
    fwd_fixed_bytes: float = 0.0
    fwd_kernels: int = 0
    recompute_kernels: int = 0  # the blocks' forward launched again in backward (checkpointing), counted in kernels
    attn_math: bool = False  # attn_flops are SDPA math path's batched GEMMs (full T x T), at the matmul rate
    attn_small_k_flops: float = 0.0  # of those, the GEMMs whose K is head_dim (steptime.K_HALF slows them)
    attn_fp32: bool = False  # the math path's GEMMs run in fp32 whatever the model's dtype (16-bit inputs upcast)


def implementation(spec: ModelSpec) -> str:
    """Whose block the counts follow: 'gpt' or 'llama' (run/gpt.py's)."""
    return "llama" if spec.family == "llama" else "gpt"


def _linears(spec: ModelSpec) -> list[tuple[int, int]]:
    d, f, kv, q = spec.hidden, spec.ffn, spec.kv_dim, spec.q_dim
    if spec.family == "gpt":
        return [(d, q + 2 * kv), (q, d), (d, f), (f, d)]
    return [(d, q + 2 * kv), (q, d), (d, f), (d, f), (f, d)]


_CACHE: dict[tuple, Work] = {}


def work(spec: ModelSpec, micro_batch: int, seq: int, act_bytes: int, checkpointing: bool) -> Work:
    """The micro-step's work for a shaped model (cached: widgets call this on every change)."""
    key = (spec.name, spec.layers, spec.hidden, spec.heads, spec.vocab, spec.kv_heads, spec.ffn_hidden, spec.family,
           spec.params_override, implementation(spec), spec.source, spec.head_size, micro_batch, seq, act_bytes, checkpointing)
    got = _CACHE.get(key)
    if got is None:
        got = _CACHE[key] = _bare(spec, micro_batch, seq) if spec.is_bare else _shaped(spec, micro_batch, seq, act_bytes, checkpointing)
    return got


def _shaped(spec: ModelSpec, mb: int, seq: int, P: int, ac: bool) -> Work:
    n, L, d, f, kv, V = mb * seq, spec.layers, spec.hidden, spec.ffn, spec.kv_dim, spec.vocab
    impl = implementation(spec)
    fwd_times = 2 if ac else 1
    gemms = []
    for i, o in _linears(spec):
        gemms += [Gemm(n, i, o, L * fwd_times), Gemm(n, o, i, L), Gemm(i, n, o, L)]
    gemms += [Gemm(n, d, V, 1), Gemm(n, V, d, 1), Gemm(d, n, V, 1)]
    attn = 2.0 * n * seq * spec.q_dim * L * (fwd_times + ATTN_BWD_FACTOR)
    scores = small_k = 0.0
    bw = spec.block_work  # a real model's block, counted (blockwork.py); else shardlab's own block
    # a counted block whose attention CUDA runs unfused (blockwork: math_attention; transformers' Falcon passes its one
    # KV head without enable_gqa): the same GEMMs, their memory-bound passes already among the counted elements, and in
    # fp32 whatever the model's dtype (the math path upcasts 16-bit q, k, v). H200 profile of #1101 (hf:falcon, FSDP2,
    # results/host_split_h200_s17.json): no attention kernel, 50.7 ms of matmuls where 18.3 were predicted with flash.
    counted_math = bool(bw and bw.get("math_attention"))
    if sdpa_math(spec, P) or counted_math:  # SDPA's math path: the T x T scores as GEMMs and memory-bound passes (above)
        scores = L * mb * spec.heads * seq * seq  # score elements of all blocks
        attn = 2.0 * scores * spec.head_dim * (2 * fwd_times + 4)  # each of those GEMMs: 2 x T x T x head_dim
        small_k = 2.0 * scores * spec.head_dim * (fwd_times + 1)  # q k^T and dO v^T: K = head_dim
    if bw:
        per_tok = bw["elems_per_token"]
    elif spec.family == "gpt":
        per_tok = 12 * d + 2 * f
    else:
        per_tok = 20 * d + 9 * (d + kv) + 5 * f
    mem = n * L * per_tok * (fwd_times + BWD_MEM_FACTOR) + n * (2 * d) * (1 + BWD_MEM_FACTOR) + 2 * n * d
    mem += 0 if counted_math else scores * (MATH_SCORE_FWD_ELEMS * fwd_times + MATH_SCORE_BWD_ELEMS)
    cast = 2 * (P + 4) if P != 4 else 0
    fixed = n * V * (cast + LOSS_FWD_BYTES + LOSS_BWD_BYTES) + 2 * V * d * P  # fp32 loss; dense embedding gradient (zeroed, then written)
    # a count made before blockwork counted backward kernels: twice the forward, as before
    kpb, kpb_b = (bw["kernels"], bw.get("bwd_kernels") or 2 * bw["kernels"]) if bw else KERNELS_PER_BLOCK[impl]
    kernels = L * (kpb * fwd_times + kpb_b) + sum(TOP_KERNELS)
    if bw:
        modules, params, top_m, top_p = bw["modules"], bw["params"], bw["top_modules"], bw["top_params"]
    elif spec.family == "gpt":
        modules, params, top_m, top_p = 9, 12, 6, 5
    else:
        modules, params, top_m, top_p = 10, 7, 5, 3
    fwd_fixed = n * V * ((P + 4 if P != 4 else 0) + LOSS_FWD_BYTES)  # logits cast and log-softmax forward
    return Work(n, seq, tuple(gemms), attn, spec.head_dim, mem, fixed, kernels, L * modules + top_m, L * params + top_p, L + 1,
                fwd_elems=n * L * per_tok + (0 if counted_math else scores * MATH_SCORE_FWD_ELEMS), fwd_fixed_bytes=fwd_fixed,
                fwd_kernels=L * kpb + TOP_KERNELS[0], recompute_kernels=L * kpb if ac else 0, attn_math=bool(scores), attn_small_k_flops=small_k,
                attn_fp32=counted_math)


def _bare(spec: ModelSpec, mb: int, seq: int) -> Work:
    """A bare parameter count: no shapes, so one large GEMM family carrying 6·N FLOPs per token."""
    n = mb * seq
    k = 4096
    cols = max(1, spec.params // k)
    units = max(1, spec.wrap_unit_count) + 1
    return Work(n, seq, (Gemm(n, k, cols, 3),), 0.0, 128, 0.0, 0.0, 40 * units, 10 * units, 8 * units, units, bare=True,
                fwd_kernels=40 * units // 3)
