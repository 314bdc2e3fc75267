"""DeepSpeed JSON -> Plan fields, with a note for every key that does not map to one."""

from __future__ import annotations

from typing import Any

from shardlab.export import keys as K
from shardlab.plan import Plan, bad_input

from .common import _MISSING, _bool, _choice, _float, _int, _mapping


def _leaf_note(key: str, value: Any) -> str:
    # the key's name only: a value may be a secret (a token, a path) that must not be echoed to a page
    return f"{key} is not modelled by shardlab (not carried into the plan; DeepSpeed's default applies on export)."


def _from_deepspeed(d: dict, notes_prefix: str = "") -> tuple[dict, list[str]]:
    fields: dict[str, Any] = {"framework": "deepspeed"}
    notes: list[str] = []
    used: set[str] = set()
    z = _mapping(K.ZERO, d.get(K.ZERO))

    def get(key: str) -> Any:
        v = K.get_dotted(d, key, _MISSING)
        if v is not _MISSING:
            used.add(key)
        return v

    for k in K.DEEPSPEED_KEYS:
        v = get(k.key)
        if v is _MISSING or v is None:
            continue
        default = K.plan_get(Plan(), k.field)
        if v == "auto" and not k.field.startswith("buckets."):
            notes.append(f"{k.key}='auto' is filled in by the HF Trainer / accelerate from the training arguments; shardlab uses {k.field}={default}.")
            continue
        if k.field.startswith("buckets.") or k.field in ("micro_batch_size", "grad_accum_steps", "global_batch_size"):
            v = _int(k.key, v, auto=k.field.startswith("buckets."))
        elif k.field.startswith("zeropp."):
            v = _bool(k.key, v)
        elif k.field == "reduce_dtype":
            v = _choice(k.key, v, {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"})
        else:
            v = _float(k.key, v)
            if k.field == "gradient_clipping" and v == 0:
                v = None  # DeepSpeed: 0 turns clipping off
        if v is not None:
            K.set_dotted(fields, k.field, v)

    stage = get(f"{K.ZERO}.stage")
    stage = 0 if stage is _MISSING else _int(f"{K.ZERO}.stage", stage)
    if stage not in K.STAGE_SHARDING:
        raise bad_input(f"{K.ZERO}.stage", f"{K.ZERO}.stage={stage} is not a ZeRO stage. Use 0, 1, 2 or 3.")
    fields["sharding"] = K.STAGE_SHARDING[stage]
    hpz = get(K.DS_HPZ)
    if hpz is not _MISSING and _int(K.DS_HPZ, hpz) > 1:
        K.set_dotted(fields, "zeropp.hpz_partition_size", _int(K.DS_HPZ, hpz))

    _precision_from_ds(d, get, fields, notes)
    _optimizer_from_ds(get, fields, notes)
    _offload_from_ds(z, get, fields, notes)
    for key in (K.DS_GATHER_16BIT, f"{K.ZERO}.stage3_gather_fp16_weights_on_model_save"):
        v = get(key)
        if v == "auto":
            notes.append(f"{key}='auto' is decided by the HF Trainer; shardlab uses checkpoint=sharded.")
        elif v is not _MISSING and _bool(key, v):
            fields["checkpoint"] = "full_16bit"
    ac = d.get(K.DS_ACTIVATION_CHECKPOINTING, _MISSING)
    if ac is not _MISSING:
        fields["activation_checkpointing"] = True
        for sub, want in K.DS_ACTIVATION_CHECKPOINTING_BLOCK.items():
            if _mapping(K.DS_ACTIVATION_CHECKPOINTING, ac).get(sub, want) == want:
                used.add(f"{K.DS_ACTIVATION_CHECKPOINTING}.{sub}")
        used.add(K.DS_ACTIVATION_CHECKPOINTING)
        notes.append("activation_checkpointing: the training program must call deepspeed.checkpointing.checkpoint (or the model's own gradient checkpointing) for it to take effect.")
    for key in (K.DS_ALLOW_UNTESTED, K.DS_FORCE_CPU_OPTIMIZER):
        get(key)

    _topology_from_ds(fields, notes)
    notes += [notes_prefix + _leaf_note(key, K.get_dotted(d, key)) for key in K.leaf_keys(d) if key not in used]
    return fields, notes


def _precision_from_ds(d: dict, get, fields: dict, notes: list[str]) -> None:
    bf16 = get("bf16.enabled")
    if bf16 is _MISSING:
        bf16 = get("bfloat16.enabled")  # DeepSpeed's older spelling
    fp16 = get("fp16.enabled")
    if "auto" in (bf16, fp16):
        notes.append("bf16/fp16 enabled='auto' follow the HF Trainer's --bf16/--fp16 flags; shardlab uses precision="
                     + ("fp16" if fp16 == "auto" and bf16 is _MISSING else "bf16") + ".")
        fields["precision"] = "fp16" if fp16 == "auto" and bf16 is _MISSING else "bf16"
    elif bf16 is not _MISSING and _bool("bf16.enabled", bf16):
        fields["precision"] = "bf16"
    elif fp16 is not _MISSING and _bool("fp16.enabled", fp16):
        fields["precision"] = "fp16"
    else:
        fields["precision"] = "fp32"
    scale = get("fp16.loss_scale")
    if fields["precision"] == "fp16" and scale is not _MISSING:
        s = _float("fp16.loss_scale", scale)
        if s != 0:
            fields["loss_scaling"] = "none"
            if s != 1:
                notes.append(f"fp16.loss_scale={s} is a static loss scale; shardlab models dynamic scaling or none, and uses none.")


def _optimizer_from_ds(get, fields: dict, notes: list[str]) -> None:
    kind = get("optimizer.type")
    if kind is _MISSING:
        return
    names = {v.lower(): k for k, v in K.DS_OPTIMIZER_TYPE.items()}
    if not isinstance(kind, str) or kind.lower() not in names:
        notes.append(f"optimizer.type={kind!r} is not modelled (shardlab knows AdamW, Adam, SGD); the plan uses adamw.")
        return
    name = names[kind.lower()]
    w_mode = get(K.DS_ADAM_W_MODE)
    if name == "adam" and (w_mode is _MISSING or _bool(K.DS_ADAM_W_MODE, w_mode)):
        name = "adamw"  # DeepSpeed's Adam is decoupled (AdamW) unless adam_w_mode is false
        notes.append("optimizer.type=Adam: DeepSpeed runs it as AdamW (adam_w_mode defaults to true); the plan says adamw.")
    fields.setdefault("optimizer", {})["name"] = name
    momentum = get(K.DS_SGD_MOMENTUM)
    if momentum is not _MISSING and momentum != K.SGD_MOMENTUM:
        notes.append(f"{K.DS_SGD_MOMENTUM}={momentum!r} differs from shardlab's SGD momentum {K.SGD_MOMENTUM}; the plan uses {K.SGD_MOMENTUM}.")


def _offload_from_ds(z: dict, get, fields: dict, notes: list[str]) -> None:
    paths = {}
    for what, key in K.DS_OFFLOAD.items():
        block = z.get(key.split(".")[-1], _MISSING)
        if block is _MISSING or block is None:
            continue
        _mapping(key, block)
        dev = get(f"{key}.device")
        if dev is _MISSING:
            continue
        fields.setdefault("offload", {})[what] = _choice(f"{key}.device", dev, {"none": "none", "cpu": "cpu", "nvme": "nvme"})
        path = get(f"{key}.nvme_path")
        if path is not _MISSING and path is not None and fields["offload"][what] == "nvme":
            paths[what] = str(path)
        elif path is not _MISSING and path is not None:
            notes.append(f"{key}.nvme_path={path!r} is unused (device is {fields['offload'][what]}); not carried into the plan.")
    if paths:
        fields["offload"]["nvme_path"] = paths.get("optimizer", paths.get("params"))
        if len(set(paths.values())) > 1:
            notes.append(f"optimizer and parameters swap to different NVMe paths ({paths['optimizer']}, {paths['params']}); the plan has one and uses {paths['optimizer']}.")
    legacy = get(f"{K.ZERO}.cpu_offload")
    if legacy is not _MISSING and _bool(f"{K.ZERO}.cpu_offload", legacy):
        fields.setdefault("offload", {}).setdefault("optimizer", "cpu")


def _topology_from_ds(fields: dict, notes: list[str]) -> None:
    hpz = K.get_dotted(fields, "zeropp.hpz_partition_size", 1)
    gbs = fields.get("global_batch_size")
    if isinstance(gbs, int):
        per = fields.get("micro_batch_size", 1) * fields.get("grad_accum_steps", 1)
        if per < 1 or gbs % per:
            raise bad_input("train_batch_size", f"train_batch_size={gbs} is not a multiple of train_micro_batch_size_per_gpu x gradient_accumulation_steps = {per}. "
                            "Make it micro batch x accumulation x number of GPUs.")
        world = gbs // per
        gpn = hpz if hpz > 1 and world % hpz == 0 else world
        fields["topology"] = {"nodes": world // gpn, "gpus_per_node": gpn}
        notes.append(f"a DeepSpeed config does not name the GPUs: topology {world // gpn} node(s) x {gpn} comes from train_batch_size; check it.")
    elif hpz > 1:
        fields["topology"] = {"nodes": 1, "gpus_per_node": hpz}
        notes.append(f"a DeepSpeed config does not name the GPUs: topology 1 node x {hpz} comes from zero_hpz_partition_size; set topology in the plan.")
    else:
        notes.append("a DeepSpeed config does not name the GPUs: topology is shardlab's default (1 x 1); set topology in the plan.")

