"""accelerate YAML -> Plan fields (FSDP and DeepSpeed plugins), with a note for every key that does not
map to one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardlab.export import keys as K
from shardlab.plan import bad_input, read_text
from shardlab.safe_input import label, short

from .common import _MISSING, _bool, _choice, _float, _int, _mapping, parse_data
from .deepspeed import _from_deepspeed

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


def _from_accelerate(d: dict, folder: Path | None, docs: dict | None = None) -> tuple[dict, list[str]]:
    """Plan fields from an accelerate config. `folder` is where deepspeed_config_file is looked for
    (None: not followed); the DeepSpeed file read goes into `docs['deepspeed']`."""
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
    fields["framework"] = _framework(kind, fsdp, notes)
    if kind not in ("FSDP", "DEEPSPEED"):
        fields["sharding"] = "ddp"

    _precision(d, fields, notes)
    _topology_and_compile(d, fields, notes)
    if fields["framework"] in ("fsdp1", "fsdp2") and kind == "FSDP":
        _fsdp_from_acc(fsdp, par, fields, notes)
    elif fsdp:
        notes.append(f"fsdp_config is ignored with distributed_type={kind} (accelerate ignores it too).")
    if fields["framework"] == "deepspeed":
        _ds_from_acc(_mapping("deepspeed_config", d.get("deepspeed_config")), folder, fields, notes, docs)
    for k in ("megatron_lm_config", "mpirun_config", "fp8_config"):
        if d.get(k):
            notes.append(f"{k} is not modelled by shardlab (carried through unchanged).")
    return fields, notes


def _framework(kind: str, fsdp: dict, notes: list[str]) -> str:
    """The plan's framework for accelerate's distributed_type (upper case); plain data parallel is fsdp2 ddp."""
    if kind == "FSDP":
        version = _int("fsdp_config.fsdp_version", fsdp.get("fsdp_version", 1))
        if version not in (1, 2):
            raise bad_input("fsdp_config.fsdp_version", f"fsdp_config.fsdp_version={version} is not an FSDP version. Use 1 or 2.")
        return f"fsdp{version}"
    if kind == "DEEPSPEED":
        return "deepspeed"
    if kind in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU"):
        notes.append(f"distributed_type={kind} is plain data parallelism; the plan models it as sharding ddp with fsdp2 (nothing sharded).")
        return "fsdp2"
    raise bad_input("distributed_type", f"distributed_type={kind} is not something shardlab models (it models FSDP, DEEPSPEED and plain data parallel). Use one of those.")


def _precision(d: dict, fields: dict, notes: list[str]) -> None:
    """precision from mixed_precision (or the old `fp16: true`); left to a DeepSpeed file when it has one."""
    mp = d.get("mixed_precision")
    if mp is None and d.get("fp16") is True:
        mp = "fp16"
    ds_file = fields["framework"] == "deepspeed" and bool(_mapping("deepspeed_config", d.get("deepspeed_config")).get("deepspeed_config_file"))
    if mp is None and not ds_file:
        fields["precision"] = "fp32"  # accelerate's default mixed_precision is 'no'
    elif mp is not None:
        prec = _choice("mixed_precision", mp, {"no": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "bf16"})
        if str(mp).lower() == "fp8":
            notes.append("mixed_precision=fp8 is not modelled; the plan uses bf16 (fp8 runs its matmuls in fp8 on top of bf16).")
        fields["precision"] = prec


def _topology_and_compile(d: dict, fields: dict, notes: list[str]) -> None:
    """topology from num_machines / num_processes, compile from dynamo, and notes on launch-only settings."""
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
    notes += [f"dynamo_config.{k} is not modelled by shardlab." for k in dyn if k != "dynamo_backend"]
    launch = {k: d[k] for k in d if k not in ACC_MODELLED_TOP and k in d and K.ACC_FIXED_TOP.get(k, _MISSING) != d[k]}
    fixed = [k for k in d if k not in ACC_MODELLED_TOP and k not in launch]
    if fixed:
        notes.append(f"launch settings at their usual values, not part of the plan: {', '.join(sorted(fixed))}.")
    if launch:
        notes.append("launch settings not modelled by shardlab (carried through unchanged): "
                     + ", ".join(sorted(launch)) + ".")


def _fsdp_sharding(c: dict, par: dict, v2: bool, notes: list[str]) -> str:
    """The plan's sharding from fsdp_sharding_strategy / fsdp_reshard_after_forward and, for FSDP2, the
    parallelism_config's data-parallel mesh."""
    strategy = c.get("fsdp_reshard_after_forward", c.get("fsdp_sharding_strategy", True if v2 else "FULL_SHARD"))
    key = "fsdp_config.fsdp_reshard_after_forward" if "fsdp_reshard_after_forward" in c else "fsdp_config.fsdp_sharding_strategy"
    if isinstance(strategy, str) and strategy.strip().isdigit():  # accelerate takes "2" as it takes 2
        strategy = int(strategy)
    if isinstance(strategy, int) and not isinstance(strategy, bool) and 1 <= strategy <= 5:
        strategy = K.FSDP1_STRATEGY_NUMBERS[strategy - 1]
    names = {v: k for k, v in K.FSDP1_STRATEGY.items()} | {"HYBRID_SHARD_ZERO2": "hybrid"}
    if isinstance(strategy, str) and strategy.upper() in names:
        sharding = names[strategy.upper()]
        if strategy.upper() == "HYBRID_SHARD_ZERO2":
            notes.append("HYBRID_SHARD_ZERO2 (ZeRO-2 inside a node) is modelled as hybrid (ZeRO-3 inside a node).")
        if v2:  # accelerate maps FSDP1 names to FSDP2's boolean the same way
            sharding = "zero3" if K.FSDP2_RESHARD.get(sharding) else "zero2"
    elif key.endswith("fsdp_sharding_strategy") and "fsdp_sharding_strategy" in c:
        # a strategy the file gives is never a true / false (that is fsdp_reshard_after_forward); FSDP2's default (no
        # key at all: reshard after forward, True) goes through the boolean below
        raise bad_input(key, f"{key}={short(strategy)} is not an FSDP sharding strategy. Use one of "
                        f"{', '.join(K.FSDP1_STRATEGY_NUMBERS)} (or their numbers 1-5).")
    else:
        sharding = "zero3" if _bool(key, strategy) else "zero2"
    rep = _int("parallelism_config_dp_replicate_size", par.get(K.ACC_PARALLELISM_PREFIX + "dp_replicate_size", 1))
    shard = _int("parallelism_config_dp_shard_size", par.get(K.ACC_PARALLELISM_PREFIX + "dp_shard_size", -1))
    if v2 and {K.ACC_PARALLELISM_PREFIX + "dp_replicate_size", K.ACC_PARALLELISM_PREFIX + "dp_shard_size"} & set(par):
        # A 2-D mesh: resharding after forward makes it HSDP (hybrid); without, one shard per group is plain ddp.
        # Only a shard dimension (e.g. beside tensor parallelism) is plain FSDP over that dimension.
        if sharding == "zero3" and K.ACC_PARALLELISM_PREFIX + "dp_replicate_size" in par:
            sharding = "hybrid"
        elif shard == 1:
            sharding = "ddp"
        elif rep > 1:
            notes.append(f"a {rep} x {shard} mesh without resharding (ZeRO-2 inside a group) is modelled as zero2 over all GPUs.")
    other = {k: v for k, v in par.items() if k not in (K.ACC_PARALLELISM_PREFIX + "dp_replicate_size", K.ACC_PARALLELISM_PREFIX + "dp_shard_size")}
    off = sorted(k for k, v in other.items() if v in (1, None))
    if off:
        notes.append(f"{', '.join(f'parallelism_config.{k}' for k in off)} at 1 (off): data parallelism only, as the plan assumes.")
    notes += [f"parallelism_config.{k} (tensor / context parallelism) is not modelled by shardlab." for k in other if k not in off]
    return sharding


def _fsdp_from_acc(c: dict, par: dict, fields: dict, notes: list[str]) -> None:
    v2 = fields["framework"] == "fsdp2"
    for k in K.ACC_FSDP_KEYS + (() if v2 else K.ACC_FSDP1_ONLY_KEYS):  # accelerate's FSDP2 ignores the FSDP1-only ones
        if k.key in c:
            K.set_dotted(fields, k.field, _bool(f"fsdp_config.{k.key}", c[k.key]))
    sharding = _fsdp_sharding(c, par, v2, notes)
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
    done = {k.key for k in K.ACC_FSDP_KEYS + (() if v2 else K.ACC_FSDP1_ONLY_KEYS)} | set(K.ACC_FSDP_COMPOSITE_KEYS)
    for k in c:
        if k in done:
            continue
        why = "is not modelled by shardlab" if k in ACC_LAUNCH_FSDP_KEYS else "is not an `accelerate launch` option, so accelerate ignores it"
        notes.append(f"fsdp_config.{k} {why} (carried through unchanged).")


def _inline_auto_from_acc(c: dict, fields: dict, notes: list[str]) -> None:
    """Accumulation and clipping of accelerate's inline DeepSpeed flags: left out, they are 'auto'."""
    auto = fields.setdefault("auto", [])
    if c.get("gradient_accumulation_steps") in (None, "auto"):
        auto.append("grad_accum_steps")
    else:
        fields["grad_accum_steps"] = _int("deepspeed_config.gradient_accumulation_steps", c["gradient_accumulation_steps"])
    clip = c.get("gradient_clipping")
    if clip in (None, "auto"):
        auto.append("gradient_clipping")
        fields["gradient_clipping"] = K.DS_DEFAULT_CLIPPING  # accelerate fills 'auto' with 1.0
    elif _float("deepspeed_config.gradient_clipping", clip) <= 0:
        fields["gradient_clipping"] = K.DS_DEFAULT_CLIPPING
        notes.append(f"deepspeed_config.gradient_clipping={label(str(clip))}: accelerate drops a zero and DeepSpeed then clips at 1.0, so the plan says 1.0. "
                     "To turn clipping off, use a deepspeed_config_file with gradient_clipping: 0.")
    else:
        fields["gradient_clipping"] = _float("deepspeed_config.gradient_clipping", clip)


def _ds_from_acc(c: dict, folder: Path | None, fields: dict, notes: list[str], docs: dict | None) -> None:
    ref = c.get("deepspeed_config_file")
    if ref and folder is None:
        # text that came from no folder (an upload to the app, or a file compared by meaning): a reference in it is not followed
        notes.append(f"deepspeed_config_file={label(str(ref))} was not followed (this config was given as text, not as a file on disk); its settings are not in the plan. Import that DeepSpeed JSON on its own.")
    elif ref:
        path = Path(str(ref)) if Path(str(ref)).is_absolute() else folder / str(ref)
        if path.is_file():
            ds_doc = _mapping(str(ref), parse_data(read_text(path), str(path)))
            if docs is not None:
                docs["deepspeed"] = ds_doc
            ds_fields, ds_notes = _from_deepspeed(ds_doc, f"{ref}: ")
            ds_notes = [n for n in ds_notes if "does not name the GPUs" not in n or "topology" not in fields]
            topology = fields.get("topology")
            fields.update(ds_fields)
            if topology:
                fields["topology"] = topology
            notes += ds_notes
        else:
            notes.append(f"deepspeed_config_file={label(str(ref))} was not found next to the config; its settings are not in the plan. Import it on its own, or put it beside this file.")
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
    if not ref:
        _inline_auto_from_acc(c, fields, notes)
    if "zero3_init_flag" in c:
        fields["low_memory_init"] = _bool("deepspeed_config.zero3_init_flag", c["zero3_init_flag"])
    if "zero3_save_16bit_model" in c and _bool("deepspeed_config.zero3_save_16bit_model", c["zero3_save_16bit_model"]):
        fields["checkpoint"] = "full_16bit"
    for k in c:
        if k not in K.ACC_DS_COMPOSITE_KEYS and k not in {x.key for x in K.ACC_DS_KEYS}:
            notes.append(f"deepspeed_config.{k} is a launch setting shardlab does not model (carried through unchanged).")


# ---------------------------------------------------------------------------------------------
