"""FSDP1 (`FullyShardedDataParallel`): what it runs, its settings from a Plan, how the runner applies
them, and the script `shardlab export --to fsdp-code` writes from the same settings.

`settings(plan)` resolves every Plan field FSDP1 uses once; `apply()` (the runner) and `render()`
(the template templates/train_fsdp.py) both read only those settings, so what is exported is what
runs. Size-based wrapping is torch's own `size_based_auto_wrap_policy`; frameworks/units.py mirrors
it for FSDP2 and the estimate. use_orig_params is always on: torch.compile needs it, accelerate's
export writes it, and it keeps parameter names for optimizer groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from shardlab.export.keys import FSDP1_STRATEGY
from shardlab.frameworks import base
from shardlab.plan import Plan, bad_input

NAME = "fsdp1"
USE_ORIG_PARAMS = True  # for every plan (see the module docstring)
BACKWARD_PREFETCH = {"backward_pre": "BACKWARD_PRE", "backward_post": "BACKWARD_POST", "none": None}


@dataclass(frozen=True)
class Settings:
    """Everything FSDP1 takes from a Plan; each field is one constant of the exported script."""

    framework: str
    block_class_names: tuple[str, ...]
    micro_batch: int
    grad_accum: int
    sharding_strategy: str  # ShardingStrategy member name
    mesh: str  # 'hybrid': a 2-D (replicate, shard) device mesh; 'shard': FSDP's own process group
    wrap_policy: str  # transformer | size | none
    min_num_params: int
    param_dtype: str | None  # torch dtype names; None: no MixedPrecision (fp32)
    reduce_dtype: str | None
    buffer_dtype: str | None
    offload_params: bool
    backward_prefetch: str | None  # BackwardPrefetch member name
    forward_prefetch: bool
    limit_all_gathers: bool
    sync_module_states: bool
    use_orig_params: bool
    activation_checkpointing: bool
    compile: bool
    low_memory_init: bool
    optimizer: str
    optimizer_kwargs: dict[str, Any]
    grad_clip: float | None
    grad_scaler: bool  # ShardedGradScaler (fp16 with dynamic loss scaling)
    full_checkpoint: bool


def settings(plan: Plan) -> Settings:
    mixed = plan.precision != "fp32"
    opt = base.optimizer_settings(plan)
    return Settings(
        framework=NAME, block_class_names=base.block_names(plan), micro_batch=plan.micro_batch_size,
        grad_accum=plan.grad_accum_steps, sharding_strategy=FSDP1_STRATEGY[plan.sharding],
        mesh="hybrid" if plan.sharding == "hybrid" else "shard", wrap_policy=plan.wrap.policy,
        min_num_params=plan.wrap.min_num_params,
        param_dtype=base.DTYPE_NAMES[plan.precision] if mixed else None,
        reduce_dtype=base.dtype_name(plan.reduce_dtype, plan.precision) if mixed else None,
        buffer_dtype=base.dtype_name(plan.buffer_dtype, plan.precision) if mixed else None,
        offload_params=plan.offload.params == "cpu", backward_prefetch=BACKWARD_PREFETCH[plan.backward_prefetch],
        forward_prefetch=plan.forward_prefetch, limit_all_gathers=plan.limit_all_gathers,
        sync_module_states=plan.sync_module_states, use_orig_params=USE_ORIG_PARAMS,
        activation_checkpointing=plan.activation_checkpointing, compile=plan.compile, low_memory_init=plan.low_memory_init,
        optimizer=opt.cls, optimizer_kwargs=opt.kwargs, grad_clip=plan.gradient_clipping,
        grad_scaler=plan.precision == "fp16" and plan.loss_scaling == "dynamic", full_checkpoint=plan.checkpoint != "sharded")


def check(plan: Plan, device: str) -> None:
    """Refuse, with a PlanError, valid FSDP1 plans this device cannot run (found by trying them)."""
    base.check_device(plan, device)
    if device != "cpu":
        return
    if plan.low_memory_init:
        raise bad_input("low_memory_init", "low_memory_init=true with framework=fsdp1 needs a GPU (FSDP1 broadcasts rank 0's weights with "
                        "sync_module_states, which works on GPU tensors only). Use framework: fsdp2 for a CPU run, set low_memory_init: false, or run on cuda.")
    if plan.offload.params == "cpu":
        raise bad_input("offload.params", "offload.params=cpu with framework=fsdp1 needs a GPU (FSDP1's CPUOffload copies parameters between "
                        "the GPU and the CPU); on a CPU run they already live in CPU RAM. Set offload to none for CPU runs, use framework: fsdp2, or run on cuda.")


def _wrap_policy(s: Settings, classes: tuple[type, ...]):
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    if s.wrap_policy == "transformer":
        return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set(classes))
    if s.wrap_policy == "size":
        return functools.partial(size_based_auto_wrap_policy, min_num_params=s.min_num_params)
    return None


def fsdp_kwargs(s: Settings, model, device: str, classes: tuple[type, ...]) -> dict[str, Any]:
    """FullyShardedDataParallel's keyword arguments for `settings` on `device`."""
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy

    mixed = None
    if s.param_dtype is not None:
        mixed = MixedPrecision(param_dtype=base.torch_dtype(s.param_dtype), reduce_dtype=base.torch_dtype(s.reduce_dtype),
                               buffer_dtype=base.torch_dtype(s.buffer_dtype))
    # an explicit CPU device_id is what lets FSDP1 run on a machine without accelerators
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    kw: dict[str, Any] = dict(
        sharding_strategy=ShardingStrategy[s.sharding_strategy], auto_wrap_policy=_wrap_policy(s, classes),
        mixed_precision=mixed, cpu_offload=CPUOffload(offload_params=s.offload_params),
        backward_prefetch=None if s.backward_prefetch is None else BackwardPrefetch[s.backward_prefetch],
        forward_prefetch=s.forward_prefetch, limit_all_gathers=s.limit_all_gathers, use_orig_params=s.use_orig_params,
        sync_module_states=s.sync_module_states and device == "cuda", device_id=dev)
    if s.mesh == "hybrid":
        world = dist.get_world_size()
        kw["device_mesh"] = base.make_mesh("hybrid", device, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if any(p.is_meta for p in model.parameters()):
        # low_memory_init: ranks > 0 hold a meta model; FSDP materialises each unit and broadcasts rank 0's weights
        kw["param_init_fn"] = lambda m: m.to_empty(device=dev, recurse=False)
    return kw


def apply(s: Settings, model, device: str, loss: Callable) -> base.Trainer:
    """Shard `model` (built on CPU or, on ranks > 0 with low_memory_init, on meta) and return its Trainer."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    needs_classes = s.wrap_policy == "transformer" or s.activation_checkpointing
    classes = base.block_classes(model, s.block_class_names) if needs_classes else ()
    base.set_activation_checkpointing(model, classes, s.activation_checkpointing)
    if s.sync_module_states and device == "cpu":
        base.broadcast_from_rank0(model)  # FSDP1's own sync insists on GPU tensors
    fsdp = FSDP(model, **fsdp_kwargs(s, model, device, classes))
    optimizer = base.build_optimizer(base.OptimizerSettings(s.optimizer, s.optimizer_kwargs), fsdp.parameters())
    scaler = None
    if s.grad_scaler:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=device)
    # a compiled module forwards clip_grad_norm_ (and any attribute) to the FSDP module inside
    module = torch.compile(fsdp) if s.compile else fsdp
    return base.Trainer(NAME, module, optimizer, loss, s.grad_clip, scaler)


def render(plan: Plan) -> str:
    """The exported FSDP1 script for `plan`."""
    from shardlab.frameworks.render import render as fill
    from shardlab.frameworks.render import script_doc

    return fill(settings(plan), script_doc(plan, "FSDP1", FSDP1_STRATEGY[plan.sharding]))


def translate_from(plan: Plan, d: dict, notes: list[str]) -> None:
    """`shardlab translate --to fsdp1`: adjust `d` (the plan as a dict, framework already set) to what
    FSDP1 can express, with a note for each behaviour that changes."""
    base.fsdp_translate_from(plan, d, notes, NAME)
    if d["precision"] == "fp16":
        notes.append("fp16 with FSDP1 scales the loss with ShardedGradScaler in the training loop (DeepSpeed scales inside the engine).")
