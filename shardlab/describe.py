"""A real nn.Module (usually on the meta device) -> the ModelSpec the estimators work from.

What is read from the module rather than assumed:
- parameters, each shared (tied) tensor once;
- the wrap unit (`find_block_class`): the Hugging Face model's own `_no_split_modules` (the classes
  it says must not be split across devices: its decoder layer; among several, the one repeated most),
  else the outermost module class that repeats (a transformer's block beats the Linears inside it);
- the parameter tensors grouped as FSDP's transformer policy groups them (before the blocks, one
  block, after the blocks), so shard padding and ZeRO-3 persistence are computed on the real tensors;
- FLOPs per token: one forward and backward of a one-sample batch under torch's FlopCounterMode on
  the meta device (matmuls, convolutions and attention as PyTorch counts them; embedding lookups and
  elementwise ops count nothing, as in the 6N + 12·L·d·T convention);
- in the same pass, what one block's forward launches and moves (blockwork.py), which the step-time
  model uses instead of shardlab's own block's counts;
- MoE blocks DeepSpeed ZeRO-3 must treat as leaves (`ds_leaf_classes`).
A Hugging Face config adds the transformer shape (layers, hidden, heads, ...) so activations are
estimated too; a plain module stays a bare count with wrap units.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from shardlab.models import ModelSpec, ParamShapes

_CONTAINERS = ("ModuleList", "Sequential", "ModuleDict")


def _unique_params(module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once


def find_block_class(model) -> type | None:
    """The transformer block class of `model` (see the module docstring), None if there is none."""
    named = getattr(model, "_no_split_modules", None) or ()
    counts = Counter(type(m) for m in model.modules())
    listed = [c for c in counts if c.__name__ in set(named)]
    if listed:
        return max(listed, key=lambda c: (counts[c], _unique_params(next(m for m in model.modules() if type(m) is c))))
    repeated = {c for c, n in counts.items() if n > 1 and c.__name__ not in _CONTAINERS}
    outer: Counter = Counter()
    size: dict[type, int] = {}

    def walk(m, inside: bool) -> None:
        for child in m.children():
            c = type(child)
            counted = c in repeated and _unique_params(child) > 0
            if counted and not inside:
                outer[c] += 1
                size[c] = size.get(c, 0) + _unique_params(child)
            walk(child, inside or counted)

    walk(model, False)
    cands = [c for c, n in outer.items() if n > 1]
    return max(cands, key=lambda c: size[c]) if cands else None


def _shape(p) -> tuple[int, int]:
    return (p.shape[0], p.numel() // p.shape[0]) if p.dim() and p.shape[0] else (1, p.numel())


def group_shapes(model, blocks: list) -> ParamShapes | None:
    """Parameter tensors before the first block, of one block (x count) and after: None when the
    blocks differ in their tensors (then only the unit size is known)."""
    if not blocks:
        return ParamShapes((), (), 0, tuple(_shape(p) for p in model.parameters()))
    per_block = [tuple(_shape(p) for p in b.parameters()) for b in blocks]
    if any(s != per_block[0] for s in per_block):
        return None
    inside = {id(p) for b in blocks for p in b.parameters()}
    embed, head, after = [], [], False
    for p in model.parameters():
        if id(p) in inside:
            after = True
        else:
            (head if after else embed).append(_shape(p))
    return ParamShapes(tuple(embed), per_block[0], len(blocks), tuple(head))


def logits_of(out):
    """A model's output -> its logits tensor (Hugging Face ModelOutput, tuple or tensor)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _counted_step(model, x, counter, hooks: list, *modes) -> None:
    """One training step of `model` on `x` (the sum of its logits, backward) with `modes` and the block counter entered;
    then `hooks` (the counter's) are removed and the gradients dropped. How count_step and _mixed_blocks count a block."""
    try:
        with contextlib.ExitStack() as stack:
            for mode in (*modes, counter):
                stack.enter_context(mode)
            logits_of(model(x)).float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)


_PER_BLOCK = ("kernels", "bwd_kernels", "elems_per_token", "saved_elems_per_token", "saved_other_bytes_per_token", "modules", "params")


def _mixed_blocks(work: dict, model, x, blocks: list, seq: int, dtype) -> dict | None:
    """`work` (the first block's count) as the mean over the model's blocks where they are not all alike: hybrids such as
    Qwen3.5 (linear-attention blocks with a full-attention one every fourth) or DeepSeek-style models (dense blocks, then
    MoE ones). One block of each kind (the same module classes in the same order) is counted in a step of its own and
    weighted by how many there are. Counting the first block for all of them put Qwen3.5 at 8 x 1024 14% over the traced
    step's peak (session 23's sweep). None where another kind cannot be counted (the formula then applies)."""
    from shardlab.blockwork import BlockCounter, block_work, hooked

    kinds: dict[tuple, list[int]] = {}
    for i, b in enumerate(blocks):
        kinds.setdefault(tuple(type(m).__name__ for m in b.modules()), []).append(i)
    groups = list(kinds.values())
    if len(groups) == 1:
        return work
    counted = [(len(groups[0]), work)]
    for where in groups[1:]:
        counter = BlockCounter(dtype)
        counter.ignore(model.parameters())
        _counted_step(model, x, counter, hooked(counter, blocks[where[0]]))
        w = block_work(counter, blocks[where[0]], model, len(blocks), seq)
        if w is None:
            return None
        counted.append((len(where), w))
    n = len(blocks)
    mean = {k: sum(c * w[k] for c, w in counted) / n for k in _PER_BLOCK}
    mean.update({k: round(mean[k]) for k in ("kernels", "bwd_kernels", "modules", "params")})
    mean["math_attention"] = any(w["math_attention"] for _, w in counted)
    mean["top_modules"] = max(0, sum(1 for _ in model.modules()) - sum(c * w["modules"] for c, w in counted))
    mean["top_params"] = max(0, sum(1 for _ in model.parameters()) - sum(c * w["params"] for c, w in counted))
    return {**work, **mean, "block_kinds": len(counted)}


# what an fp32 plan takes from the fp32 count (count_step) in place of the 16-bit count's figures
FP32_COUNTED = ("saved_elems_per_token", "saved_other_bytes_per_token", "head_saved_bytes_per_token", "math_attention")


def count_step(model, inputs: dict, blocks: list) -> tuple[int | None, dict | None]:
    """(training FLOPs per token of `model`, forward + backward of one sample; the first block's work
    as blockwork.py counts it), (None, None) if the model cannot run on meta."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from shardlab.blockwork import BlockCounter, block_work, hooked, hooked_head
    from shardlab.usermodel import tokens_in

    if inputs.get("kind") not in ("tokens", "floats"):
        return None, None
    dtype, fp32 = torch.float32, None
    if blocks and all(p.is_meta for p in model.parameters()):
        fp32 = (model, blocks)  # the model as built (fp32), counted again for fp32 plans below
        # count as a mixed-precision run computes: in bf16, on a copy (meta: it costs nothing)
        import copy

        index = {id(m): i for i, m in enumerate(model.modules())}  # one pass, not one per block
        where = [index[id(b)] for b in blocks]
        dtype, model = torch.bfloat16, copy.deepcopy(model).to(torch.bfloat16)
        mods = list(model.modules())
        blocks = [mods[i] for i in where]  # the copy's blocks (the first is counted, the last ends at the model's top)
    if inputs["kind"] == "tokens":
        x = torch.zeros((1, inputs["seq_len"]), dtype=torch.long, device="meta")
    else:
        x = torch.zeros((1, *inputs["shape"]), dtype=dtype, device="meta")

    def counted(model, blocks, dtype, *modes) -> dict | None:
        cfg = getattr(model, "config", None)
        cache, pad, was_training = getattr(cfg, "use_cache", None), getattr(cfg, "pad_token_id", None), model.training
        try:
            if cache is not None:
                # transformers (5.17) looks for packed sequences in the positions when there is neither a
                # mask nor a cache, a data-dependent check meta tensors cannot answer; a cache skips it
                cfg.use_cache = True
            if pad is not None:
                # with a pad_token_id, transformers' warn_if_padding_and_no_attention_mask (GPT-2 and others) asks whether
                # the batch's first or last token is padding, a value meta tensors do not have: the count failed and such a
                # model fell back to shardlab's own block's formula (a GPT-2 at pad_token_id=0: -8.2% against the traced
                # step, found by the session-17 sweep). The runner's batches carry no padding, so the check is moot here
                cfg.pad_token_id = None
            counter = BlockCounter(dtype)
            counter.ignore(model.parameters())
            model.train()  # dropout and the like run as in training
            hooks = hooked(counter, blocks[0]) + hooked_head(counter, blocks[-1], model) if blocks else []
            xin = x if x.dtype == torch.long else x.to(dtype)  # float inputs in the dtype counted, for every block kind
            _counted_step(model, xin, counter, hooks, *modes)
            seq = x.shape[1] if inputs.get("kind") == "tokens" else 0
            work = block_work(counter, blocks[0], model, len(blocks), seq) if blocks else None
            return _mixed_blocks(work, model, xin, blocks, seq, dtype) if work is not None else None
        finally:
            model.train(was_training)
            if cache is not None:
                cfg.use_cache = cache
            if pad is not None:
                cfg.pad_token_id = pad

    try:
        fc = FlopCounterMode(display=False)
        work = counted(model, blocks, dtype, fc)
    except Exception:  # noqa: BLE001 - a module that cannot run on meta gets the formula instead
        return None, None
    if work is not None and fp32 is not None:
        # what an fp32 run saves is not the 16-bit count's elements at 4 bytes: an upcast to fp32 (RMSNorm's input)
        # is the tensor itself, not a copy, and attention with grouped-query heads runs unfused on CUDA
        # (activations.cuda_sdpa_math): counted again in fp32 on the original (meta) model, for fp32 plans
        # (activations._counted). Found by the traced step (session 24): an fp32 hf:olmo2 / starcoder2 / gemma2
        # with 16 / 4 heads at T=2048 was 34-42% under it on the 16-bit count
        try:
            w32 = counted(*fp32, torch.float32)
        except Exception:  # noqa: BLE001 - the 16-bit count stands for fp32 plans as before
            w32 = None
        if w32 is not None:
            work["fp32"] = {k: w32[k] for k in FP32_COUNTED if k in w32}
    return int(fc.get_total_flops() // tokens_in(x)), work


def ds_leaf_classes(model) -> list[type]:
    """Mixture-of-experts blocks (a module holding an `experts` list): ZeRO-3 must gather them whole,
    since a step runs only some experts and its prefetch trace would differ between steps."""
    import torch

    return sorted({type(m) for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.ModuleList)},
                  key=lambda c: c.__name__)


def _wrap_blocks(model, wrap_cls: str | None):
    from shardlab.plan import bad_input

    if wrap_cls is None:
        cls = find_block_class(model)
        found = [m for m in model.modules() if cls is not None and type(m) is cls]
        return cls, [m for m in found if not any(o is not m and any(x is m for x in o.modules()) for o in found)]
    classes = {type(m).__name__ for m in model.modules()}
    if wrap_cls not in classes:
        import difflib

        near = difflib.get_close_matches(wrap_cls, sorted(classes), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise bad_input("wrap.transformer_layer_cls", f"wrap.transformer_layer_cls={wrap_cls!r} is not a class inside {type(model).__name__}.{hint}")
    blocks = [m for m in model.modules() if type(m).__name__ == wrap_cls]
    return type(blocks[0]), blocks


def describe(model, inputs: dict, config=None, *, name: str, source: str | None = None, wrap_cls: str | None = None) -> ModelSpec:
    """The ModelSpec of a built module (see the module docstring). PlanError if it has no parameters."""
    from shardlab.plan import bad_input

    total = _unique_params(model)
    if total == 0:
        raise bad_input("model", f"the module {type(model).__name__} has no parameters, so there is nothing to shard. Pass a module with parameters.")
    cls, blocks = _wrap_blocks(model, wrap_cls)
    unit = max((_unique_params(b) for b in blocks), default=None)
    shapes = group_shapes(model, blocks) if wrap_cls is None else None
    shape = None
    if config is not None and inputs.get("kind") == "tokens":
        from shardlab.hfmodels import shape_of

        shape = shape_of(config, inputs["seq_len"], inputs["vocab"])
    fields = shape or {"layers": 0, "hidden": 0, "heads": 1, "vocab": 0, "seq_len": 0}
    if shape and shapes is not None and shapes.layers != shape["layers"]:
        fields = {**shape, "layers": shapes.layers}  # the blocks found rule (e.g. a config with extra layers)
    names = {n.rsplit(".", 1)[-1] for n, _ in blocks[0].named_modules()} if shape and blocks else set()
    if names & {"q_norm", "k_norm"}:  # per-head norms of q and k (Qwen3)
        fields = {**fields, "qk_norm": True}
    if names & {"qkv_proj", "query_key_value", "Wqkv", "W_pack"}:  # one projection for q, k and v (Phi-3, NeoX, MPT)
        fields = {**fields, "fused_qkv": True}
    from shardlab.frameworks.units import module_tree

    # the block is counted only where a shape lets the estimators use it (no bf16 copy, no hooks otherwise)
    flops, work = count_step(model, inputs, blocks if shape else [])
    if work is not None:
        # activations.py prices transformers' llama-family blocks by Llama's layout: two norms, before attention and
        # before the MLP (q/k norms and fused projections have flags above). A block with other norms (OLMo-2 and
        # EXAONE-4 normalise after attention and after the MLP) keeps what was counted from it instead (_hf_llama);
        # found on the CPU (OLMo-2: layout -5.3%, count -0.8% against the traced step) before H200 #1109 / #1110
        work["llama_layout"] = not {n for n in names if "norm" in n.lower()} - {"input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"}
        # Two ways a block laid out as Llama's keeps other tensors (activations.py reads both), found on H200 #1604
        # (StableLM, fidelity_h200_new10.json: the layout +3.5%, the traced step -0.0%): norms that are torch's fused
        # LayerNorm (no fp32 copy of their input), and a RoPE written for part of each head: it rotates a slice and
        # joins it to the rest with torch.cat (at any partial_rotary_factor, 1.0 too), which makes q contiguous
        # head-major, so attention's output must be copied back for the out projection. The models whose config
        # carries the factor (StableLM, Phi-3, GLM, Persimmon in transformers 5.17) are the ones whose code does this
        import torch

        norms = [m for n, m in blocks[0].named_modules() if "norm" in n.rsplit(".", 1)[-1].lower()]
        work["layer_norm"] = any(isinstance(m, torch.nn.LayerNorm) for m in norms)
        # a norm with no weight (OLMo's non-parametric LayerNorm, in fp32 like transformers' RMSNorm code) keeps no
        # normalised copy for a weight's product: one d-wide tensor less per norm (OLMo: the layout +1.7% of the traced
        # step's peak without checkpointing at 8 x 1024, 0.0% with this)
        work["weightless_norms"] = sum(1 for m in norms if not any(True for _ in m.parameters()))
        work["rope_copy"] = hasattr(config, "partial_rotary_factor") or "partial_rotary_factor" in (getattr(config, "rope_parameters", None) or {})
    return ModelSpec(name, **fields, params_override=total, wrap_unit_params=unit, wrap_unit_count=len(blocks),
                     source=source, wrap_cls=cls.__name__ if cls is not None else None, shapes=shapes,
                     layout="transformers" if shape is not None else "shardlab",
                     counted_flops_per_token=flops, block_work=work, tree=module_tree(model))
