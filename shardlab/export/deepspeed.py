"""Plan -> DeepSpeed JSON config (the file `deepspeed.initialize(config=...)` and `--deepspeed_config` read).

The plan's meaning is written wherever DeepSpeed's default differs from it (no clipping is
`gradient_clipping: 0`, since DeepSpeed clips at 1.0 by default); settings the plan leaves to the
training script are written as "auto" (the HF Trainer's placeholder; `resolve=True` fills in the
values the plan assumes, as the runner needs); keys an imported file carried are written back
(export/carry.py). `train_batch_size` appears only when the plan names a global batch (DeepSpeed
derives it from micro batch x accumulation x world size).
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


AUTO = "auto"  # the HF Trainer's / accelerate's placeholder: filled from the training arguments


def _value(plan: Plan, auto: set[str], field: str) -> Any:
    return AUTO if field in auto else K.plan_get(plan, field)


def _batch_and_clipping(plan: Plan, auto: set[str], cfg: dict) -> None:
    if "global_batch_size" in auto or plan.global_batch_size is not None:
        cfg["train_batch_size"] = _value(plan, auto, "global_batch_size")
    cfg["train_micro_batch_size_per_gpu"] = _value(plan, auto, "micro_batch_size")
    cfg["gradient_accumulation_steps"] = _value(plan, auto, "grad_accum_steps")
    # DeepSpeed 0.19.8 clips at 1.0 when the key is missing: "no clipping" must be written as 0.
    clip = _value(plan, auto, "gradient_clipping")
    cfg["gradient_clipping"] = K.DS_NO_CLIPPING if clip is None else clip


def _precision(plan: Plan, auto: set[str], cfg: dict) -> None:
    if "precision" in auto:  # the Trainer's --bf16 / --fp16 decide; the block says which one the plan assumes
        cfg["bf16" if plan.precision != "fp16" else "fp16"] = {"enabled": AUTO}
    elif plan.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif plan.precision == "fp16":
        # loss_scale 0 is DeepSpeed's dynamic loss scaling; 1.0 is a fixed scale of one (none).
        cfg["fp16"] = {"enabled": True, "loss_scale": 0 if plan.loss_scaling == "dynamic" else 1.0}
    if plan.reduce_dtype != "auto":
        cfg["communication_data_type"] = plan.reduce_dtype


def _optimizer(plan: Plan, auto: set[str], cfg: dict) -> None:
    if "optimizer" in auto:
        return  # no block: the training script passes its own optimizer
    params = {"lr": _value(plan, auto, "optimizer.lr"), "weight_decay": _value(plan, auto, "optimizer.weight_decay")}
    cfg["optimizer"] = {"type": K.DS_OPTIMIZER_TYPE[plan.optimizer.name], "params": params}
    if plan.optimizer.name == "adam":
        K.set_dotted(cfg, K.DS_ADAM_W_MODE, False)
    elif plan.optimizer.name == "sgd":
        K.set_dotted(cfg, K.DS_SGD_MOMENTUM, K.SGD_MOMENTUM)


def _zero(plan: Plan, auto: set[str], cfg: dict) -> int:
    stage = K.DS_STAGE[plan.sharding]
    cfg[K.ZERO] = {"stage": stage}
    for what, key in K.DS_OFFLOAD.items():
        target = getattr(plan.offload, what)
        if target != "none":
            K.set_dotted(cfg, key, _offload_block(plan, target))
    for k in K.DEEPSPEED_KEYS:
        if not k.key.startswith(K.ZERO + "."):
            continue
        value = _value(plan, auto, k.field)
        if k.field in auto or not k.omitted(value):  # a bucket value 'auto' (the tool chooses) is left out
            K.set_dotted(cfg, k.key, value)
    if stage == 3 and hpz_size(plan) > 1:
        K.set_dotted(cfg, K.DS_HPZ, hpz_size(plan))
    if plan.checkpoint == "full_16bit":
        K.set_dotted(cfg, K.DS_GATHER_16BIT, True)
    return stage


def natural_config(plan: Plan, *, resolve: bool = False) -> dict[str, Any]:
    """What the plan means in DeepSpeed's keys, in a fixed key order (stable files, readable diffs).

    Settings on the plan's `auto` list are written as "auto" (for the HF Trainer / accelerate to fill),
    or with `resolve` as the values the plan assumes (for a launch without the Trainer)."""
    require_deepspeed(plan, "deepspeed")
    auto = set() if resolve else set(plan.auto)
    cfg: dict[str, Any] = {}
    _batch_and_clipping(plan, auto, cfg)
    _precision(plan, auto, cfg)
    _optimizer(plan, auto, cfg)
    stage = _zero(plan, auto, cfg)
    if plan.activation_checkpointing:
        cfg[K.DS_ACTIVATION_CHECKPOINTING] = dict(K.DS_ACTIVATION_CHECKPOINTING_BLOCK)
    if plan.optimizer.name == "sgd" and stage > 0 and "optimizer" not in auto:  # SGD is not on ZeRO's tested list
        cfg[K.DS_ALLOW_UNTESTED] = True
        if plan.offload.optimizer != "none":
            cfg[K.DS_FORCE_CPU_OPTIMIZER] = False
    return cfg


def meaning(cfg: dict) -> dict[str, Any]:
    """What a DeepSpeed config means as plan settings (the importer's reading), for comparing files."""
    from shardlab.load.deepspeed import _from_deepspeed
    from shardlab.plan import plan_from_dict

    return plan_from_dict(_from_deepspeed(cfg)[0], check=False).modelled()


def deepspeed_config(plan: Plan, *, resolve: bool = False) -> dict[str, Any]:
    """The DeepSpeed config as a dict: the plan's meaning plus what an imported file carried.

    `resolve=True` is the runner's (and `export --resolve`'s) form: no "auto" anywhere, so DeepSpeed
    itself can read it; carried "auto" values (scheduler or optimizer params) are left out, and
    DeepSpeed's defaults apply to them."""
    from shardlab.export.carry import carry, fingerprint

    natural = natural_config(plan, resolve=resolve)
    pt = plan.passthrough
    cfg = carry(natural, pt.deepspeed, pt.omit.get("deepspeed", []), meaning,
                trust=pt.imported is not None and pt.imported == fingerprint(plan.modelled()))
    return _drop_auto(cfg) if resolve else cfg


def _drop_auto(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_auto(v) for k, v in obj.items() if v != AUTO}
    return obj


def export_deepspeed(plan: Plan, *, resolve: bool = False) -> str:
    """The DeepSpeed config file's text."""
    return json.dumps(deepspeed_config(plan, resolve=resolve), indent=2) + "\n"
