"""DeepSpeed ZeRO: what it runs, its settings (the config dict) from a Plan, and how the runner applies them.

The config the runner hands to `deepspeed.initialize` is the one `shardlab export --to deepspeed`
writes (export/deepspeed.py builds it from the key table), plus only what a real run needs and the
file leaves to the training script: the micro batch and accumulation as numbers, no `train_batch_size`
(DeepSpeed derives it), torch's Adam on a CPU without offload (DeepSpeed's FusedAdam is a CUDA
kernel), and a quiet `steps_per_print`. `runtime_config` names each of these additions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from shardlab.frameworks import base
from shardlab.plan import Plan, bad_input

NAME = "deepspeed"


def settings(plan: Plan) -> dict[str, Any]:
    """The exported DeepSpeed config (the file's content), as a dict."""
    from shardlab.export.deepspeed import deepspeed_config

    return deepspeed_config(plan)


def runtime_config(exported: dict[str, Any], plan: Plan, device: str) -> dict[str, Any]:
    """The exported config as a run on `device` hands it to deepspeed.initialize."""
    cfg = _drop_auto(exported)
    cfg["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    cfg["gradient_accumulation_steps"] = plan.grad_accum_steps
    cfg.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    opt = cfg.get("optimizer") or {}
    offloaded = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if device == "cpu" and opt.get("type", "").lower() in ("adam", "adamw") and not offloaded:
        # DeepSpeed's FusedAdam is a CUDA kernel; on CPU the same update comes from torch's AdamW
        opt.setdefault("params", {})["torch_adam"] = True
    cfg.setdefault("steps_per_print", 1 << 30)  # keep DeepSpeed's own per-step log quiet
    return cfg


def ds_config(plan: Plan, device: str) -> dict:
    """The DeepSpeed config `shardlab export --to deepspeed --resolve` writes, plus what only a real run needs.

    Resolved: a setting the plan leaves to the training script ('auto') takes the value the plan
    assumes, and "no clipping" is an explicit 0 (DeepSpeed clips at 1.0 when the key is missing)."""
    from shardlab.export.deepspeed import deepspeed_config

    return runtime_config(deepspeed_config(plan, resolve=True), plan, device)


def _drop_auto(obj):
    """Keys an exported config leaves as 'auto' (for accelerate to fill) take DeepSpeed's defaults."""
    if isinstance(obj, dict):
        return {k: _drop_auto(v) for k, v in obj.items() if v != "auto"}
    return obj


def merge(base_cfg: dict, over: dict) -> dict:
    """`over` merged into a copy of `base_cfg`, nested dicts key by key."""
    out = dict(base_cfg)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check(plan: Plan, device: str) -> None:
    """Refuse, with a PlanError, valid DeepSpeed plans this device cannot run (found by trying them)."""
    base.check_device(plan, device)
    if device == "cpu" and plan.precision == "fp16":
        raise bad_input("precision", "precision=fp16 with framework=deepspeed does not run on a CPU (DeepSpeed's CPU accelerator has no "
                        "fp16 support). Use precision: bf16 or fp32 for CPU runs, or run on cuda.")


def apply(cfg: dict, model, device: str, loss: Callable, plan: Plan) -> base.Trainer:
    """deepspeed.initialize with `cfg` (ds_config, possibly with overrides) and return the Trainer."""
    import deepspeed

    if plan.activation_checkpointing:
        base.set_activation_checkpointing(model, base.block_classes(model, base.block_names(plan)), True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    if plan.compile or cfg.get("compile", {}).get("deepcompile"):
        engine.compile()  # DeepCompile too needs engine.compile() to turn on
    t = base.Trainer(NAME, engine, optimizer, loss, plan.gradient_clipping, engine=engine)
    t.extras["ds_config"] = cfg
    return t


def render(plan: Plan) -> str:
    """The exported DeepSpeed config file's text."""
    from shardlab.export.deepspeed import export_deepspeed

    return export_deepspeed(plan)


def load_ops(plan: Plan, device: str) -> None:
    """Load (building on first use) the JIT ops DeepSpeed will ask for during initialize, so their build
    time is its own named phase instead of a silent wait inside deepspeed.initialize. On a CPU: the shm
    comm op (every run) and CPU Adam (optimizer offload); on CUDA only CPU Adam (offload). A failure here
    is left for DeepSpeed to report in its own words when it tries the same build."""
    names = ["ShareMemCommBuilder"] if device == "cpu" else []
    if plan.offload.optimizer != "none":
        names.append("CPUAdamBuilder")
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        for name in names:
            builder = get_accelerator().create_op_builder(name)
            if builder is not None and builder.is_compatible():
                clear_stale_build_lock(Path(_get_build_directory(builder.name, False)))
                builder.load(verbose=False)
    except Exception:  # noqa: BLE001 (see docstring)
        pass


# torch builds a JIT op under a lock file (<TORCH_EXTENSIONS_DIR>/<op>/lock, cpp_extension's FileBaton) that only
# the building process removes; every other process waits for it to go. A run stopped while DeepSpeed built an op
# (cancelled, killed, a test run cut short) leaves it behind, and every later DeepSpeed run then waits in the "ops"
# phase until its timeout (seen 2026-12-02: a lock left at 11:42 held a CPU run 13 minutes). A lock is stale when
# it is older than STALE_LOCK_S and no process works in the build folder (torch runs ninja, and ninja the
# compilers, with that folder as their working directory): a real build keeps them there until it releases the lock.
STALE_LOCK_S = 120.0


def clear_stale_build_lock(build_dir: Path, now: float | None = None) -> bool:
    """Remove `build_dir`/lock if it is stale (see STALE_LOCK_S); True when it was removed."""
    import time

    import psutil

    lock = build_dir / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except OSError:
        return False
    if age < STALE_LOCK_S:
        return False
    here = str(build_dir.resolve())
    for proc in psutil.process_iter(["cwd"]):
        if proc.info.get("cwd") == here:
            return False
    lock.unlink(missing_ok=True)
    return True


def translate_from(plan: Plan, d: dict, notes: list[str]) -> None:
    """`shardlab translate --to deepspeed`: adjust `d` (the FSDP plan `plan` as a dict, framework
    already set) to what DeepSpeed can express, with a note for each behaviour that changes."""
    default = Plan()
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
