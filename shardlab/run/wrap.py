"""Wrap a model as the Plan says, with FSDP1, FSDP2 or DeepSpeed, and drive one training step.

`wrap(plan, model, device, loss)` returns a `Trainer`: its `forward`, `backward` and `step` hide how
each framework runs a step (loss scaling, accumulation, clipping, the optimizer), so the worker's
loop and its measurements are the same for all three. Everything here maps one Plan field to one
framework knob; where a framework has no such knob the Plan's validation has already refused it, and
`check_runnable` refuses what a valid plan still cannot do on this device (found by trying).
`low_memory_init`: ranks > 0 build a meta model (worker.py); FSDP1 materialises it with param_init_fn
+ sync_module_states (GPU only), FSDP2 loads rank 0's full state dict with broadcast_from_rank0.
DeepSpeed's zero.Init is not applied yet: with DeepSpeed every rank builds the full model.

- FSDP1: FullyShardedDataParallel (sharding strategy, MixedPrecision, CPUOffload, auto-wrap policy
  from plan.wrap, backward/forward prefetch, limit_all_gathers, sync_module_states; a 2-D mesh for
  HYBRID_SHARD), ShardedGradScaler for fp16.
- FSDP2: `fully_shard` on each Block then on the root (reshard_after_forward: True for zero3 and
  hybrid, False for zero2); ddp is FSDP2's own `replicate`; hybrid is a 2-D (replicate, shard) mesh;
  MixedPrecisionPolicy, CPUOffloadPolicy; torch.amp.GradScaler for fp16.
- DeepSpeed: `deepspeed.initialize` with the config shardlab exports for the plan (`ds_config`).
Activation checkpointing is torch.utils.checkpoint inside each Block (inside the FSDP unit).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from shardlab.plan import Plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BETAS, _EPS = (0.9, 0.999), 1e-8


def _dtype(name: str, precision: str) -> torch.dtype:
    return DTYPES[precision if name == "auto" else name]


def block_class(model: nn.Module, name: str) -> type:
    """The module class called `name` inside `model` (the transformer block to wrap)."""
    for m in model.modules():
        if type(m).__name__ == name:
            return type(m)
    from shardlab.plan import bad_input

    names = sorted({type(m).__name__ for m in model.modules()})
    raise bad_input("wrap.transformer_layer_cls", f"wrap.transformer_layer_cls={name!r} is not a module class in this model. Use one of {names}.")


def set_activation_checkpointing(model: nn.Module, block_cls: type, on: bool) -> None:
    """Recompute each block's forward in backward (non-reentrant torch.utils.checkpoint)."""
    if not on:
        return
    from torch.utils.checkpoint import checkpoint

    for m in model.modules():
        if isinstance(m, block_cls) and not getattr(m, "_shardlab_ckpt", False):
            inner = m.forward
            m.forward = functools.partial(checkpoint, inner, use_reentrant=False)
            m._shardlab_ckpt = True


def make_optimizer(plan: Plan, params) -> torch.optim.Optimizer:
    o = plan.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=_BETAS, eps=_EPS)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, betas=_BETAS, eps=_EPS)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=0.9)


@dataclass
class Trainer:
    """One framework's way of running a step. `module` is what the batch is fed to."""

    framework: str
    module: nn.Module
    optimizer: Any
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    clip: float | None = None
    scaler: Any = None
    engine: Any = None  # DeepSpeed engine
    extras: dict = field(default_factory=dict)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.module(x), y)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        if self.engine is not None:
            self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            return
        loss = loss / accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        """Clip, step the optimizer. Call once per optimizer step (DeepSpeed: after each micro-batch)."""
        if self.engine is not None:
            self.engine.step()
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip:
            if self.framework == "fsdp1":
                self.module.clip_grad_norm_(self.clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def zero_grad(self) -> None:
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        # DeepSpeed zeroes its gradients inside engine.step() at the accumulation boundary

    @property
    def zero_optimizer(self):
        return self.engine.optimizer if self.engine is not None else self.optimizer


def check_runnable(plan: Plan, device: str) -> None:
    """Refuse, with a PlanError, valid plans that this device cannot run (found by trying them)."""
    from shardlab.plan import bad_input

    if device != "cpu":
        return
    if plan.framework == "deepspeed" and plan.precision == "fp16":
        raise bad_input("precision", "precision=fp16 with framework=deepspeed does not run on a CPU (DeepSpeed's CPU accelerator has no fp16 support). Use precision: bf16 or fp32 for CPU runs, or run on cuda.")
    if plan.framework == "fsdp1" and plan.low_memory_init:
        raise bad_input("low_memory_init", "low_memory_init=true with framework=fsdp1 needs a GPU (FSDP1 broadcasts rank 0's weights with sync_module_states, which works on GPU tensors only). Use framework: fsdp2 for a CPU run, set low_memory_init: false, or run on cuda.")
    if plan.framework == "fsdp1" and plan.offload.params == "cpu":
        raise bad_input("offload.params", "offload.params=cpu with framework=fsdp1 needs a GPU (FSDP1's CPUOffload copies parameters between the GPU and the CPU); on a CPU run they already live in CPU RAM. Set offload to none for CPU runs, use framework: fsdp2, or run on cuda.")
    if any(getattr(plan.zeropp, q) for q in ("quantized_weights", "quantized_gradients")):
        raise bad_input("zeropp.quantized_weights", "zeropp.quantized_weights / quantized_gradients (ZeRO++ qwZ/qgZ) have no CPU kernels in DeepSpeed. Set them to false for CPU runs, or run on cuda.")


def wrap(plan: Plan, model: nn.Module, device: str, loss: Callable, ds_overrides: dict | None = None) -> Trainer:
    """Shard `model` (built on CPU, initialised) as `plan` says and return its Trainer.

    ds_overrides: DeepSpeed config keys the Plan does not model, merged (nested) over the config
    shardlab exports, for experiments with one DeepSpeed setting at a time (benchmarks/zero3_gap.py).
    """
    check_runnable(plan, device)
    if plan.framework == "deepspeed":
        return _deepspeed(plan, model, device, loss, ds_overrides or {})
    return {"fsdp1": _fsdp1, "fsdp2": _fsdp2}[plan.framework](plan, model, device, loss)


def _mesh(plan: Plan, device: str):
    """(replicate over nodes, shard within a node) for hybrid; None otherwise."""
    from torch.distributed.device_mesh import init_device_mesh

    t = plan.topology
    return init_device_mesh(device, (t.nodes, t.gpus_per_node), mesh_dim_names=("replicate", "shard"))


def _broadcast_from_rank0(model: nn.Module, device: str) -> None:
    """Every rank takes rank 0's parameters and buffers (what sync_module_states does)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def _fsdp1(plan: Plan, model: nn.Module, device: str, loss: Callable) -> Trainer:
    from torch.distributed.fsdp import (BackwardPrefetch, CPUOffload, FullyShardedDataParallel as FSDP,
                                        MixedPrecision, ShardingStrategy)
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    strategy = {"ddp": ShardingStrategy.NO_SHARD, "zero2": ShardingStrategy.SHARD_GRAD_OP,
                "zero3": ShardingStrategy.FULL_SHARD, "hybrid": ShardingStrategy.HYBRID_SHARD}[plan.sharding]
    policy = None
    if plan.wrap.policy == "transformer":
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={block_class(model, plan.wrap.transformer_layer_cls)})
    elif plan.wrap.policy == "size":
        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=plan.wrap.min_num_params)
    mp = None
    if plan.precision != "fp32":
        mp = MixedPrecision(param_dtype=DTYPES[plan.precision], reduce_dtype=_dtype(plan.reduce_dtype, plan.precision),
                            buffer_dtype=_dtype(plan.buffer_dtype, plan.precision))
    prefetch = {"backward_pre": BackwardPrefetch.BACKWARD_PRE, "backward_post": BackwardPrefetch.BACKWARD_POST, "none": None}[plan.backward_prefetch]
    if plan.activation_checkpointing:
        set_activation_checkpointing(model, block_class(model, plan.wrap.transformer_layer_cls), True)
    kwargs: dict[str, Any] = {}
    if plan.sharding == "hybrid":
        kwargs["device_mesh"] = _mesh(plan, device)
    # an explicit CPU device_id is what lets FSDP1 run on a machine without accelerators
    kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    sync = plan.sync_module_states
    if plan.low_memory_init:
        # ranks > 0 hold a meta model: FSDP materialises each unit empty and broadcasts rank 0's weights
        kwargs["param_init_fn"] = lambda m: m.to_empty(device=torch.device("cuda", torch.cuda.current_device()), recurse=False)
    elif sync and device == "cpu":
        # FSDP1's own sync_module_states insists on GPU tensors; on CPU broadcast rank 0's weights here
        _broadcast_from_rank0(model, device)
        sync = False
    fsdp = FSDP(model, sharding_strategy=strategy, auto_wrap_policy=policy, mixed_precision=mp,
                cpu_offload=CPUOffload(offload_params=plan.offload.params == "cpu"), backward_prefetch=prefetch,
                forward_prefetch=plan.forward_prefetch, limit_all_gathers=plan.limit_all_gathers,
                sync_module_states=sync, use_orig_params=plan.compile, **kwargs)
    optimizer = make_optimizer(plan, fsdp.parameters())
    scaler = None
    if plan.precision == "fp16" and plan.loss_scaling == "dynamic":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device=device)
    module = torch.compile(fsdp) if plan.compile else fsdp
    # a compiled module forwards clip_grad_norm_ (and any attribute) to the FSDP module inside
    return Trainer("fsdp1", module, optimizer, loss, plan.gradient_clipping, scaler)


def _fsdp2(plan: Plan, model: nn.Module, device: str, loss: Callable) -> Trainer:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    block_cls = block_class(model, plan.wrap.transformer_layer_cls) if plan.wrap.policy == "transformer" else None
    on_meta = any(p.is_meta for p in model.parameters())
    full_state = None
    if plan.low_memory_init:
        # rank 0 holds the real weights (on CPU), the others a meta model; after sharding each rank
        # takes its shard of rank 0's full state dict
        full_state = {} if on_meta else model.state_dict()
    else:
        if device == "cuda":
            model.to(device)
        if plan.sync_module_states:
            # FSDP2 has no sync_module_states flag: broadcast rank 0's weights before sharding
            _broadcast_from_rank0(model, device)
    set_activation_checkpointing(model, block_cls or type(None), plan.activation_checkpointing and block_cls is not None)
    if plan.compile and block_cls is not None:
        for m in model.modules():
            if isinstance(m, block_cls):
                m.compile()
    mp = MixedPrecisionPolicy()
    if plan.precision != "fp32":
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[plan.precision], reduce_dtype=_dtype(plan.reduce_dtype, plan.precision))
    offload = CPUOffloadPolicy(pin_memory=device == "cuda") if plan.offload.params == "cpu" else OffloadPolicy()
    units = [m for m in model.modules() if block_cls is not None and isinstance(m, block_cls)]
    if plan.wrap.policy == "size":
        units = [m for m in model.modules() if m is not model and sum(p.numel() for p in m.parameters()) >= plan.wrap.min_num_params
                 and not any(sum(p.numel() for p in c.parameters()) >= plan.wrap.min_num_params for c in m.children())]
    if plan.sharding == "ddp":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for m in units:
            replicate(m, mp_policy=mp, offload_policy=offload)
        replicate(model, mp_policy=mp, offload_policy=offload)
    else:
        mesh = _mesh(plan, device) if plan.sharding == "hybrid" else None
        reshard = plan.sharding != "zero2"
        for m in units:
            fully_shard(m, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    if full_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if on_meta:
            model.to_empty(device="cpu" if plan.offload.params == "cpu" else device)
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        import torch.distributed as dist

        for b in model.buffers():  # non-persistent buffers (a rotary inv_freq) are in no state dict
            dist.broadcast(b, src=0)
    if plan.forward_prefetch and units:
        for a, b in zip(units, units[1:]):
            a.set_modules_to_forward_prefetch([b])
    optimizer = make_optimizer(plan, model.parameters())
    scaler = None
    if plan.precision == "fp16" and plan.loss_scaling == "dynamic":
        scaler = torch.amp.GradScaler(device)
    return Trainer("fsdp2", model, optimizer, loss, plan.gradient_clipping, scaler)


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def ds_config(plan: Plan, device: str) -> dict:
    """The DeepSpeed config `shardlab export --to deepspeed` writes, plus what only a real run needs."""
    from shardlab.export.deepspeed import deepspeed_config

    cfg = _drop_auto(deepspeed_config(plan))
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


def _drop_auto(obj):
    """Keys an exported config leaves as 'auto' (for accelerate to fill) take DeepSpeed's defaults."""
    if isinstance(obj, dict):
        return {k: _drop_auto(v) for k, v in obj.items() if v != "auto"}
    return obj


def _merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, nested dicts key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _deepspeed(plan: Plan, model: nn.Module, device: str, loss: Callable, overrides: dict) -> Trainer:
    import deepspeed

    cfg = _merge(ds_config(plan, device), overrides)
    if plan.activation_checkpointing:
        set_activation_checkpointing(model, block_class(model, plan.wrap.transformer_layer_cls), True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    if plan.compile or cfg.get("compile", {}).get("deepcompile"):
        engine.compile()  # DeepCompile too needs engine.compile() to turn on
    t = Trainer("deepspeed", engine, optimizer, loss, plan.gradient_clipping, engine=engine)
    t.extras["ds_config"] = cfg
    return t
