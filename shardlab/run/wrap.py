"""Wrap a model as the Plan says, with FSDP1, FSDP2 or DeepSpeed: the runner's entry to the adapters.

`wrap(plan, model, device, loss)` returns a `Trainer` (frameworks/base.py): its `forward`, `backward`
and `step` hide how each framework runs a step (loss scaling, accumulation, clipping, the optimizer),
so the worker's loop and its measurements are the same for all three. What each framework does with
the plan lives in its adapter (shardlab/frameworks/); the exporters read the same settings.
`low_memory_init`: ranks > 0 build a meta model (worker.py); FSDP1 materialises it with param_init_fn
+ sync_module_states (GPU only), FSDP2 loads rank 0's full state dict with broadcast_from_rank0.
DeepSpeed's zero.Init is not applied yet: with DeepSpeed every rank builds the full model.
"""

from __future__ import annotations

from typing import Callable

from shardlab.frameworks import adapter, check_runnable
from shardlab.frameworks.base import Trainer, block_class, set_activation_checkpointing
from shardlab.frameworks.deepspeed import ds_config
from shardlab.plan import Plan

__all__ = ["Trainer", "block_class", "check_runnable", "ds_config", "set_activation_checkpointing", "wrap"]


def wrap(plan: Plan, model, device: str, loss: Callable, ds_overrides: dict | None = None) -> Trainer:
    """Shard `model` (built on CPU, initialised) as `plan` says and return its Trainer.

    ds_overrides: DeepSpeed config keys the Plan does not model, merged (nested) over the config
    shardlab exports, for experiments with one DeepSpeed setting at a time (benchmarks/zero3_gap.py).
    """
    check_runnable(plan, device)
    fw = adapter(plan.framework)
    if plan.framework == "deepspeed":
        return fw.apply(fw.merge(ds_config(plan, device), ds_overrides or {}), model, device, loss, plan)
    return fw.apply(fw.settings(plan), model, device, loss)
