"""Activation memory of one micro-batch as the runner's models really hold it on a GPU.

Counted from what autograd saves (checked per tensor with torch.autograd.graph.saved_tensors_hooks
on the runner's blocks, and as a whole against the traced estimate and the H200 fidelity matrix):

- gpt block, elements per token: LN1 input d, LN1 output d (the qkv input), the fused qkv output
  d+2kv (SDPA's k, q, v are views of it, so the whole storage stays), the SDPA output d (the out
  projection's input is a view of it), LN2 input d, LN2 output d, fc output f (GELU input), GELU
  output f  ->  6d + 2kv + 2f; each LayerNorm also keeps its fp32 mean and rstd per token (16 bytes
  per block).
- llama block: norm1 input d and output d, qkv output d+2kv, the rotated q d and k kv (new tensors),
  SDPA output d, the out projection's input d, norm2 input d and output d, gate output f, SiLU
  output f, up output f, their product f (the down projection's input)  ->  8d + 3kv + 4f. The out
  projection's input is a copy here, unlike gpt's: RoPE's torch.cat makes q contiguous as
  [B, heads, T, head_dim], the flash kernel allocates its output with q's layout (empty_like), so
  y.transpose(1, 2).reshape(B, T, d) must copy (checked with saved_tensors_hooks on the runner's
  block, and on the H200: every llama row without checkpointing peaked 2d bytes per token per
  layer above 7d + 3kv + 4f, gpt rows within 17 bytes). RoPE keeps its cos and sin tables
  ([T, head_dim / 2], model dtype) once for q and once for k: 2·T·head_dim·P bytes per block and
  micro-batch, whatever the batch. On CUDA torch's RMSNorm is the fused kernel (keeps its input
  and a per-row fp32 rstd: 8 bytes per block); the CPU's decomposed norm would keep two fp32
  copies more, which is not what a GPU run holds.
  Flash / memory-efficient attention keep no T x T scores, only a per-row fp32 log-sum-exp (4 bytes
  per head per token, counted). Where CUDA torch 2.11 has no fused kernel for the call (fp32 with
  grouped-query heads: see sdpa_math) SDPA runs its math path, which keeps a [B, heads, T, T]
  softmax per block instead (math_attention_elements).
- torch.compile of each block (FSDP2 compiles its units, fsdp2.py): AOTAutograd's min-cut
  partitioner saves SwiGLU's gate and up outputs and recomputes the SiLU in backward, and
  recomputes RoPE's tables: 8d + 3kv + 3f per token, no tables (CPU Inductor, saved_tensors_hooks
  on the runner's block: eager - compiled = 2f bytes + the tables; H200 #39, llama300 fsdp2 zero3
  compiled mb4: 5650 bytes/token/layer under the eager run #1, 2f + tables = 5696). FSDP1 compiles
  the wrapped model whole and DeepSpeed its engine: their runs kept what eager keeps (#40, #41).
- transformers' llama-family blocks (LlamaDecoderLayer, Qwen2DecoderLayer: `layout="transformers"`,
  models built from a Hugging Face config): their RMSNorm is Python code that keeps an fp32 copy of
  its input (4d bytes) and its normalised 16-bit tensor, q, k and v come from separate projections
  (no fused qkv storage), and the rotary cos/sin are made once per model: P·(6d + 2kv + 4f) + 8d
  bytes per token, + 4d for the final norm (CPU, saved_tensors_hooks over transformers 5.17's
  LlamaForCausalLM and Qwen2ForCausalLM at four shapes: exactly 20d + 4kv + 8f + 4·heads + 8 in bf16;
  H200 #42/#43, llama300 from a config, peaked 3784 bytes/token/layer above the runner's block, this
  says 3776). Other transformers families (gpt2's Python GELU, its attention) are not modelled:
  use the traced estimate for them.
- head: final norm input d and output d (the LM head input), then the runner's loss: logits are
  cast to fp32 and log_softmax keeps its fp32 output (4V). At the start of backward, nll_loss's
  gradient (4V, fp32) and log_softmax's input gradient (4V) exist beside it: the activation peak
  is the saved blocks plus 2d·P + 12V bytes per token (the 128k-vocabulary misses of issue 13:
  counting 6V there under-predicted llama128k fsdp2 zero3 micro-batch 2 by 27% on the H200).
- activation checkpointing: each block keeps its input (d); in backward one block is recomputed
  while the others' inputs stay: the peak is L·d·P + max(head peak, one block's full activations).
"""

from __future__ import annotations

LOSS_FP32_COPIES = 3  # log_softmax output + nll gradient + log_softmax input gradient, fp32 [tokens, V]


def _hf_llama(spec) -> bool:
    bw = getattr(spec, "block_work", None) or {}
    return getattr(spec, "layout", "shardlab") == "transformers" and spec.family == "llama" and bw.get("llama_layout", True)


def block_elements(spec, compiled: bool = False) -> int:
    """Elements one block saves for backward per token in the model dtype (see the module docstring)."""
    d, f, kv = spec.hidden, spec.ffn, spec.kv_dim
    if _hf_llama(spec):  # the two norms' 4d; q after RoPE and SDPA's output, each heads x head_dim wide (q_dim)
        # One fused q/k/v projection (Phi-3) keeps q + kv more: v, a view of the fused output, keeps that output
        # (q + 2kv) where a separate v_proj's kept kv (the traced step, CPU, fake tensors, transformers 5.17: linear in
        # the KV width; H200 #1006, fidelity_h200_new5.json: -3.7% without it).
        fused = spec.q_dim + kv if spec.fused_qkv else 0
        # A RoPE written for part of each head (StableLM, Phi-3, GLM: describe.py's rope_copy) joins the rotated and the
        # passed slices with torch.cat, which makes q contiguous head-major; attention's output takes q's layout, so the
        # out projection's input is a copy (q_dim more), as in shardlab's own llama block (CPU, saved_tensors_hooks over
        # transformers 5.17's StableLmDecoderLayer; H200 #1604 +3.5% -> -0.0% with the norms below). It is the q-wide
        # tensor more that Phi-3's trace showed before this was named.
        copy = spec.q_dim if (spec.block_work or {}).get("rope_copy") else 0
        weightless = d * (spec.block_work or {}).get("weightless_norms", 0)  # no weight's product: no normalised copy kept
        return 4 * d + 2 * spec.q_dim + 2 * kv + 4 * f + fused + copy - weightless
    if spec.family == "llama":
        return 8 * d + 3 * kv + (3 if compiled else 4) * f
    return 6 * d + 2 * kv + 2 * f


def sdpa_math(spec, P: int, compiled: bool = False) -> bool:
    """Whether the runner's attention (F.scaled_dot_product_attention(q, k, v, is_causal=True,
    enable_gqa=kv_heads != heads), shardlab/run/gpt.py) runs on SDPA's math path on a CUDA GPU (sm80+,
    torch 2.11), in the model dtype of P bytes: fp32 with grouped-query heads.

    torch's CUDA dispatcher (sdp_utils.cpp select_sdp_backend) takes the first of cuDNN, flash,
    memory-efficient, math whose checks pass. cuDNN and flash take only fp16/bf16 inputs
    (check_dtypes_low_precision / check_dtypes_flash_attention), so an fp32 call has the
    memory-efficient kernel or math. In 2.11 the memory-efficient kernel's dense checks
    (check_batch_size_and_num_heads_dense, instantiated without grouped-query support) demand equal
    head counts in q, k and v even under enable_gqa=True (its GQA support came later: pytorch PR
    #191085, 2026-07), so fp32 with kv_heads < heads -> math. (fp32 with a head_dim not divisible by
    4, check_head_dim_size_mem_efficient's alignment on sm80+, goes to math too, but there the math
    path keeps v as a copy or, at micro-batch 1, the whole qkv output: not modelled.)

    Rows: H200 #806 (llama24L, 10 heads / 5 kv, fp32, T=3072) measured 33.7% over the fused-kernel
    estimate, the [B, heads, T, T] fp32 softmax per block; #708 (llama2560, 20 / 4) and #712 (llamaMQA,
    24 / 1), fp32 GQA too, were within 3% either way (their peak lies where the blocks weigh less);
    every fp32 row without GQA (gpt, head_dim 64) stays fused. The CPU picks its own fused kernel for
    the same call (CPU flash takes fp32 and GQA): the traced estimate's stand-in (trace._cuda_kernels)
    forces the math path there (#806 traced -29.4% before, -0.8% with it; #708, #712 -0.1%). 16-bit calls
    stay fused (flash takes GQA up to head_dim 256); a 16-bit math path (head_dim > 256 with GQA,
    pre-sm80 GPUs) upcasts in ways not modelled. transformers' llama-family blocks (Llama, Mistral,
    Qwen2...) take the same path: with no attention mask (the runner's unpacked rows) transformers 5.x
    passes enable_gqa=True to SDPA instead of repeating k and v (integrations/sdpa_attention.py,
    use_gqa_in_sdpa), so their fp32 GQA attention runs math on CUDA too; until session 13 the analytical
    estimate priced it fused (an 8-layer hf:llama, 16 / 4 heads, T=8192, fp32: 10.3 GiB analytical
    against 47.4 GiB traced; now within 1% of the trace where the backward sets the peak, the trace
    holding two of MATH_BWD_SCORE_TENSORS' three). Compiled blocks and blocks counted from their own
    module by blockwork.py (a factory) are left as they are counted."""
    if compiled or getattr(spec, "is_bare", False) or _counted(spec):
        return False
    return cuda_sdpa_math(P, spec.heads, spec.n_kv_heads)


def cuda_sdpa_math(P: int, heads: int, kv_heads: int, enable_gqa: bool = True) -> bool:
    """The dispatch rule itself (sdpa_math's docstring says why): an attention call in a dtype of P bytes
    with `heads` query and `kv_heads` key/value heads runs on the math path on CUDA (torch 2.11, sm80+).
    Also what the traced estimate forces for such a call on its CPU stand-in (trace._cuda_kernels), and
    what blockwork.py's counter lets run unfused.

    A call whose key/value heads differ from the query's WITHOUT enable_gqa (they broadcast: transformers'
    Falcon passes its one KV head so) fails every fused kernel's check_batch_size_and_num_heads_dense in
    any dtype (equal head counts, or enable_gqa where the kernel supports it): math, which upcasts 16-bit
    q, k, v to fp32 (allowFP16BF16ReductionMathSDP is off by default) and keeps the [B, heads, T, T]
    scores. Found by tracing transformers' architectures on the CPU (session 17): a 4-layer Falcon at
    T=1024, FSDP2, analytical 20% under the traced step until the counter followed this rule."""
    return kv_heads != heads and (P == 4 or not enable_gqa)


def sdpa_call_runs_math(args, kwargs) -> bool:
    """cuda_sdpa_math for one F.scaled_dot_product_attention call as written (q and k positional or by name,
    enable_gqa the eighth positional or by name, the dtype and head counts read from the tensors): the one reading
    of a call's arguments for the traced estimate's stand-in (trace._cuda_kernels) and blockwork.py's counter."""
    kwargs = kwargs or {}
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    gqa = args[7] if len(args) > 7 else kwargs.get("enable_gqa", False)
    return q.dim() == 4 and k.dim() == 4 and cuda_sdpa_math(q.element_size(), q.shape[-3], k.shape[-3], bool(gqa))


def math_attention_elements(spec) -> tuple[list[int], list[int]]:
    """(kept, no longer kept): model-dtype elements per token of the tensors SDPA's math path keeps for
    backward in one block (grouped-query heads), forward order, and of those the fused kernel keeps
    that it does not.

    torch's _scaled_dot_product_attention_math scales q by sqrt(scale) (a new tensor kept by the first
    matmul's bmm, d), repeats k and v to every query head (repeat_interleave: new contiguous tensors;
    v's is kept by the second bmm, d), scales the transposed repeated k (kept by the first bmm, d),
    adds the causal mask in place and takes the softmax (its output, heads x T per token, kept by the
    softmax backward and by the second bmm). It keeps no log-sum-exp and no output: the out
    projection's input is the copy transpose-reshape makes (gpt's fused output made that a view of the
    kept output; now a copy: the same d). Nothing keeps the qkv output any more (d + 2kv: only the
    fused kernel kept it, through v; RoPE keeps its tables, not its input), nor, in the runner's llama
    block, RoPE's rotated q (d) and k (kv) or the SDPA output (d). The backward's two [B, heads, T, T]
    gradients (of the softmax output and of the scores) live only inside one block's backward and are
    not counted. Checked per tensor on the CPU with the math backend forced (tests/test_activations.py)."""
    d, kv, q = spec.hidden, spec.kv_dim, spec.q_dim
    kept = [q, q, q, spec.heads * spec.seq_len]  # q scaled, v repeated, k repeated and scaled, softmax
    if _hf_llama(spec):  # transformers' block: separate q/k/v projections; the fused kernel kept q and k after
        return kept, [q, kv, kv, q]  # RoPE, v_proj's output and its own output, which nothing else keeps
    gone = [d + 2 * kv] + ([d, kv, d] if spec.family == "llama" else [])
    return kept, gone


# [B, heads, T, T] tensors live at once in a math-path block's backward on CUDA. Two are read from the source
# (above); the third is measured, not traced: the traced step (CPU aten on fake tensors) holds two. H200 #911
# (fidelity_h200_new4b.json, llamaT8k fp32 GQA, T=8192, 16 heads: one such tensor is 4.0 GiB) measured 3.77 GiB
# over the estimate with two (-7.4%), +0.4% with three; the other fp32 GQA rows move by that tensor's share of
# their peak where the backward sets it: #806 -0.8 -> +0.5%; #708 and #712 unchanged (their peak is elsewhere).
MATH_BWD_SCORE_TENSORS = 3


def backward_transient(spec, P: int, tokens: int, compiled: bool = False) -> int:
    """Bytes one block's backward adds beside the saved tensors, where that is more than the fused
    kernels' few activation-sized gradients: under SDPA's math path (sdpa_math) the softmax backward
    holds the gradient of the softmax output and that of the scores, two [B, heads, T, T] tensors,
    beside the saved softmax (torch's matmul and _softmax_backward_data make each anew), and on CUDA
    one more of that size (MATH_BWD_SCORE_TENSORS). It happens once per block, after the loss's rows are
    freed and beside the gradient buffers backward has made."""
    bw = _counted(spec, P)
    if bw and bw.get("math_attention"):  # a counted block CUDA runs unfused (blockwork.py): its scores in fp32 (upcast)
        return MATH_BWD_SCORE_TENSORS * tokens * spec.heads * spec.seq_len * 4
    return MATH_BWD_SCORE_TENSORS * tokens * spec.heads * spec.seq_len * P if sdpa_math(spec, P, compiled) else 0


def _counted(spec, P: int = 2) -> dict | None:
    """What the model's own block saved, counted on the meta device (shardlab/blockwork.py), if it was
    and no layout above describes the block. One way per block: transformers' llama-family blocks use
    the layout (checked per tensor on the CPU; H200 #401-#404, #407: 0.0%), the count only blocks no
    layout covers. The meta-device count of a LlamaDecoderLayer is short by exactly d - kv/2 elements
    per token against that per-tensor count (896 at llama300's shape, 1280 at hf-llama's: #401 -1.8%,
    #403 -1.5%, #407 -0.6% when the count was used), a saved tensor blockwork.py does not see."""
    if _hf_llama(spec):
        return None
    bw = getattr(spec, "block_work", None)
    return _in_dtype(bw, P) if bw and "saved_elems_per_token" in bw else None


def _in_dtype(bw: dict, P: int) -> dict:
    """A count (describe.count_step) for a model dtype of P bytes: the 16-bit count, or for fp32 what the block saved
    counted in fp32 (no upcast copies; grouped-query attention unfused on CUDA), where that was counted."""
    return {**bw, **bw["fp32"]} if P == 4 and bw.get("fp32") else bw


def block_bytes(spec, P: int, compiled: bool = False) -> int:
    """Bytes per token one block keeps (P = activation dtype bytes): its tensors, the fp32 log-sum-exp
    per head and the norms' fp32 statistics (LayerNorm mean + rstd, RMSNorm rstd; two norms).
    A model counted from its own module (Hugging Face, your factory: shardlab/blockwork.py) whose block
    no layout describes keeps what its real block saved: activation-dtype elements x P, plus its fp32
    statistics and masks as counted (transformers' llama-family blocks use their layout: _counted)."""
    bw = _counted(spec, P)
    if bw:
        return int(bw["saved_elems_per_token"] * P + bw["saved_other_bytes_per_token"])
    # torch's fused LayerNorm in a Llama-laid-out block (StableLM) keeps its 16-bit input and fp32 mean and rstd, where
    # transformers' RMSNorm code keeps an fp32 copy of its input and the rstd (describe.py's layer_norm)
    layer_norm = (spec.block_work or {}).get("layer_norm", False)
    stats = 8 if spec.family == "llama" and not layer_norm else 16
    # in an fp32 model the upcast (`hidden_states.to(torch.float32)`) returns the input itself: no copy (session 24, the
    # traced step of an fp32 hf:llama)
    fp32_norm_inputs = 2 * 4 * spec.hidden if _hf_llama(spec) and not layer_norm and P < 4 else 0
    if _hf_llama(spec) and spec.qk_norm:
        # q_norm / k_norm (Qwen3), read from transformers' RMSNorm: each keeps its input's fp32 copy (pow and the
        # product save it: 4 bytes; in fp32 the input itself) and its normalised copy in the model dtype (the weight's
        # product saves it: P) for every q and k element; RoPE after them keeps only its tables. Judged by the traced
        # step (tests/test_activations.py) and H200 #1001 (fidelity_h200_new5.json): -7.1% before head_dim and this,
        # -5.4% with head_dim alone.
        fp32_norm_inputs += (4 + P) * (spec.q_dim + spec.kv_dim)
    if sdpa_math(spec, P, compiled):  # no log-sum-exp; the math path's tensors for the fused kernel's
        kept, gone = math_attention_elements(spec)
        return (block_elements(spec, compiled) + sum(kept) - sum(gone)) * P + stats + fp32_norm_inputs
    return block_elements(spec, compiled) * P + 4 * spec.heads + stats + fp32_norm_inputs


def rope_tables(spec, P: int, compiled: bool = False) -> int:
    """Bytes of RoPE's cos/sin tables one block keeps per micro-batch (llama: q's and k's pair; in a
    counted block they are among its saved tensors already)."""
    own = spec.family == "llama" and not compiled and not _hf_llama(spec) and not _counted(spec)
    return 2 * spec.seq_len * spec.head_dim * P if own else 0


def head_peak_bytes(spec, P: int) -> int:
    """Bytes per token at the loss's backward: final norm in/out (P; transformers' keeps an fp32 copy
    of its input too) + three fp32 [V] rows. A counted model (blockwork.py) says what its top saves
    itself: the same figures for transformers' Llama (2d·P + 4d, 4 bytes of norm statistics more) and
    GPT-2 (2d·P), and a [V] row more for Gemma-2's soft-capped logits (blockwork.hooked_head)."""
    bw = spec.block_work or {}
    top = _in_dtype(bw, P).get("head_saved_bytes_per_token")
    if top is not None and (P == 2 or (P == 4 and bw.get("fp32"))):  # counted in bf16, and in fp32 (describe.count_step)
        return int(top) + LOSS_FP32_COPIES * 4 * spec.vocab
    return 2 * spec.hidden * P + (4 * spec.hidden if _hf_llama(spec) else 0) + LOSS_FP32_COPIES * 4 * spec.vocab


def _loss_and_block(spec, P: int, tokens: int, checkpointing: bool, compiled: bool) -> tuple[int, int]:
    """The two candidates for the peak above what the blocks hold: the loss's rows at its backward, and one
    block's backward (its transient gradients, the head's rows freed; under checkpointing with the block's
    recomputed tensors)."""
    head = tokens * head_peak_bytes(spec, P)
    block = backward_transient(spec, P, tokens, compiled)
    if checkpointing:
        block += tokens * block_bytes(spec, P, compiled) + rope_tables(spec, P, compiled)
    return head, block


def activation_peak(spec, P: int, tokens: int, checkpointing: bool, compiled: bool = False) -> int:
    """Peak bytes of activations and loss temporaries for one micro-batch of `tokens` tokens
    (`compiled`: each block under torch.compile, see the module docstring)."""
    if spec.is_bare:
        return 0
    held = tokens * spec.layers * spec.hidden * P if checkpointing else saved_blocks(spec, P, tokens, False, compiled)
    return held + max(_loss_and_block(spec, P, tokens, checkpointing, compiled))


def peak_in_a_block(spec, P: int, tokens: int, checkpointing: bool, compiled: bool = False) -> bool:
    """Whether activation_peak's maximum falls in a block's backward rather than at the loss's."""
    head, block = _loss_and_block(spec, P, tokens, checkpointing, compiled)
    return block > head


def saved_blocks(spec, P: int, tokens: int, checkpointing: bool, compiled: bool = False) -> int:
    """Bytes the blocks still hold when backward leaves the loss and the LM head (the head's loss
    rows freed, no block's backward run yet): where DeepSpeed ZeRO-1/2 first allocate their buckets."""
    if spec.is_bare:
        return 0
    if checkpointing:
        return tokens * spec.layers * spec.hidden * P
    return spec.layers * (tokens * block_bytes(spec, P, compiled) + rope_tables(spec, P, compiled))
