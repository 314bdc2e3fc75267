"""FSDP2 (`fully_shard`): what it runs, its settings from a Plan, how the runner applies them, and
the script `shardlab export --to fsdp-code` writes from the same settings.

Sharding maps to `reshard_after_forward` and a device mesh: zero3 -> True on a 1-D mesh, zero2 ->
False, hybrid -> True on a 2-D (replicate = nodes, shard = ranks per node) mesh, ddp -> False on a
(ranks, 1) mesh, i.e. every rank a replica (what accelerate's parallelism_config says for ddp).
FSDP2 has no auto-wrap: `fully_shard` goes on each unit that frameworks/units.py chooses (the block
classes, or the size-based units FSDP1's policy would pick), children first, then on the root.
With compile, each unit (or the root when there are none) is compiled before sharding, as torchtitan does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from shardlab.export.keys import FSDP2_RESHARD
from shardlab.frameworks import base
from shardlab.plan import Plan

NAME = "fsdp2"
MESH = {"ddp": "replicate", "hybrid": "hybrid", "zero2": "shard", "zero3": "shard"}


@dataclass(frozen=True)
class Settings:
    """Everything FSDP2 takes from a Plan; each field is one constant of the exported script."""

    framework: str
    block_class_names: tuple[str, ...]
    micro_batch: int
    grad_accum: int
    mesh: str  # shard | hybrid | replicate (base.mesh_shape)
    reshard_after_forward: bool
    wrap_policy: str
    min_num_params: int
    param_dtype: str | None  # None: MixedPrecisionPolicy() keeps the parameters' dtype (fp32)
    reduce_dtype: str | None
    offload_params: bool  # CPUOffloadPolicy
    forward_prefetch: bool
    sync_module_states: bool
    activation_checkpointing: bool
    compile: bool
    low_memory_init: bool
    optimizer: str
    optimizer_kwargs: dict[str, Any]
    grad_clip: float | None
    grad_scaler: bool  # torch.amp.GradScaler (fp16 with dynamic loss scaling)
    full_checkpoint: bool


def settings(plan: Plan) -> Settings:
    mixed = plan.precision != "fp32"
    opt = base.optimizer_settings(plan)
    return Settings(
        framework=NAME, block_class_names=base.block_names(plan), micro_batch=plan.micro_batch_size,
        grad_accum=plan.grad_accum_steps, mesh=MESH[plan.sharding], reshard_after_forward=FSDP2_RESHARD[plan.sharding],
        wrap_policy=plan.wrap.policy, min_num_params=plan.wrap.min_num_params,
        param_dtype=base.DTYPE_NAMES[plan.precision] if mixed else None,
        reduce_dtype=base.dtype_name(plan.reduce_dtype, plan.precision) if mixed else None,
        offload_params=plan.offload.params == "cpu", forward_prefetch=plan.forward_prefetch,
        sync_module_states=plan.sync_module_states, activation_checkpointing=plan.activation_checkpointing,
        compile=plan.compile, low_memory_init=plan.low_memory_init, optimizer=opt.cls, optimizer_kwargs=opt.kwargs,
        grad_clip=plan.gradient_clipping, grad_scaler=plan.precision == "fp16" and plan.loss_scaling == "dynamic",
        full_checkpoint=plan.checkpoint != "sharded")


def check(plan: Plan, device: str) -> None:
    """Refuse, with a PlanError, valid FSDP2 plans this device cannot run."""
    base.check_device(plan, device)


def unit_modules(s: Settings, model) -> list:
    """The modules that get their own fully_shard, children before parents."""
    from shardlab.frameworks.units import module_tree, size_units

    if s.wrap_policy == "transformer":
        classes = base.block_classes(model, s.block_class_names)
        return [m for m in model.modules() if isinstance(m, classes)]
    if s.wrap_policy == "size":
        return [model.get_submodule(path) for path, _ in size_units(module_tree(model), s.min_num_params)]
    return []


def _prepare(s: Settings, model, device: str):
    """Before sharding: rank 0's full state (low_memory_init) or its weights broadcast; returns the state."""
    on_meta = any(p.is_meta for p in model.parameters())
    if s.low_memory_init:
        # rank 0 holds the real weights (on CPU), the others a meta model; after sharding each rank
        # takes its shard of rank 0's full state dict
        return on_meta, ({} if on_meta else model.state_dict())
    if device == "cuda":
        model.to(device)
    if s.sync_module_states:
        base.broadcast_from_rank0(model)  # FSDP2 has no sync_module_states flag
    return on_meta, None


def apply(s: Settings, model, device: str, loss: Callable) -> base.Trainer:
    """Shard `model` as the settings say and return its Trainer."""
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    units = unit_modules(s, model)  # first: a missing block class is refused before any collective
    on_meta, full_state = _prepare(s, model, device)
    if s.activation_checkpointing:
        base.set_activation_checkpointing(model, base.block_classes(model, s.block_class_names), True)
    if s.compile:
        for m in units or [model]:
            m.compile()
    mixed = MixedPrecisionPolicy(param_dtype=base.torch_dtype(s.param_dtype), reduce_dtype=base.torch_dtype(s.reduce_dtype))
    offload = CPUOffloadPolicy(pin_memory=device == "cuda") if s.offload_params else OffloadPolicy()
    world = dist.get_world_size()
    mesh = base.make_mesh(s.mesh, device, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    kw = dict(mesh=mesh, reshard_after_forward=s.reshard_after_forward, mp_policy=mixed, offload_policy=offload)
    for m in units:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    if full_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if on_meta:
            model.to_empty(device="cpu" if s.offload_params else device)
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for b in model.buffers():  # non-persistent buffers (a rotary inv_freq) are in no state dict
            dist.broadcast(b, src=0)
    if s.forward_prefetch:
        for a, b in zip(units, units[1:]):
            a.set_modules_to_forward_prefetch([b])
    optimizer = base.build_optimizer(base.OptimizerSettings(s.optimizer, s.optimizer_kwargs), model.parameters())
    scaler = torch.amp.GradScaler(device) if s.grad_scaler else None
    return base.Trainer(NAME, model, optimizer, loss, s.grad_clip, scaler)


def render(plan: Plan) -> str:
    """The exported FSDP2 script for `plan`."""
    from shardlab.frameworks.render import render as fill
    from shardlab.frameworks.render import script_doc

    return fill(settings(plan), script_doc(plan, "FSDP2", f"reshard_after_forward={FSDP2_RESHARD[plan.sharding]}, {MESH[plan.sharding]} mesh"))


def translate_from(plan: Plan, d: dict, notes: list[str]) -> None:
    """`shardlab translate --to fsdp2`: adjust `d` (the plan as a dict, framework already set) to what
    FSDP2 can express, with a note for each behaviour that changes."""
    base.fsdp_translate_from(plan, d, notes, NAME)
    default = Plan()
    if d["precision"] == "fp16" and d["loss_scaling"] == "none":
        d["loss_scaling"] = "dynamic"
        notes.append("fp16 with FSDP2 needs a gradient scaler; loss_scaling set to dynamic (torch.amp.GradScaler).")
    if d["backward_prefetch"] != default.backward_prefetch:
        notes.append(f"backward_prefetch={d['backward_prefetch']} is FSDP1-only; FSDP2 always prefetches one unit ahead in backward. Reset.")
        d["backward_prefetch"] = default.backward_prefetch
    if plan.framework == "fsdp1" and not d["limit_all_gathers"]:
        notes.append("limit_all_gathers=false has no FSDP2 counterpart (FSDP2 frees memory without a rate limiter).")
    if d["buffer_dtype"] != "auto":
        notes.append(f"buffer_dtype={d['buffer_dtype']} has no FSDP2 counterpart (MixedPrecisionPolicy leaves buffers alone); reset to auto.")
        d["buffer_dtype"] = "auto"
    if d["sharding"] in ("hybrid", "ddp"):
        notes.append(f"sharding={d['sharding']} is expressed in FSDP2 by a 2-D device mesh (replicate x shard) with reshard_after_forward.")
