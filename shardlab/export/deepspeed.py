"""Plan -> DeepSpeed JSON config (the file `deepspeed.initialize(config=...)` and `--deepspeed_config` read).

Only values the plan decides are written; everything else is left to DeepSpeed's defaults, so the
file stays short and the importer can map every key back. No "auto" values are written: those are
the HF Trainer's placeholders and DeepSpeed itself rejects them. `train_batch_size` appears only when
the plan names a global batch (DeepSpeed derives it from micro batch x accumulation x world size).
"""

from __future__ import annotations

import json
from typing import Any

from shardlab.export import keys as K
from shardlab.plan import Plan, bad_input


def require_deepspeed(plan: Plan, target: str) -> None:
    if plan.framework != "deepspeed":
        raise bad_input("framework", f"--to {target} needs framework=deepspeed, but the plan's framework is {plan.framework}. "
                        f"Translate it first (shardlab translate PLAN --to deepspeed), or export with --to accelerate / fsdp-code.")


def hpz_size(plan: Plan) -> int:
    """hpZ partition size DeepSpeed gets: hybrid means one secondary shard group per node."""
    if plan.zeropp.hpz_partition_size > 1:
        return plan.zeropp.hpz_partition_size
    return plan.topology.gpus_per_node if plan.sharding == "hybrid" else 1


def _offload_block(plan: Plan, target: str) -> dict[str, Any]:
    block: dict[str, Any] = {"device": target}
    if target == "nvme":
        block["nvme_path"] = plan.offload.nvme_path
    return block


def deepspeed_config(plan: Plan) -> dict[str, Any]:
    """The DeepSpeed config as a dict, in a fixed key order (stable files, readable diffs)."""
    require_deepspeed(plan, "deepspeed")
    cfg: dict[str, Any] = {}
    simple = {k.key: k for k in K.DEEPSPEED_KEYS}

    def put(key: str) -> None:
        k = simple[key]
        value = K.plan_get(plan, k.field)
        if not k.omitted(value):
            K.set_dotted(cfg, k.key, value)

    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        put(key)
    if plan.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif plan.precision == "fp16":
        # loss_scale 0 is DeepSpeed's dynamic loss scaling; 1.0 is a fixed scale of one (none).
        cfg["fp16"] = {"enabled": True, "loss_scale": 0 if plan.loss_scaling == "dynamic" else 1.0}
    put("communication_data_type")

    cfg["optimizer"] = {"type": K.DS_OPTIMIZER_TYPE[plan.optimizer.name], "params": {}}
    put("optimizer.params.lr")
    put("optimizer.params.weight_decay")
    if plan.optimizer.name == "adam":
        K.set_dotted(cfg, K.DS_ADAM_W_MODE, False)
    elif plan.optimizer.name == "sgd":
        K.set_dotted(cfg, K.DS_SGD_MOMENTUM, K.SGD_MOMENTUM)

    stage = K.DS_STAGE[plan.sharding]
    cfg[K.ZERO] = {"stage": stage}
    for what, key in K.DS_OFFLOAD.items():
        target = getattr(plan.offload, what)
        if target != "none":
            K.set_dotted(cfg, key, _offload_block(plan, target))
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold", "zero_quantized_weights", "zero_quantized_gradients"):
        put(f"{K.ZERO}.{key}")
    if stage == 3 and hpz_size(plan) > 1:
        K.set_dotted(cfg, K.DS_HPZ, hpz_size(plan))
    if plan.checkpoint == "full_16bit":
        K.set_dotted(cfg, K.DS_GATHER_16BIT, True)

    if plan.activation_checkpointing:
        cfg[K.DS_ACTIVATION_CHECKPOINTING] = dict(K.DS_ACTIVATION_CHECKPOINTING_BLOCK)
    if plan.optimizer.name == "sgd" and stage > 0:
        cfg[K.DS_ALLOW_UNTESTED] = True
        if plan.offload.optimizer != "none":
            cfg[K.DS_FORCE_CPU_OPTIMIZER] = False
    return cfg


def export_deepspeed(plan: Plan) -> str:
    """The DeepSpeed config file's text."""
    return json.dumps(deepspeed_config(plan), indent=2) + "\n"
