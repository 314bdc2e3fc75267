"""The model, batches and loss one rank of a run trains: built from run.json's "model" or "factory".

Three kinds of model (worker.py's docstring says where each comes from): a preset or shape (shardlab's
GPT/Llama, run/gpt.py, fed run/data.py's synthetic token batches); a model source (usermodel.py: a
Hugging Face config or `module:function`, with batches made for its inputs); or the older "factory",
whose function returns (model, batch_fn) itself. `low_memory_init` decides where the weights are
materialised: ranks > 0 on the meta device for FSDP (the wrapper broadcasts rank 0's), inside
deepspeed.zero.Init for DeepSpeed ZeRO-3.
"""

from __future__ import annotations

from typing import Any, Callable


def model_for_rank(plan, cfg: dict, rank: int, world: int, device: str) -> tuple[Any, Any, Callable, Callable, Any]:
    """(plan, model, batches, loss, spec): `plan` with the model's block class filled in when the model
    names it; `batches(step, micro) -> (inputs, targets)`; `spec` None for a factory's model."""
    from shardlab import usermodel
    from shardlab.run.gpt import loss_fn

    if cfg.get("factory"):
        model, batches = usermodel.load_factory(cfg["factory"])()
        return plan, model, batches, loss_fn, None
    if isinstance(cfg["model"], str) and usermodel.is_source(cfg["model"]):
        return _user_model(plan, cfg, rank, world, device)
    return _shardlab_model(plan, cfg, rank, world, device)


def _shardlab_model(plan, cfg: dict, rank: int, world: int, device: str):
    """A preset or shape: shardlab's own GPT/Llama on synthetic token batches."""
    import torch

    from shardlab.models import resolve_model
    from shardlab.run.data import Batches
    from shardlab.run.gpt import build_model, loss_fn

    spec = resolve_model(cfg["model"])
    torch.manual_seed(cfg["seed"])
    # low_memory_init: only rank 0 materialises the weights; the wrapper broadcasts them
    meta = plan.low_memory_init and plan.framework != "deepspeed" and rank != 0
    model = build_model(spec, seed=cfg["seed"], device="meta" if meta else "cpu")
    batches = Batches(seed=cfg["seed"], rank=rank, world_size=world, micro_batch_size=plan.micro_batch_size,
                      grad_accum_steps=plan.grad_accum_steps, seq_len=spec.seq_len, vocab=spec.vocab, device=device)
    return plan, model, batches, loss_fn, spec


def _user_model(plan, cfg: dict, rank: int, world: int, device: str):
    """A Hugging Face config or a factory (shardlab/usermodel.py), built as low_memory_init says."""
    from shardlab import usermodel
    from shardlab.describe import ds_leaf_classes, logits_of
    from shardlab.models import resolve_model
    from shardlab.run.gpt import loss_fn

    spec = resolve_model(cfg["model"])
    um = usermodel.resolve(spec.source)
    # the launcher already named the block class in plan.yaml; a plan written by hand may not have
    p = usermodel.with_wrap_class(plan, spec)
    seed = cfg["seed"]
    zero3 = p.framework == "deepspeed" and p.sharding in ("zero3", "hybrid")
    if p.low_memory_init and zero3:
        from shardlab.run.wrap import ds_config

        model, batch_fn = um.build("cpu", seed, zero_init=ds_config(p, device))
    else:
        meta = p.low_memory_init and p.framework != "deepspeed" and rank != 0
        model, batch_fn = um.build("meta" if meta else "cpu", seed)
    leaves = ds_leaf_classes(model)
    if leaves and zero3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaves)
    batches = um.batches(batch_fn, seed=seed, rank=rank, world_size=world, micro_batch_size=p.micro_batch_size,
                         grad_accum_steps=p.grad_accum_steps, device=device)
    return p, model, batches, (lambda out, y: loss_fn(logits_of(out), y)), spec
