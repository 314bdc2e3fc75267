"""The Plan: one framework-neutral description of a sharded training setup.

Every field carries a one-line `description`; the widgets use it as label tooltip, so the UI and the
model cannot drift apart. Parsing (types, unknown keys) is pydantic's; the cross-field rules that make
a setup impossible or unwise live in RULES below, each with its own message naming the field, the
value, why, and the fix. `load_plan` turns any file or text into a Plan or a PlanError whose message
is fit to show a person (the CLI prints it and exits 2).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shardlab import safe_input

Framework = Literal["fsdp1", "fsdp2", "deepspeed"]
Sharding = Literal["ddp", "zero1", "zero2", "zero3", "hybrid"]
Precision = Literal["fp32", "bf16", "fp16"]
DType = Literal["auto", "fp32", "bf16", "fp16"]
OffloadTarget = Literal["none", "cpu", "nvme"]
Auto = Union[Literal["auto"], int]

FRAMEWORKS: tuple[str, ...] = ("fsdp1", "fsdp2", "deepspeed")
SHARDINGS: tuple[str, ...] = ("ddp", "zero1", "zero2", "zero3", "hybrid")


class _Model(BaseModel):
    # Unknown keys are errors (with a suggestion), not silently dropped.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Offload(_Model):
    optimizer: OffloadTarget = Field("none", description="Where optimizer states (and fp32 master weights) live: GPU (none), CPU RAM or NVMe.")
    params: OffloadTarget = Field("none", description="Where sharded parameters live between uses: GPU (none), CPU RAM or NVMe (ZeRO-3 only).")
    nvme_path: str | None = Field(None, description="Directory on a fast local NVMe drive for DeepSpeed's NVMe offload (ZeRO-Infinity).")


class Topology(_Model):
    nodes: int = Field(1, description="Number of machines (nodes) taking part in the run.")
    gpus_per_node: int = Field(1, description="Processes (GPUs) per node; on CPU runs, processes per node.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class ZeroPP(_Model):
    quantized_weights: bool = Field(False, description="ZeRO++ qwZ: all-gather weights quantized to int8 (halves forward all-gather bytes; DeepSpeed ZeRO-3, GPU only).")
    quantized_gradients: bool = Field(False, description="ZeRO++ qgZ: reduce-scatter gradients quantized to int4 (about a quarter of the bytes; DeepSpeed ZeRO-3, GPU only).")
    hpz_partition_size: int = Field(1, description="ZeRO++ hpZ: keep a secondary copy of the weights sharded over this many GPUs (usually GPUs per node); 1 turns it off.")


class Wrap(_Model):
    policy: Literal["transformer", "size", "none"] = Field("transformer", description="FSDP wrap unit: each transformer block, any module above a size, or the whole model as one unit.")
    transformer_layer_cls: str = Field("Block", description="Class name of the transformer block to wrap (e.g. LlamaDecoderLayer, GPT2Block).")
    min_num_params: int = Field(100_000_000, description="Size-based wrapping: wrap any module with at least this many parameters.")


class Buckets(_Model):
    reduce_bucket_size: Auto = Field("auto", description="DeepSpeed reduce_bucket_size in elements ('auto' lets DeepSpeed / accelerate choose from the model).")
    allgather_bucket_size: Auto = Field("auto", description="DeepSpeed allgather_bucket_size in elements (ZeRO-1/2).")
    prefetch_bucket_size: Auto = Field("auto", description="DeepSpeed stage3_prefetch_bucket_size in elements: how much ZeRO-3 gathers ahead.")
    param_persistence_threshold: Auto = Field("auto", description="DeepSpeed stage3_param_persistence_threshold: parameters smaller than this stay unsharded.")


def _finite_or_raise(v: float) -> float:
    """inf / NaN would be exported as `lr=inf` or `NaN` and train nothing: refused where a value is read."""
    import math

    if not math.isfinite(v):
        raise ValueError("must be a finite number, not inf or NaN")
    return v


class Optimizer(_Model):
    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer: AdamW, Adam or SGD with momentum.")
    lr: float = Field(1e-4, description="Learning rate.")
    weight_decay: float = Field(0.0, description="Weight decay (decoupled for AdamW).")

    @field_validator("lr", "weight_decay")
    @classmethod
    def _finite(cls, v: float) -> float:
        return _finite_or_raise(v)


class Plan(_Model):
    """A sharded training setup, independent of the framework that will run it."""

    framework: Framework = Field("fsdp2", description="Which framework runs it: FSDP1 (FullyShardedDataParallel), FSDP2 (fully_shard) or DeepSpeed.")
    sharding: Sharding = Field("zero3", description="What is sharded: ddp (nothing), zero1 (optimizer), zero2 (+gradients), zero3 (+parameters), hybrid (zero3 inside a node, replicas across nodes).")
    precision: Precision = Field("bf16", description="Mixed precision for compute: fp32, bf16 or fp16 (master weights kept as each framework keeps them).")
    reduce_dtype: DType = Field("auto", description="dtype of gradient reduction; 'auto' follows the precision.")
    buffer_dtype: DType = Field("auto", description="dtype of module buffers (FSDP1 MixedPrecision.buffer_dtype); 'auto' follows the precision.")
    loss_scaling: Literal["dynamic", "none"] = Field("dynamic", description="fp16 only: dynamic loss scaling (DeepSpeed's loss_scale 0, torch's GradScaler) or none.")
    offload: Offload = Field(default_factory=Offload, description="CPU / NVMe offload of optimizer states and parameters.")
    activation_checkpointing: bool = Field(False, description="Recompute each block's activations in the backward pass instead of storing them.")
    micro_batch_size: int = Field(1, description="Sequences per GPU per forward/backward.")
    grad_accum_steps: int = Field(1, description="Micro-batches accumulated before each optimizer step.")
    global_batch_size: int | None = Field(None, description="Optional: sequences per optimizer step over all GPUs; must equal micro batch x grad accum x world size.")
    topology: Topology = Field(default_factory=Topology, description="Nodes and GPUs per node.")
    zeropp: ZeroPP = Field(default_factory=ZeroPP, description="ZeRO++ communication reductions (DeepSpeed ZeRO-3).")
    wrap: Wrap = Field(default_factory=Wrap, description="FSDP wrapping: which modules become one shard unit.")
    backward_prefetch: Literal["backward_pre", "backward_post", "none"] = Field("backward_pre", description="FSDP1: when to all-gather the next unit's parameters in backward.")
    forward_prefetch: bool = Field(False, description="FSDP: issue the next forward all-gather before the current unit's compute.")
    limit_all_gathers: bool = Field(True, description="FSDP1: rate-limit all-gathers so the CPU does not run ahead and balloon memory.")
    sync_module_states: bool = Field(True, description="FSDP: broadcast rank 0's weights at wrap time (needed with low-memory init).")
    low_memory_init: bool = Field(False, description="Build the model without a full copy per rank: FSDP's cpu_ram_efficient_loading, DeepSpeed's zero3_init (zero.Init).")
    checkpoint: Literal["sharded", "full", "full_16bit"] = Field("sharded", description="Checkpoint format: a shard per rank, one full state dict, or (DeepSpeed ZeRO-3) gathered 16-bit weights.")
    gradient_clipping: float | None = Field(None, description="Clip the global gradient norm to this value; empty for no clipping.")
    buckets: Buckets = Field(default_factory=Buckets, description="DeepSpeed bucket and prefetch sizes.")
    compile: bool = Field(False, description="Wrap the model with torch.compile.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Optimizer and learning rate.")

    @field_validator("gradient_clipping")
    @classmethod
    def _finite_clip(cls, v: float | None) -> float | None:
        return None if v is None else _finite_or_raise(v)

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def to_dict(self, *, minimal: bool = False) -> dict[str, Any]:
        """The plan as plain data; `minimal` keeps only what differs from the defaults (a plan file names only that)."""
        return self.model_dump(mode="json", exclude_defaults=minimal)

    def to_yaml(self, *, minimal: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(minimal=minimal), sort_keys=False)

    def findings(self) -> list["Finding"]:
        """All rule findings (errors and warnings) for this plan."""
        return [f for rule in RULES for f in rule(self)]

    def errors(self) -> list["Finding"]:
        return [f for f in self.findings() if f.level == "error"]

    def warnings(self) -> list["Finding"]:
        return [f for f in self.findings() if f.level == "warning"]


# --------------------------------------------------------------------------------------------
# Findings and rules


@dataclass(frozen=True)
class Finding:
    """One rule's verdict: `error` makes the plan impossible, `warning` means valid but probably unwise."""

    level: Literal["error", "warning"]
    rule: str
    field: str  # dotted path of the field at fault, e.g. "offload.params"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


class PlanError(ValueError):
    """Bad input: a plan that cannot be read or cannot be run. `findings` holds one entry per problem."""

    def __init__(self, findings: list[Finding]):
        findings = [Finding(f.level, f.rule, f.field[:200], safe_input.cap(f.message)) for f in findings[:50]]
        self.findings = findings
        super().__init__(safe_input.cap("\n".join(f.message for f in findings)))


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


def _err(rule_id: str, field: str, msg: str) -> Finding:
    return Finding("error", rule_id, field[:200], safe_input.cap(msg))


def _warn(rule_id: str, field: str, msg: str) -> Finding:
    return Finding("warning", rule_id, field[:200], safe_input.cap(msg))


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
    ("buckets.prefetch_bucket_size", lambda p: p.buckets.prefetch_bucket_size),
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
    v = p.buckets.param_persistence_threshold
    if isinstance(v, int) and v < 0:
        return _err("persistence_threshold_non_negative", "buckets.param_persistence_threshold", f"buckets.param_persistence_threshold={v} is negative; it is a parameter size in elements. Use 0 (shard everything), a positive size, or 'auto'.")


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
    if g is not None and g >= 1:
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
# Reading plans


def validate(plan: Plan) -> list[Finding]:
    """Return the plan's warnings; raise PlanError if any rule finds an error."""
    found = plan.findings()
    errors = [f for f in found if f.level == "error"]
    if errors:
        raise PlanError(errors)
    return found


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


def _friendly(err: ValidationError, model: type[BaseModel] = Plan) -> list[Finding]:
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


def plan_from_dict(data: Any, *, check: bool = True) -> Plan:
    """Build a Plan from plain data; PlanError (never a pydantic traceback) on bad input."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlanError([_err("bad_type", "(plan)", f"a plan must be a mapping of keys to values, got {type(data).__name__}. Write it as YAML 'key: value' lines or a JSON object.")])
    safe_input.check_data(data, "(plan)")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(_friendly(e)) from None
    except (TypeError, ValueError, RecursionError) as e:  # odd inputs pydantic does not wrap
        raise PlanError([_err("bad_type", "(plan)", f"the plan could not be read ({safe_input.short(str(e), 200)}). Check the file's structure.")]) from None
    if check:
        validate(plan)
    return plan


def parse_text(text: str | bytes, name: str = "<text>") -> Any:
    """YAML or JSON text -> plain data, with a PlanError naming the file and line on a syntax error.
    Read through safe_input's limits (alias expansion, depth, number size, key types)."""
    text = safe_input.decode(text, name)
    label = safe_input.short(name, 200)
    try:
        if name.endswith(".json"):
            return safe_input.load_json(text, name)
        return safe_input.load_yaml(text, name)  # YAML is a superset of JSON
    except (yaml.YAMLError, json.JSONDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, PlanError):
            raise
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        elif isinstance(e, json.JSONDecodeError):
            where = f" at line {e.lineno}, column {e.colno}"
        why = getattr(e, "problem", None) or getattr(e, "msg", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise PlanError([_err("bad_file", name, f"{label} is not valid YAML/JSON{where}: {safe_input.short(str(why), 200)}. Fix the syntax there.")]) from None


def read_text(path: str | Path) -> str:
    """A file's text, or a PlanError that names it (missing, a folder, not a regular file, too big, unreadable)."""
    return safe_input.read_file(path, "plan or config file")


def names_file(s: str) -> bool:
    """True if `s` names an existing path (read_text then says what is wrong with it if it is no file)."""
    return safe_input.is_existing_file(s)


def load_plan(source: str | Path | dict | Plan, *, check: bool = True) -> Plan:
    """A Plan from a Plan, a dict, a file path, or YAML/JSON text. Raises PlanError on bad input."""
    if isinstance(source, Plan):
        if check:
            validate(source)
        return source
    if isinstance(source, dict):
        return plan_from_dict(source, check=check)
    s = str(source)
    if isinstance(source, Path) or ("\n" not in s and (s.endswith((".yaml", ".yml", ".json")) or names_file(s))):
        return plan_from_dict(parse_text(read_text(s), s), check=check)
    data = parse_text(s)
    if isinstance(data, str) and "\n" not in s.strip():
        # one word that is no file: almost certainly a mistyped path, not a plan written inline
        raise bad_input(safe_input.short(s, 200), f"{safe_input.short(s, 200)}: file not found, and it is not a plan written out as YAML either. Check the path.")
    return plan_from_dict(data, check=check)


def field_descriptions(model: type[BaseModel] = Plan, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> its one-line description (for tooltips, docs and the CLI)."""
    out = {}
    for name, f in model.model_fields.items():
        key = prefix + name
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(field_descriptions(ann, key + "."))
        else:
            out[key] = f.description or ""
    return out


def bad_input(field: str, message: str) -> PlanError:
    """A PlanError for bad input found outside the Plan (an unknown preset, GPU or file): the CLI exits 2."""
    return PlanError([_err("bad_input", field, message)])
