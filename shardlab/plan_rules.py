"""The plan's cross-field rules: what makes a setup impossible (error) or unwise (warning).

Each rule is a function of the Plan registered with `@rule` in RULES; it returns a Finding, a list of
them, or None. Every message names the field, the value, why, and the fix (DESIGN.md's convention).
`Plan.findings()` runs them all; `shardlab.plan.validate` raises PlanError on any error. Types and
unknown keys are pydantic's job (shardlab/plan.py); `pydantic_findings` at the end of this file turns
its errors into the same kind of message. What a framework cannot run on this machine is the
adapters' (shardlab/frameworks/).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from shardlab import safe_input
from shardlab.plan import Finding, Plan, _err, _warn

Rule = Callable[[Plan], list[Finding]]
RULES: list[Rule] = []


def rule(fn: Callable[[Plan], Finding | list[Finding] | None]) -> Rule:
    """Register a rule; it returns a Finding, a list of them, or None."""

    def wrapped(plan: Plan) -> list[Finding]:
        out = fn(plan)
        if out is None:
            return []
        return out if isinstance(out, list) else [out]

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    RULES.append(wrapped)
    return wrapped


_POSITIVE = (
    ("micro_batch_size", lambda p: p.micro_batch_size),
    ("grad_accum_steps", lambda p: p.grad_accum_steps),
    ("topology.nodes", lambda p: p.topology.nodes),
    ("topology.gpus_per_node", lambda p: p.topology.gpus_per_node),
    ("zeropp.hpz_partition_size", lambda p: p.zeropp.hpz_partition_size),
    ("wrap.min_num_params", lambda p: p.wrap.min_num_params),
    ("global_batch_size", lambda p: p.global_batch_size),
    ("buckets.reduce_bucket_size", lambda p: p.buckets.reduce_bucket_size),
    ("buckets.allgather_bucket_size", lambda p: p.buckets.allgather_bucket_size),
)


@rule
def positive_sizes(p: Plan):
    """Counts and sizes must be at least 1."""
    out = []
    for name, get in _POSITIVE:
        v = get(p)
        if isinstance(v, int) and v < 1:
            out.append(_err("positive_sizes", name, f"{name}={v} must be a positive whole number (it counts sequences, processes or elements). Use 1 or more."))
    return out


@rule
def persistence_threshold_non_negative(p: Plan):
    out = []
    v = p.buckets.param_persistence_threshold
    if isinstance(v, int) and v < 0:
        out.append(_err("persistence_threshold_non_negative", "buckets.param_persistence_threshold", f"buckets.param_persistence_threshold={v} is negative; it is a parameter size in elements. Use 0 (shard everything), a positive size, or 'auto'."))
    v = p.buckets.prefetch_bucket_size  # 0 is DeepSpeed's "no prefetch" (ms-swift's ZeRO-3 offload configs use it)
    if isinstance(v, int) and v < 0:
        out.append(_err("persistence_threshold_non_negative", "buckets.prefetch_bucket_size", f"buckets.prefetch_bucket_size={v} is negative; it is a size in elements. Use 0 (no prefetch), a positive size, or 'auto'."))
    return out


@rule
def learning_rate_positive(p: Plan):
    if not p.optimizer.lr > 0:
        return _err("learning_rate_positive", "optimizer.lr", f"optimizer.lr={p.optimizer.lr} must be greater than 0, or the weights never change. Use e.g. 1e-4.")


@rule
def non_negative_regularisers(p: Plan):
    out = []
    if p.optimizer.weight_decay < 0:
        out.append(_err("non_negative_regularisers", "optimizer.weight_decay", f"optimizer.weight_decay={p.optimizer.weight_decay} is negative, which would grow the weights. Use 0 or a positive value."))
    if p.gradient_clipping is not None and p.gradient_clipping <= 0:
        out.append(_err("non_negative_regularisers", "gradient_clipping", f"gradient_clipping={p.gradient_clipping} must be a positive norm. Use e.g. 1.0, or leave it empty for no clipping."))
    return out


@rule
def params_offload_needs_zero3(p: Plan):
    """Parameters are only partitioned in ZeRO-3 / FULL_SHARD, so only then can they be offloaded."""
    if p.offload.params != "none" and p.sharding not in ("zero3", "hybrid"):
        return _err("params_offload_needs_zero3", "offload.params", f"offload.params={p.offload.params} needs sharding=zero3 (parameters are only partitioned in ZeRO-3); sharding is {p.sharding}. Use sharding: zero3, or set offload.params: none.")


@rule
def nvme_needs_path(p: Plan):
    if "nvme" in (p.offload.optimizer, p.offload.params) and not p.offload.nvme_path:
        return _err("nvme_needs_path", "offload.nvme_path", "offload to nvme needs offload.nvme_path (the directory DeepSpeed swaps tensors to); it is empty. Set offload.nvme_path: /local_nvme, or offload to cpu.")


@rule
def nvme_needs_deepspeed(p: Plan):
    if "nvme" in (p.offload.optimizer, p.offload.params) and p.framework != "deepspeed":
        return _err("nvme_needs_deepspeed", "offload", f"NVMe offload is DeepSpeed's ZeRO-Infinity; framework={p.framework} can offload only to CPU. Use framework: deepspeed, or offload to cpu.")


@rule
def nvme_path_unused(p: Plan):
    if p.offload.nvme_path and "nvme" not in (p.offload.optimizer, p.offload.params):
        return _warn("nvme_path_unused", "offload.nvme_path", f"offload.nvme_path={p.offload.nvme_path} is set but nothing is offloaded to nvme, so it is unused. Set offload.optimizer or offload.params to nvme, or clear the path.")


@rule
def fsdp_offload_all_or_nothing(p: Plan):
    """FSDP's CPUOffload moves parameters, gradients and optimizer step together."""
    if p.framework != "deepspeed" and p.offload.optimizer != p.offload.params:
        return _err("fsdp_offload_all_or_nothing", "offload.optimizer", f"framework={p.framework} offloads all or nothing (CPUOffload moves parameters, gradients and the optimizer step together), but offload.optimizer={p.offload.optimizer} and offload.params={p.offload.params}. Set both to cpu (with sharding zero3), both to none, or use framework: deepspeed for optimizer-only offload.")


@rule
def optimizer_offload_needs_zero(p: Plan):
    if p.offload.optimizer != "none" and p.sharding == "ddp":
        return _err("optimizer_offload_needs_zero", "offload.optimizer", f"offload.optimizer={p.offload.optimizer} needs a ZeRO stage (optimizer states are only offloaded once partitioned); sharding is ddp. Use sharding: zero2 (ZeRO-Offload) or zero3, or set offload.optimizer: none.")


@rule
def zero1_is_deepspeed_only(p: Plan):
    if p.sharding == "zero1" and p.framework != "deepspeed":
        return _err("zero1_is_deepspeed_only", "sharding", f"sharding=zero1 (optimizer states only) has no equivalent in {p.framework}; FSDP shards gradients too. Use sharding: zero2 (SHARD_GRAD_OP), or framework: deepspeed.")


@rule
def hybrid_needs_nodes(p: Plan):
    if p.sharding == "hybrid" and p.topology.nodes < 2:
        return _warn("hybrid_needs_nodes", "topology.nodes", "sharding=hybrid with topology.nodes=1 has no replicas across nodes, so it behaves as zero3. Use more than one node, or sharding: zero3.")


@rule
def hpz_divides_node(p: Plan):
    h, g = p.zeropp.hpz_partition_size, p.topology.gpus_per_node
    if h > 1 and g % h:
        return _err("hpz_divides_node", "zeropp.hpz_partition_size", f"zeropp.hpz_partition_size={h} must divide topology.gpus_per_node={g} (each secondary shard group lives inside one node). Use a divisor of {g}, e.g. {g}.")


@rule
def hpz_needs_deepspeed_zero3(p: Plan):
    if p.zeropp.hpz_partition_size > 1 and (p.framework != "deepspeed" or p.sharding not in ("zero3", "hybrid")):
        return _err("hpz_needs_deepspeed_zero3", "zeropp.hpz_partition_size", f"zeropp.hpz_partition_size={p.zeropp.hpz_partition_size} is DeepSpeed ZeRO-3's hierarchical partitioning; here framework={p.framework}, sharding={p.sharding}. Use framework: deepspeed with sharding: zero3 (FSDP's equivalent is sharding: hybrid), or set it to 1.")


@rule
def hpz_single_node(p: Plan):
    if p.zeropp.hpz_partition_size > 1 and p.topology.nodes < 2:
        return _warn("hpz_single_node", "zeropp.hpz_partition_size", f"zeropp.hpz_partition_size={p.zeropp.hpz_partition_size} on one node saves no inter-node traffic (there is none); it only adds a secondary copy of the weights. Use it with more than one node, or set it to 1.")


@rule
def quantized_needs_deepspeed_zero3(p: Plan):
    q = [n for n in ("quantized_weights", "quantized_gradients") if getattr(p.zeropp, n)]
    if q and (p.framework != "deepspeed" or p.sharding not in ("zero3", "hybrid")):
        return _err("quantized_needs_deepspeed_zero3", f"zeropp.{q[0]}", f"zeropp.{q[0]}=true is ZeRO++ (qwZ/qgZ), which exists only in DeepSpeed ZeRO-3; here framework={p.framework}, sharding={p.sharding}. Use framework: deepspeed with sharding: zero3, or set it to false.")


@rule
def quantized_needs_gpu(p: Plan):
    q = [n for n in ("quantized_weights", "quantized_gradients") if getattr(p.zeropp, n)]
    if q:
        return _warn("quantized_needs_gpu", f"zeropp.{q[0]}", f"zeropp.{q[0]}=true runs only on CUDA GPUs (DeepSpeed's quantizer kernels have no CPU implementation); a CPU run will refuse it. Run on GPUs, or set it to false for CPU runs.")


@rule
def fp16_fsdp2_needs_scaler(p: Plan):
    if p.precision == "fp16" and p.framework == "fsdp2" and p.loss_scaling == "none":
        return _err("fp16_fsdp2_needs_scaler", "loss_scaling", "precision=fp16 with framework=fsdp2 needs a gradient scaler (FSDP2 has none built in and small fp16 gradients underflow to zero); loss_scaling is none. Set loss_scaling: dynamic (torch.amp.GradScaler), or use precision: bf16.")


@rule
def fp16_without_scaling(p: Plan):
    if p.precision == "fp16" and p.framework != "fsdp2" and p.loss_scaling == "none":
        return _warn("fp16_without_scaling", "loss_scaling", f"precision=fp16 with loss_scaling=none lets small gradients underflow to zero in {p.framework}. Set loss_scaling: dynamic, or use precision: bf16.")


@rule
def global_batch_consistent(p: Plan):
    g = p.global_batch_size
    if g is not None and g >= 1 and not {"micro_batch_size", "grad_accum_steps"} & set(p.auto):  # the Trainer fills those
        want = p.micro_batch_size * p.grad_accum_steps * p.world_size
        if g != want:
            return _err("global_batch_consistent", "global_batch_size", f"global_batch_size={g} differs from micro_batch_size x grad_accum_steps x world size = {p.micro_batch_size} x {p.grad_accum_steps} x {p.world_size} = {want}. Set global_batch_size: {want}, or change grad_accum_steps so the product is {g}.")


@rule
def low_memory_init_needs_sync(p: Plan):
    if p.framework != "deepspeed" and p.low_memory_init and not p.sync_module_states:
        return _err("low_memory_init_needs_sync", "sync_module_states", f"low_memory_init=true with framework={p.framework} loads weights on rank 0 only, so they must be broadcast: sync_module_states is false. Set sync_module_states: true, or low_memory_init: false.")


@rule
def full_16bit_is_deepspeed_zero3(p: Plan):
    if p.checkpoint == "full_16bit" and (p.framework != "deepspeed" or p.sharding not in ("zero3", "hybrid")):
        return _err("full_16bit_is_deepspeed_zero3", "checkpoint", f"checkpoint=full_16bit is DeepSpeed ZeRO-3's gathered 16-bit save (stage3_gather_16bit_weights_on_model_save); here framework={p.framework}, sharding={p.sharding}. Use checkpoint: full, or framework: deepspeed with sharding: zero3.")


@rule
def dtype_mismatch(p: Plan):
    if p.precision == "bf16" and p.reduce_dtype == "fp16" or p.precision == "fp16" and p.reduce_dtype == "bf16":
        return _warn("dtype_mismatch", "reduce_dtype", f"reduce_dtype={p.reduce_dtype} with precision={p.precision} converts gradients between two 16-bit formats on every step and loses range or precision. Use reduce_dtype: auto or fp32.")


@rule
def nothing_to_shard(p: Plan):
    if p.world_size == 1 and p.sharding in ("zero1", "zero2", "zero3", "hybrid") and p.offload.optimizer == "none" and p.offload.params == "none":
        return _warn("nothing_to_shard", "sharding", f"sharding={p.sharding} on a world size of 1 has nobody to share the states with, so it only adds overhead. Use more GPUs (topology), or add offload to save memory.")


@rule
def auto_assumed(p: Plan):
    """Settings left to the training script: say which value estimates and runs assume."""
    if p.auto:
        said = ", ".join(f"{k}={v}" for k, v in p.assumed().items())
        return _warn("auto_assumed", p.auto[0], f"{', '.join(p.auto)}: left to the training script ('auto'); exports write 'auto', and estimates and runs assume {said}. Set the values in the plan to change what is assumed.")


@rule
def ignored_knobs(p: Plan):
    """Knobs set away from their default that the chosen framework ignores."""
    out = []
    if p.framework == "deepspeed":
        if p.forward_prefetch:
            out.append(_warn("ignored_knobs", "forward_prefetch", "forward_prefetch=true is an FSDP knob; DeepSpeed ignores it (ZeRO-3 prefetches by buckets.prefetch_bucket_size). Set forward_prefetch: false, or use an fsdp framework."))
        if p.wrap.policy != "transformer":
            out.append(_warn("ignored_knobs", "wrap.policy", f"wrap.policy={p.wrap.policy} is an FSDP knob; DeepSpeed partitions parameters individually and ignores it. Leave wrap.policy: transformer, or use an fsdp framework."))
    else:
        for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size", "param_persistence_threshold"):
            if getattr(p.buckets, name) != "auto":
                out.append(_warn("ignored_knobs", f"buckets.{name}", f"buckets.{name}={getattr(p.buckets, name)} is a DeepSpeed knob; {p.framework} ignores it (FSDP communicates one wrap unit at a time). Set it to auto, or use framework: deepspeed."))
    if p.framework == "fsdp2" and p.backward_prefetch != "backward_pre":
        out.append(_warn("ignored_knobs", "backward_prefetch", f"backward_prefetch={p.backward_prefetch} is an FSDP1 knob; FSDP2 always prefetches one unit ahead in backward. Leave it at backward_pre, or use framework: fsdp1."))
    return out


# --------------------------------------------------------------------------------------------
# pydantic's errors (types, unknown keys, allowed values) as findings fit to show a person


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at the place `loc` points to, for 'did you mean' suggestions."""
    for part in loc[:-1]:
        ann = model.model_fields.get(str(part))
        sub = getattr(ann, "annotation", None) if ann else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            model = sub
        else:
            break
    return list(model.model_fields)


_UNION_TAGS = ("int", "float", "str", "bool", "none")


def _is_tag(x: Any) -> bool:
    """A union-branch tag pydantic adds to an error's location (e.g. 'int', "literal['auto']")."""
    return isinstance(x, str) and ("[" in x or x in _UNION_TAGS)


def pydantic_findings(err: ValidationError, model: type[BaseModel] = Plan) -> list[Finding]:
    """pydantic errors -> findings naming field, value, why, fix."""
    out = []
    for e in err.errors(include_url=False):
        raw = tuple(e["loc"])
        # Drop union tags, but never an unknown key's own name (a key may be called 'int' or 'a[0]').
        if e["type"] == "extra_forbidden" and raw:
            loc = tuple(x for x in raw[:-1] if not _is_tag(x)) + raw[-1:]
        else:
            loc = tuple(x for x in raw if not _is_tag(x))
        field = ".".join(str(x) for x in loc)[:200] or "(plan)"
        value = safe_input.short(e.get("input"))
        if e["type"] == "extra_forbidden":
            valid = _field_names(model, loc)
            near = difflib.get_close_matches(str(loc[-1])[:100], valid, n=1, cutoff=0.5) if loc else []
            hint = f"Did you mean '{near[0]}'?" if near else f"Valid keys here: {', '.join(valid)}."
            out.append(_err("unknown_key", field, f"{field}: unknown key. {hint}"))
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            if allowed == "'auto'":  # the Auto union: 'auto' or a whole number
                allowed = "'auto' or a whole number of elements"
            out.append(_err("bad_value", field, f"{field}={value} is not one of the allowed values. Use one of {allowed}."))
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            out.append(_err("bad_type", field, f"{field}={value} must be a mapping of keys (e.g. {field}: {{...}}). Write it as a nested block."))
        else:
            why = safe_input.short(str(e.get("msg", "")), 200).strip("'\"")
            out.append(_err("bad_type", field, f"{field}={value}: {why}. Fix the value's type in the plan file."))
    # Union types report one error per branch; keep one per field.
    seen, uniq = set(), []
    for f in out:
        if f.field not in seen:
            seen.add(f.field)
            uniq.append(f)
    return uniq
