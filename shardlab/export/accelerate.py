"""Plan -> accelerate config YAML (the file `accelerate launch --config_file` reads).

FSDP1 and FSDP2 plans become a `distributed_type: FSDP` file whose `fsdp_config` holds only the
`fsdp_*` keys that `accelerate launch` has options for (accelerate does not reject unknown ones, so
a typo would be silently ignored). FSDP2 writes `fsdp_version: 2`, a boolean
`fsdp_reshard_after_forward`, and for hybrid / ddp a `parallelism_config` (2-D mesh: replicas x
shards). DeepSpeed plans use accelerate's inline DeepSpeed flags when they can say everything the
plan's ZeRO setup says, and otherwise point to `ds_config.json` (`shardlab export --to deepspeed`).
As with `accelerate config`, the training hyperparameters (micro batch, optimizer, learning rate) are
the training script's, not the launch config's. Keys an imported YAML carried are written back
(export/carry.py), and a `deepspeed_config_file` it named is kept.
"""

from __future__ import annotations

from typing import Any

import yaml

from shardlab.export import keys as K
from shardlab.plan import Plan

DS_CONFIG_FILE = "ds_config.json"


def needs_ds_config_file(plan: Plan) -> bool:
    """Whether accelerate's inline DeepSpeed flags cannot express the plan (hpZ, ZeRO++, buckets, no clipping...).

    Inline, accelerate drops a `gradient_clipping` of 0 and DeepSpeed then clips at 1.0 (accelerate 1.15
    DeepSpeedPlugin: `if self.gradient_clipping:`), so "no clipping" needs the DeepSpeed file."""
    return (plan.sharding == "hybrid" or plan.zeropp.model_dump() != type(plan.zeropp)().model_dump()
            or any(v != "auto" for v in plan.buckets.model_dump().values())
            or plan.gradient_clipping is None and "gradient_clipping" not in plan.auto)


def carried_ds_file(plan: Plan) -> str | None:
    """The DeepSpeed config file an imported accelerate YAML named (kept as written)."""
    ref = (plan.passthrough.accelerate.get("deepspeed_config") or {}).get("deepspeed_config_file")
    return str(ref) if ref else None


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


def _file_mode(plan: Plan) -> bool:
    return plan.framework == "deepspeed" and (carried_ds_file(plan) is not None or needs_ds_config_file(plan))


def _deepspeed_config(plan: Plan) -> dict[str, Any]:
    stage = K.DS_STAGE[plan.sharding]
    if _file_mode(plan):
        c: dict[str, Any] = {"deepspeed_config_file": carried_ds_file(plan) or DS_CONFIG_FILE}
    else:
        # Left out, these are "auto": accelerate fills them from the Accelerator / the HF Trainer.
        c = {k.key: K.plan_get(plan, k.field) for k in K.ACC_DS_KEYS if k.field not in plan.auto}
        if "gradient_clipping" not in plan.auto:
            c["gradient_clipping"] = plan.gradient_clipping
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


def natural_config(plan: Plan) -> dict[str, Any]:
    """What the plan means in accelerate's keys (top-level keys sorted, as `accelerate config` writes them)."""
    multi = plan.topology.nodes > 1
    c: dict[str, Any] = dict(K.ACC_FIXED_TOP)
    c["distributed_type"] = K.ACC_DISTRIBUTED_TYPE[plan.framework]
    if not _file_mode(plan):  # with a DeepSpeed config file accelerate refuses mixed_precision: the file decides
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


def meaning(cfg: dict) -> dict[str, Any]:
    """What an accelerate config means as plan settings, read without following deepspeed_config_file."""
    from shardlab.load.accelerate import _from_accelerate
    from shardlab.plan import plan_from_dict

    return plan_from_dict(_from_accelerate(cfg, None)[0], check=False).modelled()


def accelerate_config(plan: Plan) -> dict[str, Any]:
    """The accelerate config as a dict: the plan's meaning plus what an imported file carried (export/carry.py)."""
    from shardlab.export.carry import carry, fingerprint

    pt = plan.passthrough
    return carry(natural_config(plan), pt.accelerate, pt.omit.get("accelerate", []), meaning,
                 trust=pt.imported is not None and pt.imported == fingerprint(plan.modelled()))


def export_accelerate(plan: Plan) -> str:
    """The accelerate config file's text."""
    return yaml.safe_dump(accelerate_config(plan), sort_keys=False)
