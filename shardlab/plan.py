"""The Plan: one framework-neutral description of a sharded training setup.

Every field carries a one-line `description`; the widgets use it as label tooltip, so the UI and the
model cannot drift apart. Parsing (types, unknown keys) is pydantic's; the cross-field rules that make
a setup impossible or unwise live in `shardlab.plan_rules.RULES`, each with its own message naming the
field, the value, why, and the fix. `load_plan` turns any file or text into a Plan or a PlanError whose message
is fit to show a person (the CLI prints it and exits 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


# Plan fields a DeepSpeed / accelerate file may leave to the training script: "auto" (the HF Trainer or
# accelerate fills it from the training arguments) or, for the optimizer, no optimizer block at all.
AUTO_FIELDS: tuple[str, ...] = (
    "micro_batch_size", "grad_accum_steps", "global_batch_size", "precision", "gradient_clipping", "optimizer",
    "optimizer.lr", "optimizer.weight_decay", "buckets.reduce_bucket_size", "buckets.allgather_bucket_size",
    "buckets.prefetch_bucket_size", "buckets.param_persistence_threshold")
AutoField = Literal[AUTO_FIELDS]  # type: ignore[valid-type]
# Not a form control: shown read-only by the ConfigBuilder (see widgets/controls.py).
_NOT_A_CONTROL = {"form": False}


class Passthrough(_Model):
    """What a DeepSpeed / accelerate file said that the plan does not model, written back on export to that tool."""

    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed JSON keys shardlab does not model (or spells differently), nested as in the file.")
    accelerate: dict[str, Any] = Field(default_factory=dict, description="accelerate YAML keys shardlab does not model (or spells differently), nested as in the file.")
    omit: dict[str, list[str]] = Field(default_factory=dict, description="Per tool: dotted keys the imported file left out (the tool's default applies), so exports leave them out too.")
    imported: str | None = Field(None, description="Fingerprint of the plan as imported: while the plan is unchanged, exports give back the file as it was.")

    def carried(self, tool: str) -> list[str]:
        from shardlab.export.keys import leaf_keys

        return leaf_keys(getattr(self, tool, {}) or {})


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
    auto: list[AutoField] = Field(default_factory=list, description="Settings left to the training script ('auto' for the HF Trainer / accelerate; 'optimizer': no optimizer block). Exports write 'auto'; the plan's own value is what estimates and runs assume.", json_schema_extra=_NOT_A_CONTROL)
    passthrough: Passthrough = Field(default_factory=Passthrough, description="Keys of an imported DeepSpeed / accelerate file that shardlab does not model, carried back on export to that tool.", json_schema_extra=_NOT_A_CONTROL)

    @model_validator(mode="before")
    @classmethod
    def _auto_values(cls, data: Any) -> Any:
        """`micro_batch_size: auto` (or `optimizer: auto`) in a plan file: the field goes on the `auto` list and keeps its default."""
        if not isinstance(data, dict):
            return data
        given = data.get("auto")
        data, auto = dict(data), (list(given) if isinstance(given, list) else [] if given is None else given)
        for name in AUTO_FIELDS:
            if name.startswith("buckets."):
                continue  # a bucket value of 'auto' already means 'the tool chooses'
            head, _, tail = name.partition(".")
            holder = data if not tail else data.get(head)
            key = tail or head
            if isinstance(holder, dict) and holder.get(key) == "auto":
                if tail:
                    holder = data[head] = {k: v for k, v in holder.items() if k != key}
                else:
                    del data[key]
                if isinstance(auto, list) and name not in auto:
                    auto.append(name)
        if auto or "auto" in data:
            data["auto"] = auto
        return data

    @field_validator("auto")
    @classmethod
    def _auto_sorted(cls, v: list[str]) -> list[str]:
        return sorted(set(v))

    def assumed(self) -> dict[str, Any]:
        """For every 'auto' setting, the value estimates and runs assume (the plan's own value)."""
        out = {}
        for name in self.auto:
            value = self.optimizer.model_dump(include={"name", "lr", "weight_decay"}) if name == "optimizer" else self
            if name != "optimizer":
                for part in name.split("."):
                    value = getattr(value, part)
            out[name] = value
        return out

    def modelled(self) -> dict[str, Any]:
        """The plan without what it carries for the tools (what the settings mean, not how a file spelled them)."""
        return self.model_dump(mode="json", exclude={"passthrough"})

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
        """All rule findings (errors and warnings) for this plan (the rules: shardlab/plan_rules.py)."""
        from shardlab.plan_rules import RULES

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


def _err(rule_id: str, field: str, msg: str) -> Finding:
    return Finding("error", rule_id, field[:200], safe_input.cap(msg))


def _warn(rule_id: str, field: str, msg: str) -> Finding:
    return Finding("warning", rule_id, field[:200], safe_input.cap(msg))



# --------------------------------------------------------------------------------------------
# Reading plans


def validate(plan: Plan) -> list[Finding]:
    """Return the plan's warnings; raise PlanError if any rule finds an error."""
    found = plan.findings()
    errors = [f for f in found if f.level == "error"]
    if errors:
        raise PlanError(errors)
    return found


ACCELERATE_MARKS = frozenset({"distributed_type", "compute_environment", "fsdp_config"})  # an accelerate YAML has one


def config_kind(data: dict) -> str:
    """What a mapping read from a file is: "plan" (it names framework or sharding), "accelerate" (ACCELERATE_MARKS) or
    "deepspeed" (anything else). The one reading for `import`, `diff` and the plan loader's refusal below."""
    keys = {str(k) for k in data}
    return "plan" if keys & {"framework", "sharding"} else "accelerate" if keys & ACCELERATE_MARKS else "deepspeed"


# top-level keys only a DeepSpeed JSON or an accelerate YAML has (never a Plan field): such a file given where a plan is
# expected was answered key by key ("train_micro_batch_size_per_gpu: unknown key. Did you mean 'micro_batch_size'?")
_FOREIGN_KEYS = {"accelerate": ACCELERATE_MARKS | {"deepspeed_config", "num_processes"},
                 "DeepSpeed": {"zero_optimization", "train_batch_size", "train_micro_batch_size_per_gpu",
                               "gradient_accumulation_steps", "fp16", "bf16", "zero_allow_untested_optimizer"}}


def _refuse_foreign_config(data: dict, name: str) -> None:
    """PlanError when `data` is a DeepSpeed or accelerate config rather than a plan: the way from one is `import`."""
    if config_kind(data) == "plan":
        return
    keys = {str(k) for k in data}
    for tool, marks in _FOREIGN_KEYS.items():
        found = sorted(keys & marks)
        if found:
            raise PlanError([_err("not_a_plan", "(plan)", f"{name} is {'an' if tool == 'accelerate' else 'a'} {tool} config "
                                  f"({', '.join(found[:3])}), not a shardlab plan. Import it first: shardlab import {name} -o plan.yaml "
                                  "(in Python: shardlab.load.import_config), then use the plan; shardlab diff compares configs as they are.")])


def plan_from_dict(data: Any, *, check: bool = True, name: str = "this mapping") -> Plan:
    """Build a Plan from plain data; PlanError (never a pydantic traceback) on bad input."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlanError([_err("bad_type", "(plan)", f"a plan must be a mapping of keys to values, got {type(data).__name__}. Write it as YAML 'key: value' lines or a JSON object.")])
    safe_input.check_data(data, "(plan)")
    _refuse_foreign_config(data, name)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        from shardlab.plan_rules import pydantic_findings

        raise PlanError(pydantic_findings(e)) from None
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
        return plan_from_dict(parse_text(read_text(s), s), check=check, name=s if len(s) <= 200 else safe_input.short(s, 200))
    data = parse_text(s)
    if isinstance(data, str) and "\n" not in s.strip():
        # one word that is no file: almost certainly a mistyped path, not a plan written inline
        raise bad_input(safe_input.short(s, 200), f"{safe_input.short(s, 200)}: file not found, and it is not a plan written out as YAML either. Check the path.")
    return plan_from_dict(data, check=check)


def field_descriptions(model: type[BaseModel] = Plan, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> its one-line description (for tooltips, docs and the CLI)."""
    out = {}
    for name, f in model.model_fields.items():
        if (f.json_schema_extra or {}).get("form") is False:
            continue  # not a setting one types in: shown read-only (passthrough, auto)
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


def __getattr__(name: str):
    """`shardlab.plan.RULES` / `.rule`: the rules live in shardlab/plan_rules.py (imported on first use)."""
    if name in ("RULES", "rule", "Rule"):
        from shardlab import plan_rules

        return getattr(plan_rules, name)
    raise AttributeError(f"module 'shardlab.plan' has no attribute {name!r}")
