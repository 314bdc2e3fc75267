"""Plan -> accelerate config YAML (the file `accelerate launch --config_file` reads).

FSDP1 and FSDP2 plans become a `distributed_type: FSDP` file whose `fsdp_config` holds only the
`fsdp_*` keys that `accelerate launch` has options for (accelerate does not reject unknown ones, so
a typo would be silently ignored). FSDP2 writes `fsdp_version: 2`, a boolean
`fsdp_reshard_after_forward`, and for hybrid / ddp a `parallelism_config` (2-D mesh: replicas x
shards). DeepSpeed plans use accelerate's inline DeepSpeed flags when they can say everything the
plan's ZeRO setup says, and otherwise point to `ds_config.json` (`shardlab export --to deepspeed`).
As with `accelerate config`, the training hyperparameters (micro batch, optimizer, learning rate) are
the training script's, not the launch config's.
"""

from __future__ import annotations

from typing import Any

import yaml

from shardlab.export import keys as K
from shardlab.plan import Plan

DS_CONFIG_FILE = "ds_config.json"


def needs_ds_config_file(plan: Plan) -> bool:
    """Whether accelerate's inline DeepSpeed flags cannot express the plan (hpZ, ZeRO++, buckets...)."""
    return (plan.sharding == "hybrid" or plan.zeropp.model_dump() != type(plan.zeropp)().model_dump()
            or any(v != "auto" for v in plan.buckets.model_dump().values()))


def _fsdp_config(plan: Plan) -> dict[str, Any]:
    v2 = plan.framework == "fsdp2"
    c: dict[str, Any] = {}
    for k in K.ACC_FSDP_KEYS + (() if v2 else K.ACC_FSDP1_ONLY_KEYS):
        c[k.key] = K.plan_get(plan, k.field)
    c["fsdp_auto_wrap_policy"] = K.ACC_WRAP_POLICY[plan.wrap.policy]
    if plan.wrap.policy == "transformer":
        c["fsdp_transformer_layer_cls_to_wrap"] = plan.wrap.transformer_layer_cls
    elif plan.wrap.policy == "size":
        c["fsdp_min_num_params"] = plan.wrap.min_num_params
    if not v2:
        c["fsdp_backward_prefetch"] = K.ACC_BACKWARD_PREFETCH[plan.backward_prefetch]
        from shardlab.frameworks import fsdp1

        c["fsdp_use_orig_params"] = fsdp1.USE_ORIG_PARAMS  # what the runner and the exported script use
    both_cpu = plan.offload.params == "cpu" and plan.offload.optimizer == "cpu"
    c["fsdp_offload_params"] = both_cpu
    c["fsdp_reshard_after_forward"] = K.FSDP2_RESHARD[plan.sharding] if v2 else K.FSDP1_STRATEGY[plan.sharding]
    c["fsdp_state_dict_type"] = K.ACC_STATE_DICT.get(plan.checkpoint, "FULL_STATE_DICT")
    c["fsdp_version"] = 2 if v2 else 1
    return dict(sorted(c.items()))


def _parallelism_config(plan: Plan) -> dict[str, Any]:
    """FSDP2's 2-D mesh for hybrid (replicate over nodes, shard in a node) and ddp (replicate only)."""
    t = plan.topology
    if plan.sharding == "hybrid":
        replicate, shard = t.nodes, t.gpus_per_node
    elif plan.sharding == "ddp":
        replicate, shard = t.world_size, 1
    else:
        return {}
    p = K.ACC_PARALLELISM_PREFIX
    return {f"{p}dp_replicate_size": replicate, f"{p}dp_shard_size": shard}


def _deepspeed_config(plan: Plan) -> dict[str, Any]:
    stage = K.DS_STAGE[plan.sharding]
    if needs_ds_config_file(plan):
        c: dict[str, Any] = {"deepspeed_config_file": DS_CONFIG_FILE}
    else:
        c = {k.key: K.plan_get(plan, k.field) for k in K.ACC_DS_KEYS}
        # accelerate clips at 1.0 when the key is missing; 0.0 is DeepSpeed's "no clipping".
        c["gradient_clipping"] = plan.gradient_clipping if plan.gradient_clipping is not None else 0.0
        c["offload_optimizer_device"] = plan.offload.optimizer
        c["offload_param_device"] = plan.offload.params
        for what in ("optimizer", "param"):
            if c[f"offload_{what}_device"] == "nvme":
                c[f"offload_{what}_nvme_path"] = plan.offload.nvme_path
        c["zero_stage"] = stage
        if stage == 3:
            c["zero3_save_16bit_model"] = plan.checkpoint == "full_16bit"
    if stage == 3:
        c["zero3_init_flag"] = plan.low_memory_init
    if plan.topology.nodes > 1:
        # Every node runs `accelerate launch` itself (as the exported launch command says), no pdsh/hostfile.
        c["deepspeed_multinode_launcher"] = "standard"
    return dict(sorted(c.items()))


def accelerate_config(plan: Plan) -> dict[str, Any]:
    """The accelerate config as a dict (top-level keys sorted, as `accelerate config` writes them)."""
    multi = plan.topology.nodes > 1
    c: dict[str, Any] = dict(K.ACC_FIXED_TOP)
    c["distributed_type"] = K.ACC_DISTRIBUTED_TYPE[plan.framework]
    file_mode = plan.framework == "deepspeed" and needs_ds_config_file(plan)
    if not file_mode:  # with a DeepSpeed config file accelerate refuses mixed_precision: the file decides
        c["mixed_precision"] = K.ACC_MIXED_PRECISION[plan.precision]
    c["num_machines"] = plan.topology.nodes
    c["num_processes"] = plan.world_size
    c["rdzv_backend"] = "c10d" if multi else "static"
    if plan.compile:
        c["dynamo_config"] = {"dynamo_backend": K.ACC_DYNAMO_BACKEND}
    if plan.framework == "deepspeed":
        c["deepspeed_config"] = _deepspeed_config(plan)
    else:
        c["fsdp_config"] = _fsdp_config(plan)
        if plan.framework == "fsdp2" and _parallelism_config(plan):
            c["parallelism_config"] = _parallelism_config(plan)
    return dict(sorted(c.items()))


def export_accelerate(plan: Plan) -> str:
    """The accelerate config file's text."""
    return yaml.safe_dump(accelerate_config(plan), sort_keys=False)
