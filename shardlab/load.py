"""The real tools' formats -> Plan (DeepSpeed JSON, accelerate YAML), and translate() between frameworks.

Importers read the same key table the exporters write (shardlab/export/keys.py), so export ->
import -> export gives the same file. Nothing is dropped silently: every key that does not map to a
Plan field comes back as a note, and every "auto" (the HF Trainer's placeholder) says what shardlab
used instead. A file that cannot be read, or that describes an impossible setup (e.g. DeepSpeed's
`offload_param` with stage 2, which DeepSpeed itself accepts), raises PlanError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shardlab.export import keys as K
from shardlab.plan import Plan, PlanError, bad_input, names_file, parse_text, plan_from_dict, read_text

_MISSING = object()

# Top-level keys accelerate's config loader knows (it refuses any other); the launch-only ones are
# noted, not modelled.
ACC_TOP_KEYS = {"compute_environment", "distributed_type", "mixed_precision", "use_cpu", "debug", "num_processes",
                "machine_rank", "num_machines", "gpu_ids", "main_process_ip", "main_process_port", "rdzv_backend",
                "same_network", "main_training_function", "enable_cpu_affinity", "fp8_config", "deepspeed_config",
                "fsdp_config", "parallelism_config", "megatron_lm_config", "mpirun_config", "downcast_bf16", "tpu_name",
                "tpu_zone", "tpu_use_cluster", "tpu_use_sudo", "command_file", "commands", "tpu_vm", "tpu_env",
                "dynamo_config", "fp16", "dynamo_backend"}
ACC_MODELLED_TOP = {"distributed_type", "mixed_precision", "num_processes", "num_machines", "deepspeed_config",
                    "fsdp_config", "parallelism_config", "dynamo_config", "fp16", "dynamo_backend"}
ACC_LAUNCH_FSDP_KEYS = {"fsdp_version", "fsdp_offload_params", "fsdp_min_num_params", "fsdp_sharding_strategy",
                        "fsdp_reshard_after_forward", "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap",
                        "fsdp_backward_prefetch", "fsdp_state_dict_type", "fsdp_forward_prefetch", "fsdp_use_orig_params",
                        "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states", "fsdp_activation_checkpointing",
                        "fsdp_activation_checkpointing_offload"}


# ---------------------------------------------------------------------------------------------
# Typed reads: a wrong type is a PlanError naming the key, never a TypeError from deep inside.

def _int(key: str, v: Any, *, auto: bool = False) -> Any:
    if auto and v == "auto":
        return "auto"
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise bad_input(key, f"{key}={v!r} must be a whole number. Fix it in the file.")
    try:
        f = float(v)
        if f != int(f):
            raise ValueError
        return int(f)
    except (ValueError, OverflowError):
        raise bad_input(key, f"{key}={v!r} must be a whole number{' or auto' if auto else ''}. Fix it in the file.") from None


def _float(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise bad_input(key, f"{key}={v!r} must be a number. Fix it in the file.")
    try:
        return float(v)
    except ValueError:
        raise bad_input(key, f"{key}={v!r} must be a number. Fix it in the file.") from None


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no"):
        return v.strip().lower() in ("true", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise bad_input(key, f"{key}={v!r} must be true or false. Fix it in the file.")


def _choice(key: str, v: Any, choices: dict[str, Any]) -> Any:
    if isinstance(v, str) and v.strip().lower() in {c.lower(): c for c in choices}:
        return {c.lower(): val for c, val in choices.items()}[v.strip().lower()]
    raise bad_input(key, f"{key}={v!r} is not one of {', '.join(choices)}. Use one of those.")


def _mapping(key: str, v: Any) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_input(key, f"{key} must be a mapping of keys (a nested block), got {type(v).__name__}. Fix its structure.")
    return v


# ---------------------------------------------------------------------------------------------
# Reading the file


def _read(source: str | Path) -> tuple[str, str, Path]:
    """(text, name, folder that relative paths in it refer to)."""
    s = str(source)
    if isinstance(source, Path) or ("\n" not in s and not s.lstrip().startswith("{") and (s.endswith((".json", ".yaml", ".yml")) or names_file(s))):
        return read_text(s), s, Path(s).resolve().parent
    return s, "<text>", Path.cwd()


def _parse(text: str, name: str) -> Any:
    """JSON (as DeepSpeed reads it: hjson, so comments are tolerated) or YAML -> plain data."""
    if text.lstrip().startswith("{") or name.endswith(".json"):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass
        try:
            import hjson

            return _plain(hjson.loads(text))
        except Exception:  # noqa: BLE001 - any hjson failure falls through to the precise YAML/JSON error
            pass
    return parse_text(text, name)


def _plain(data: Any) -> Any:
    """hjson's OrderedDicts -> dicts (so type checks see plain mappings)."""
    if isinstance(data, dict):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    return data


def import_config(source: str | Path) -> tuple[Plan, list[str]]:
    """A DeepSpeed JSON or accelerate YAML (path or text) -> (Plan, notes on what did not carry over)."""
    text, name, folder = _read(source)
    data = _parse(text, name)
    if not isinstance(data, dict) or not data:
        raise bad_input(name, f"{name} is not a DeepSpeed JSON object or an accelerate YAML mapping (got {type(data).__name__}). Give a config file.")
    data = {str(k): v for k, v in data.items()}
    if "framework" in data or "sharding" in data:
        raise bad_input(name, f"{name} looks like a shardlab plan (it has framework/sharding), not a DeepSpeed or accelerate config. "
                        "Use it directly: shardlab validate / export / translate.")
    if "distributed_type" in data or "compute_environment" in data or "fsdp_config" in data:
        fields, notes = _from_accelerate(data, folder)
    else:
        fields, notes = _from_deepspeed(data)
    return plan_from_dict(fields), notes


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON


def _leaf_note(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value, default=str)} is not modelled by shardlab (not carried into the plan; DeepSpeed's default applies on export)."


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


# ---------------------------------------------------------------------------------------------
# accelerate YAML


def _from_accelerate(d: dict, folder: Path) -> tuple[dict, list[str]]:
    unknown = sorted(set(d) - ACC_TOP_KEYS)
    if unknown:
        raise bad_input(unknown[0], f"{', '.join(unknown)}: not an accelerate config key (accelerate's loader refuses the file). Remove it, or check the spelling.")
    notes: list[str] = []
    fields: dict[str, Any] = {}
    kind = d.get("distributed_type")
    if not isinstance(kind, str):
        raise bad_input("distributed_type", f"distributed_type={kind!r}: accelerate needs it (FSDP, DEEPSPEED, MULTI_GPU, ...). Add it to the file.")
    fsdp = _mapping("fsdp_config", d.get("fsdp_config"))
    par = _mapping("parallelism_config", d.get("parallelism_config"))
    kind = kind.upper()
    if kind == "FSDP":
        version = _int("fsdp_config.fsdp_version", fsdp.get("fsdp_version", 1))
        if version not in (1, 2):
            raise bad_input("fsdp_config.fsdp_version", f"fsdp_config.fsdp_version={version} is not an FSDP version. Use 1 or 2.")
        fields["framework"] = f"fsdp{version}"
    elif kind == "DEEPSPEED":
        fields["framework"] = "deepspeed"
    elif kind in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU"):
        fields.update(framework="fsdp2", sharding="ddp")
        notes.append(f"distributed_type={kind} is plain data parallelism; the plan models it as sharding ddp with fsdp2 (nothing sharded).")
    else:
        raise bad_input("distributed_type", f"distributed_type={kind} is not something shardlab models (it models FSDP, DEEPSPEED and plain data parallel). Use one of those.")

    mp = d.get("mixed_precision")
    if mp is None and d.get("fp16") is True:
        mp = "fp16"
    if mp is not None:
        prec = _choice("mixed_precision", mp, {"no": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "bf16"})
        if str(mp).lower() == "fp8":
            notes.append("mixed_precision=fp8 is not modelled; the plan uses bf16 (fp8 runs its matmuls in fp8 on top of bf16).")
        fields["precision"] = prec
    nodes = _int("num_machines", d.get("num_machines", 1))
    procs = _int("num_processes", d.get("num_processes", -1))
    if procs < 1 or nodes < 1:
        notes.append(f"num_processes={procs} / num_machines={nodes} leave the GPU count to the launcher; the plan uses 1 node x 1 GPU.")
    elif procs % nodes:
        raise bad_input("num_processes", f"num_processes={procs} is not a multiple of num_machines={nodes}; accelerate counts all processes of all machines. Use a multiple of {nodes}.")
    else:
        fields["topology"] = {"nodes": nodes, "gpus_per_node": procs // nodes}
    dyn = _mapping("dynamo_config", d.get("dynamo_config"))
    backend = dyn.get("dynamo_backend", d.get("dynamo_backend"))
    if backend is not None and str(backend).upper() != "NO":
        fields["compile"] = True
        if str(backend).upper() != K.ACC_DYNAMO_BACKEND:
            notes.append(f"dynamo_backend={backend}: the plan says compile=true (shardlab exports the inductor backend).")
    notes += [f"dynamo_config.{k}={v!r} is not modelled by shardlab." for k, v in dyn.items() if k != "dynamo_backend"]
    launch = {k: d[k] for k in d if k not in ACC_MODELLED_TOP and k in d and K.ACC_FIXED_TOP.get(k, _MISSING) != d[k]}
    fixed = [k for k in d if k not in ACC_MODELLED_TOP and k not in launch]
    if fixed:
        notes.append(f"launch settings at their usual values, not part of the plan: {', '.join(sorted(fixed))}.")
    if launch:
        notes.append("launch settings not modelled by shardlab (not carried into the plan): "
                     + ", ".join(f"{k}={v!r}" for k, v in sorted(launch.items())) + ".")
    if fields["framework"] in ("fsdp1", "fsdp2") and kind == "FSDP":
        _fsdp_from_acc(fsdp, par, fields, notes)
    elif fsdp:
        notes.append(f"fsdp_config is ignored with distributed_type={kind} (accelerate ignores it too).")
    if fields["framework"] == "deepspeed":
        _ds_from_acc(_mapping("deepspeed_config", d.get("deepspeed_config")), folder, fields, notes)
    for k in ("megatron_lm_config", "mpirun_config", "fp8_config"):
        if d.get(k):
            notes.append(f"{k} is not modelled by shardlab (not carried into the plan).")
    return fields, notes


def _fsdp_from_acc(c: dict, par: dict, fields: dict, notes: list[str]) -> None:
    v2 = fields["framework"] == "fsdp2"
    for k in K.ACC_FSDP_KEYS + K.ACC_FSDP1_ONLY_KEYS:
        if k.key in c:
            K.set_dotted(fields, k.field, _bool(f"fsdp_config.{k.key}", c[k.key]))
    strategy = c.get("fsdp_reshard_after_forward", c.get("fsdp_sharding_strategy", True if v2 else "FULL_SHARD"))
    key = "fsdp_config.fsdp_reshard_after_forward" if "fsdp_reshard_after_forward" in c else "fsdp_config.fsdp_sharding_strategy"
    if isinstance(strategy, int) and not isinstance(strategy, bool) and 1 <= strategy <= 5:
        strategy = K.FSDP1_STRATEGY_NUMBERS[strategy - 1]
    names = {v: k for k, v in K.FSDP1_STRATEGY.items()} | {"HYBRID_SHARD_ZERO2": "hybrid"}
    if isinstance(strategy, str) and strategy.upper() in names:
        sharding = names[strategy.upper()]
        if strategy.upper() == "HYBRID_SHARD_ZERO2":
            notes.append("HYBRID_SHARD_ZERO2 (ZeRO-2 inside a node) is modelled as hybrid (ZeRO-3 inside a node).")
        if v2:  # accelerate maps FSDP1 names to FSDP2's boolean the same way
            sharding = "zero3" if K.FSDP2_RESHARD.get(sharding) else "zero2"
    else:
        sharding = "zero3" if _bool(key, strategy) else "zero2"
    rep = _int("parallelism_config_dp_replicate_size", par.get(K.ACC_PARALLELISM_PREFIX + "dp_replicate_size", 1))
    shard = _int("parallelism_config_dp_shard_size", par.get(K.ACC_PARALLELISM_PREFIX + "dp_shard_size", -1))
    if v2 and {K.ACC_PARALLELISM_PREFIX + "dp_replicate_size", K.ACC_PARALLELISM_PREFIX + "dp_shard_size"} & set(par):
        # A 2-D mesh: resharding after forward makes it HSDP (hybrid); without, one shard per group is plain ddp.
        if sharding == "zero3":
            sharding = "hybrid"
        elif shard == 1:
            sharding = "ddp"
        elif rep > 1:
            notes.append(f"a {rep} x {shard} mesh without resharding (ZeRO-2 inside a group) is modelled as zero2 over all GPUs.")
    other = {k: v for k, v in par.items() if k not in (K.ACC_PARALLELISM_PREFIX + "dp_replicate_size", K.ACC_PARALLELISM_PREFIX + "dp_shard_size")}
    off = sorted(k for k, v in other.items() if v in (1, None))
    if off:
        notes.append(f"{', '.join(f'parallelism_config.{k}' for k in off)} at 1 (off): data parallelism only, as the plan assumes.")
    notes += [f"parallelism_config.{k}={v!r} (tensor / context parallelism) is not modelled by shardlab." for k, v in other.items() if k not in off]
    if fields.get("sharding") != "ddp":
        fields["sharding"] = sharding
    if "fsdp_offload_params" in c and _bool("fsdp_config.fsdp_offload_params", c["fsdp_offload_params"]):
        fields["offload"] = {"optimizer": "cpu", "params": "cpu"}
    if "fsdp_auto_wrap_policy" in c and c["fsdp_auto_wrap_policy"] is not None:
        fields.setdefault("wrap", {})["policy"] = _choice("fsdp_config.fsdp_auto_wrap_policy", c["fsdp_auto_wrap_policy"], {v: k for k, v in K.ACC_WRAP_POLICY.items()})
    if c.get("fsdp_transformer_layer_cls_to_wrap") is not None:
        fields.setdefault("wrap", {})["transformer_layer_cls"] = str(c["fsdp_transformer_layer_cls_to_wrap"])
    elif fields.get("wrap", {}).get("policy", "transformer") == "transformer":
        notes.append("fsdp_transformer_layer_cls_to_wrap is not set: accelerate then wraps the model's _no_split_modules; the plan keeps wrap.transformer_layer_cls=Block.")
    if "fsdp_min_num_params" in c:
        fields.setdefault("wrap", {})["min_num_params"] = _int("fsdp_config.fsdp_min_num_params", c["fsdp_min_num_params"])
    if c.get("fsdp_backward_prefetch") is not None:
        fields["backward_prefetch"] = _choice("fsdp_config.fsdp_backward_prefetch", c["fsdp_backward_prefetch"], {v: k for k, v in K.ACC_BACKWARD_PREFETCH.items()})
    if c.get("fsdp_state_dict_type") is not None:
        sd = _choice("fsdp_config.fsdp_state_dict_type", c["fsdp_state_dict_type"], {**{v: k for k, v in K.ACC_STATE_DICT.items()}, "LOCAL_STATE_DICT": "sharded"})
        if str(c["fsdp_state_dict_type"]).upper() == "LOCAL_STATE_DICT":
            notes.append("fsdp_state_dict_type=LOCAL_STATE_DICT (flat local shards) is modelled as checkpoint=sharded.")
        fields["checkpoint"] = sd
    if "fsdp_use_orig_params" in c and not _bool("fsdp_config.fsdp_use_orig_params", c["fsdp_use_orig_params"]):
        notes.append("fsdp_use_orig_params=false is not modelled; shardlab's exports use true (needed by torch.compile and parameter groups).")
    done = {k.key for k in K.ACC_FSDP_KEYS + K.ACC_FSDP1_ONLY_KEYS} | set(K.ACC_FSDP_COMPOSITE_KEYS)
    for k, v in c.items():
        if k in done:
            continue
        why = "is not modelled by shardlab" if k in ACC_LAUNCH_FSDP_KEYS else "is not an `accelerate launch` option, so accelerate ignores it"
        notes.append(f"fsdp_config.{k}={v!r} {why} (not carried into the plan).")


def _ds_from_acc(c: dict, folder: Path, fields: dict, notes: list[str]) -> None:
    ref = c.get("deepspeed_config_file")
    if ref:
        path = Path(str(ref)) if Path(str(ref)).is_absolute() else folder / str(ref)
        if path.is_file():
            ds_fields, ds_notes = _from_deepspeed(_mapping(str(ref), _parse(read_text(path), str(path))), f"{ref}: ")
            ds_notes = [n for n in ds_notes if "does not name the GPUs" not in n or "topology" not in fields]
            topology = fields.get("topology")
            fields.update(ds_fields)
            if topology:
                fields["topology"] = topology
            notes += ds_notes
        else:
            notes.append(f"deepspeed_config_file={ref} was not found next to the config; its settings are not in the plan. Import it on its own, or put it beside this file.")
    if "zero_stage" in c:
        stage = _int("deepspeed_config.zero_stage", c["zero_stage"])
        if stage not in K.STAGE_SHARDING:
            raise bad_input("deepspeed_config.zero_stage", f"deepspeed_config.zero_stage={stage} is not a ZeRO stage. Use 0, 1, 2 or 3.")
        fields["sharding"] = K.STAGE_SHARDING[stage]
    elif not ref:
        fields["sharding"] = "zero2"  # accelerate's default stage
        notes.append("deepspeed_config.zero_stage is not set; accelerate then uses ZeRO-2, and so does the plan.")
    for what, key in (("optimizer", "offload_optimizer_device"), ("params", "offload_param_device")):
        if c.get(key) is not None:
            fields.setdefault("offload", {})[what] = _choice(f"deepspeed_config.{key}", c[key], {"none": "none", "cpu": "cpu", "nvme": "nvme"})
    for key in ("offload_optimizer_nvme_path", "offload_param_nvme_path"):
        if c.get(key) not in (None, "none"):
            fields.setdefault("offload", {}).setdefault("nvme_path", str(c[key]))
    if c.get("gradient_accumulation_steps") not in (None, "auto"):
        fields["grad_accum_steps"] = _int("deepspeed_config.gradient_accumulation_steps", c["gradient_accumulation_steps"])
    if c.get("gradient_clipping") not in (None, "auto"):
        clip = _float("deepspeed_config.gradient_clipping", c["gradient_clipping"])
        fields["gradient_clipping"] = clip if clip > 0 else None
    if "zero3_init_flag" in c:
        fields["low_memory_init"] = _bool("deepspeed_config.zero3_init_flag", c["zero3_init_flag"])
    if "zero3_save_16bit_model" in c and _bool("deepspeed_config.zero3_save_16bit_model", c["zero3_save_16bit_model"]):
        fields["checkpoint"] = "full_16bit"
    for k, v in c.items():
        if k not in K.ACC_DS_COMPOSITE_KEYS and k not in {x.key for x in K.ACC_DS_KEYS}:
            notes.append(f"deepspeed_config.{k}={v!r} is a launch setting shardlab does not model (not carried into the plan).")


# ---------------------------------------------------------------------------------------------
# translate


def translate(plan: Plan, to: str) -> tuple[Plan, list[str]]:
    """The same setup in framework `to` (fsdp1 | fsdp2 | deepspeed), adjusted until it validates,
    with a note for every behaviour that does not carry over."""
    if to not in ("fsdp1", "fsdp2", "deepspeed"):
        raise bad_input("--to", f"--to {to!r} is not a framework. Use fsdp1, fsdp2 or deepspeed.")
    src, d, notes = plan.framework, plan.to_dict(), []
    d["framework"] = to
    if src == to:
        return plan_from_dict(d), [f"the plan already uses {to}; nothing to translate."]
    cross = (src == "deepspeed") != (to == "deepspeed")
    default = Plan()
    if to == "deepspeed":
        _to_deepspeed(d, notes, default)
    else:
        _to_fsdp(plan, d, notes, default, to)
    if cross and plan.precision != "fp32":
        notes.append("precision: DeepSpeed keeps fp32 master weights and fp32 optimizer states beside the "
                     f"{plan.precision} weights; FSDP's mixed precision keeps the (sharded) parameters and optimizer states "
                     "in the dtype the model was loaded in, so load the model in fp32 to get the same numerics and memory.")
    if cross:
        notes.append("checkpoints: DeepSpeed writes its own per-rank ZeRO checkpoint (zero_to_fp32.py gathers it); FSDP writes "
                     "torch.distributed.checkpoint shards or a full state dict. Existing checkpoints do not load across.")
    if cross and plan.gradient_clipping is not None:
        notes.append("gradient_clipping: DeepSpeed clips inside engine.step(); with FSDP the training loop calls clip_grad_norm_ itself.")
    try:
        return plan_from_dict(d), notes
    except PlanError as e:  # what is left is the input's own problem, not the translation's
        raise PlanError(e.findings) from None


def _to_deepspeed(d: dict, notes: list[str], default: Plan) -> None:
    if d["sharding"] == "hybrid":
        notes.append("sharding=hybrid becomes ZeRO-3 with hpZ (zero_hpz_partition_size = GPUs per node): DeepSpeed still shards "
                     "gradients and optimizer states over all GPUs and keeps only a secondary weight copy per node, where "
                     "HYBRID_SHARD replicates everything across nodes. Memory per GPU is lower, inter-node traffic higher.")
    if d["offload"]["params"] == "cpu":
        notes.append("offload: FSDP's CPUOffload becomes ZeRO-Offload of parameters and optimizer; DeepSpeed runs the optimizer "
                     "step on the CPU (DeepSpeedCPUAdam), where FSDP steps the CPU shards with the torch optimizer.")
    fsdp_only = {"forward_prefetch": "ZeRO-3 prefetches by buckets.prefetch_bucket_size instead",
                 "backward_prefetch": "DeepSpeed has no such knob", "limit_all_gathers": "DeepSpeed bounds gathers by stage3_max_live_parameters",
                 "sync_module_states": "DeepSpeed broadcasts the initial weights itself", "buffer_dtype": "DeepSpeed casts the whole module"}
    for name, why in fsdp_only.items():
        if d[name] != getattr(default, name):
            notes.append(f"{name}={d[name]} is an FSDP knob that does not carry over ({why}); reset to {getattr(default, name)}.")
            d[name] = getattr(default, name)
    if d["wrap"] != default.wrap.model_dump():
        notes.append("wrap: DeepSpeed partitions each parameter on its own and has no wrap units; wrap reset to its default.")
        d["wrap"] = default.wrap.model_dump()
    if d["low_memory_init"]:
        notes.append("low_memory_init: FSDP's meta-device / rank-0 loading becomes DeepSpeed's zero.Init (ZeRO-3) construction.")
    notes.append("bucket sizes: DeepSpeed communicates in buckets (reduce_bucket_size, prefetch_bucket_size) where FSDP "
                 "communicates one wrap unit at a time; the plan leaves them on auto.")


def _to_fsdp(plan: Plan, d: dict, notes: list[str], default: Plan, to: str) -> None:
    src = plan.framework
    if d["sharding"] == "zero1":
        d["sharding"] = "zero2"
        notes.append("sharding=zero1 has no FSDP equivalent (FSDP shards gradients with the optimizer states); using zero2 (SHARD_GRAD_OP).")
    zp = d["zeropp"]
    if zp["hpz_partition_size"] > 1:
        if d["sharding"] == "zero3" and plan.topology.nodes > 1 and zp["hpz_partition_size"] == plan.topology.gpus_per_node:
            d["sharding"] = "hybrid"
            notes.append("ZeRO++ hpZ over one node becomes sharding=hybrid (HYBRID_SHARD): FSDP replicates gradients and optimizer "
                         "states across nodes too, so each GPU holds more than with hpZ, and gradients are all-reduced across nodes.")
        else:
            notes.append(f"zeropp.hpz_partition_size={zp['hpz_partition_size']} (a secondary weight shard inside a node) has no FSDP equivalent; dropped.")
        zp["hpz_partition_size"] = 1
    for q in ("quantized_weights", "quantized_gradients"):
        if zp[q]:
            zp[q] = False
            notes.append(f"zeropp.{q} (ZeRO++ int8/int4 communication) has no FSDP equivalent; dropped, so {to} sends full-precision bytes.")
    off = d["offload"]
    if "nvme" in (off["optimizer"], off["params"]):
        notes.append("NVMe offload (ZeRO-Infinity) has no FSDP equivalent; FSDP can offload to CPU only.")
    wants = off["optimizer"] != "none" or off["params"] != "none"
    if wants and d["sharding"] in ("zero3", "hybrid"):
        if off["optimizer"] != off["params"] or "nvme" in (off["optimizer"], off["params"]):
            notes.append("offload: FSDP offloads all or nothing (CPUOffload moves parameters, gradients and the optimizer step "
                         f"together); optimizer={off['optimizer']}, params={off['params']} becomes both on cpu.")
        off.update(optimizer="cpu", params="cpu", nvme_path=None)
    elif wants:
        notes.append(f"offload: FSDP offloads all or nothing and only with parameters sharded (zero3); with sharding={d['sharding']} "
                     "the optimizer stays on the GPU, so GPU memory rises. Use sharding zero3 to offload everything to CPU.")
        off.update(optimizer="none", params="none", nvme_path=None)
    elif off["nvme_path"]:
        off["nvme_path"] = None
    if d["checkpoint"] == "full_16bit":
        d["checkpoint"] = "full"
        notes.append("checkpoint=full_16bit (DeepSpeed's gathered 16-bit save) becomes checkpoint=full (one full state dict).")
    if any(v != "auto" for v in d["buckets"].values()):
        notes.append("bucket sizes are DeepSpeed knobs; FSDP communicates one wrap unit at a time (set by wrap). Reset to auto.")
    d["buckets"] = default.buckets.model_dump()
    if src == "deepspeed":
        notes.append("prefetch: ZeRO-3 prefetches by bucket size (stage3_prefetch_bucket_size); FSDP prefetches the next wrap unit "
                     f"({'backward_prefetch, forward_prefetch' if to == 'fsdp1' else 'one unit ahead in backward; forward_prefetch explicit'}).")
        notes.append(f"wrap: DeepSpeed partitions parameters individually; {to} shards by wrap unit, here wrap.policy={d['wrap']['policy']} "
                     f"({d['wrap']['transformer_layer_cls']}). Check it names your model's block class.")
        if d["low_memory_init"]:
            d["sync_module_states"] = True
            notes.append("low_memory_init: zero.Init becomes FSDP's meta-device construction with rank 0 broadcasting the weights (sync_module_states).")
    if d["precision"] == "fp16" and d["loss_scaling"] == "none" and to == "fsdp2":
        d["loss_scaling"] = "dynamic"
        notes.append("fp16 with FSDP2 needs a gradient scaler; loss_scaling set to dynamic (torch.amp.GradScaler).")
    if d["precision"] == "fp16" and to == "fsdp1":
        notes.append("fp16 with FSDP1 scales the loss with ShardedGradScaler in the training loop (DeepSpeed scales inside the engine).")
    if to == "fsdp2":
        if d["backward_prefetch"] != default.backward_prefetch:
            notes.append(f"backward_prefetch={d['backward_prefetch']} is FSDP1-only; FSDP2 always prefetches one unit ahead in backward. Reset.")
            d["backward_prefetch"] = default.backward_prefetch
        if src == "fsdp1" and not d["limit_all_gathers"]:
            notes.append("limit_all_gathers=false has no FSDP2 counterpart (FSDP2 frees memory without a rate limiter).")
        if d["buffer_dtype"] != "auto":
            notes.append(f"buffer_dtype={d['buffer_dtype']} has no FSDP2 counterpart (MixedPrecisionPolicy leaves buffers alone); reset to auto.")
            d["buffer_dtype"] = "auto"
        if d["sharding"] in ("hybrid", "ddp"):
            notes.append(f"sharding={d['sharding']} is expressed in FSDP2 by a 2-D device mesh (replicate x shard) with reshard_after_forward.")
