"""The one table from Plan fields to the real tools' keys, shared by the exporters and the importers.

A `Key` pairs a dotted Plan field with a dotted key of the target format and says which plan value
is left out of the file (the tool's own default applies then). Fields whose mapping is not one to
one (sharding -> ZeRO stage, precision -> bf16/fp16 blocks, offload -> offload blocks, the optimizer
type) are spelled out as named constants here and converted in the exporter / importer, so both
sides read the same names and a round trip export -> import -> export is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_OMIT_NOTHING = object()


@dataclass(frozen=True)
class Key:
    """Plan field `field` <-> dotted tool key `key`; `omit` is the plan value written as 'no key'."""

    field: str
    key: str
    omit: Any = _OMIT_NOTHING

    def omitted(self, value: Any) -> bool:
        return self.omit is not _OMIT_NOTHING and value == self.omit


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON (dotted paths into the config dict)

ZERO = "zero_optimization"
DS_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "hybrid": 3}
STAGE_SHARDING = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
DS_HPZ = f"{ZERO}.zero_hpz_partition_size"
DS_OFFLOAD = {"optimizer": f"{ZERO}.offload_optimizer", "params": f"{ZERO}.offload_param"}
DS_GATHER_16BIT = f"{ZERO}.stage3_gather_16bit_weights_on_model_save"
DS_OPTIMIZER_TYPE = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
# DeepSpeed's "Adam" is AdamW unless adam_w_mode is false; plain Adam must say so explicitly.
DS_ADAM_W_MODE = "optimizer.params.adam_w_mode"
SGD_MOMENTUM = 0.9  # the plan's "SGD with momentum"; written out so every tool uses the same value
DS_SGD_MOMENTUM = "optimizer.params.momentum"
# SGD is not in ZeRO's list of tested optimizers; DeepSpeed refuses it under ZeRO without these.
DS_ALLOW_UNTESTED = "zero_allow_untested_optimizer"
DS_FORCE_CPU_OPTIMIZER = "zero_force_ds_cpu_optimizer"
# The DeepSpeed activation checkpointing block (used by deepspeed.checkpointing.checkpoint);
# its presence stands for activation_checkpointing: true.
DS_ACTIVATION_CHECKPOINTING = "activation_checkpointing"
DS_ACTIVATION_CHECKPOINTING_BLOCK = {"partition_activations": False, "cpu_checkpointing": False,
                                     "contiguous_memory_optimization": False}
# DeepSpeed optimizer types with one state per parameter (estimated like SGD with momentum); the others
# (OneBitAdam, ZeroOneAdam, Lamb, OneBitLamb, ...) keep two, like Adam.
DS_ONE_STATE_OPTIMIZERS = ("adagrad", "muon")
DS_NO_CLIPPING = 0.0  # DeepSpeed's "no gradient clipping"; a missing key means clipping at 1.0
DS_DEFAULT_CLIPPING = 1.0  # DeepSpeed 0.19.8 DeepSpeedConfig: gradient_clipping when the key is missing
DS_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}

DEEPSPEED_KEYS: tuple[Key, ...] = (
    Key("micro_batch_size", "train_micro_batch_size_per_gpu"),
    Key("grad_accum_steps", "gradient_accumulation_steps"),
    # train_batch_size only when the plan names a global batch (DeepSpeed derives it otherwise).
    Key("global_batch_size", "train_batch_size", omit=None),
    Key("gradient_clipping", "gradient_clipping"),
    Key("reduce_dtype", "communication_data_type", omit="auto"),
    Key("optimizer.lr", "optimizer.params.lr"),
    Key("optimizer.weight_decay", "optimizer.params.weight_decay"),
    Key("buckets.reduce_bucket_size", f"{ZERO}.reduce_bucket_size", omit="auto"),
    Key("buckets.allgather_bucket_size", f"{ZERO}.allgather_bucket_size", omit="auto"),
    Key("buckets.prefetch_bucket_size", f"{ZERO}.stage3_prefetch_bucket_size", omit="auto"),
    Key("buckets.param_persistence_threshold", f"{ZERO}.stage3_param_persistence_threshold", omit="auto"),
    Key("zeropp.quantized_weights", f"{ZERO}.zero_quantized_weights", omit=False),
    Key("zeropp.quantized_gradients", f"{ZERO}.zero_quantized_gradients", omit=False),
)
# Keys the composite mappings above consume (the importer counts them as carried over).
DEEPSPEED_COMPOSITE_KEYS: tuple[str, ...] = (
    f"{ZERO}.stage", DS_HPZ, DS_GATHER_16BIT, "bf16.enabled", "fp16.enabled", "fp16.loss_scale",
    "optimizer.type", DS_ADAM_W_MODE, DS_SGD_MOMENTUM, DS_ALLOW_UNTESTED, DS_FORCE_CPU_OPTIMIZER,
    *(f"{v}.device" for v in DS_OFFLOAD.values()), *(f"{v}.nvme_path" for v in DS_OFFLOAD.values()),
    *(f"{DS_ACTIVATION_CHECKPOINTING}.{k}" for k in DS_ACTIVATION_CHECKPOINTING_BLOCK),
)

# ---------------------------------------------------------------------------------------------
# accelerate config YAML

ACC_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
ACC_DISTRIBUTED_TYPE = {"fsdp1": "FSDP", "fsdp2": "FSDP", "deepspeed": "DEEPSPEED"}
# FSDP1 sharding strategies, as accelerate writes them under fsdp_reshard_after_forward (older
# files: fsdp_sharding_strategy, names or 1-based numbers).
FSDP1_STRATEGY = {"ddp": "NO_SHARD", "zero2": "SHARD_GRAD_OP", "zero3": "FULL_SHARD", "hybrid": "HYBRID_SHARD"}
FSDP1_STRATEGY_NUMBERS = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
# FSDP2: whether parameters are freed again after forward (True for ZeRO-3-like sharding).
FSDP2_RESHARD = {"ddp": False, "zero2": False, "zero3": True, "hybrid": True}
ACC_WRAP_POLICY = {"transformer": "TRANSFORMER_BASED_WRAP", "size": "SIZE_BASED_WRAP", "none": "NO_WRAP"}
ACC_BACKWARD_PREFETCH = {"backward_pre": "BACKWARD_PRE", "backward_post": "BACKWARD_POST", "none": "NO_PREFETCH"}
ACC_STATE_DICT = {"sharded": "SHARDED_STATE_DICT", "full": "FULL_STATE_DICT"}
ACC_PARALLELISM_PREFIX = "parallelism_config_"
ACC_DYNAMO_BACKEND = "INDUCTOR"

# Plan field <-> fsdp_config key whose value is the plan value itself (booleans and names).
ACC_FSDP_KEYS: tuple[Key, ...] = (
    Key("activation_checkpointing", "fsdp_activation_checkpointing"),
    Key("low_memory_init", "fsdp_cpu_ram_efficient_loading"),
)
ACC_FSDP1_ONLY_KEYS: tuple[Key, ...] = (
    Key("forward_prefetch", "fsdp_forward_prefetch"),
    Key("sync_module_states", "fsdp_sync_module_states"),
)
# The accelerate deepspeed_config keys shardlab writes inline (accelerate's own DeepSpeed flags).
ACC_DS_KEYS: tuple[Key, ...] = (
    Key("grad_accum_steps", "gradient_accumulation_steps"),
)
ACC_DS_COMPOSITE_KEYS: tuple[str, ...] = (
    "zero_stage", "offload_optimizer_device", "offload_param_device", "offload_optimizer_nvme_path",
    "offload_param_nvme_path", "gradient_clipping", "zero3_init_flag", "zero3_save_16bit_model",
    "deepspeed_config_file",
)
ACC_FSDP_COMPOSITE_KEYS: tuple[str, ...] = (
    "fsdp_version", "fsdp_reshard_after_forward", "fsdp_sharding_strategy", "fsdp_offload_params",
    "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap", "fsdp_min_num_params",
    "fsdp_backward_prefetch", "fsdp_state_dict_type", "fsdp_use_orig_params",
)
# The launch-only top-level keys shardlab writes with fixed values (not Plan fields).
ACC_FIXED_TOP = {"compute_environment": "LOCAL_MACHINE", "debug": False, "downcast_bf16": "no",
                 "enable_cpu_affinity": False, "machine_rank": 0, "main_training_function": "main",
                 "same_network": True, "use_cpu": False}


def get_in(data: Any, parts, default: Any = None) -> Any:
    """data[a][b] for parts (a, b), or `default` where a level is missing or not a mapping."""
    cur: Any = data
    for part in parts:
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def get_dotted(data: dict, dotted: str, default: Any = None) -> Any:
    """data['a']['b'] for 'a.b', or `default` where a level is missing or not a mapping."""
    return get_in(data, dotted.split("."), default)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data['a']['b'] = value for 'a.b', creating the levels in between."""
    *parents, last = dotted.split(".")
    cur = data
    for part in parents:
        cur = cur.setdefault(part, {})
    cur[last] = value


def plan_get(plan: Any, field: str) -> Any:
    """A dotted Plan field's value ('buckets.reduce_bucket_size')."""
    cur = plan
    for part in field.split("."):
        cur = getattr(cur, part)
    return cur


def leaf_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a nested mapping (an empty mapping counts as a leaf)."""
    if not isinstance(data, dict) or not data:
        return [prefix] if prefix else []
    out = []
    for k, v in data.items():
        out += leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return out
