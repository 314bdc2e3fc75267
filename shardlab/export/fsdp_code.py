"""Plan -> a runnable PyTorch script that applies the plan with FSDP1 or FSDP2.

The script holds `shard_model(model, device)` (the part to copy into a real project: FSDP1's
FullyShardedDataParallel kwargs and auto-wrap policy, or FSDP2's fully_shard per block with
MixedPrecisionPolicy / OffloadPolicy and a 2-D mesh for hybrid and ddp), a checkpoint writer in the
plan's format, and a `main()` that trains a tiny demo model with it, so the export can be checked by
running it: `torchrun --nproc-per-node=2 train_fsdp.py --steps 3` (CUDA + NCCL, or CPU + gloo).
"""

from __future__ import annotations

from shardlab.plan import Plan, bad_input

_TORCH_DTYPE = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
_OPTIMIZER = {
    "adamw": "torch.optim.AdamW(model.parameters(), lr={lr!r}, weight_decay={wd!r})",
    "adam": "torch.optim.Adam(model.parameters(), lr={lr!r}, weight_decay={wd!r})",
    "sgd": "torch.optim.SGD(model.parameters(), lr={lr!r}, momentum={momentum!r}, weight_decay={wd!r})",
}


def block_names(plan: Plan) -> list[str]:
    """wrap.transformer_layer_cls as class names (accelerate allows a comma-separated list)."""
    names = [n.strip() for n in plan.wrap.transformer_layer_cls.split(",") if n.strip()]
    if not names or not all(n.isidentifier() for n in names):
        raise bad_input("wrap.transformer_layer_cls", f"wrap.transformer_layer_cls={plan.wrap.transformer_layer_cls!r} must be Python class names "
                        "separated by commas (e.g. LlamaDecoderLayer). Fix the name.")
    return names


def _dtype(plan: Plan, value: str) -> str:
    return _TORCH_DTYPE[plan.precision if value == "auto" else value]


def _fsdp1(plan: Plan) -> tuple[str, str]:
    """Imports and shard_model() for FullyShardedDataParallel."""
    from shardlab.export.keys import FSDP1_STRATEGY

    imports = ("from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy\n"
               "from torch.distributed.fsdp import FullyShardedDataParallel as FSDP\n"
               "from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy\n")
    mp = "None" if plan.precision == "fp32" else (
        f"MixedPrecision(param_dtype={_dtype(plan, 'auto')}, reduce_dtype={_dtype(plan, plan.reduce_dtype)}, "
        f"buffer_dtype={_dtype(plan, plan.buffer_dtype)})")
    policy = {
        "transformer": "functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes(model))",
        "size": f"functools.partial(size_based_auto_wrap_policy, min_num_params={plan.wrap.min_num_params})",
        "none": "None,  # the whole model is one unit",
    }[plan.wrap.policy]
    policy += "" if plan.wrap.policy == "none" else ","
    cpu_offload = ("CPUOffload(offload_params=device.type == 'cuda'),  # on a CPU run they are in CPU memory already"
                   if plan.offload.params == "cpu" else "CPUOffload(offload_params=False),")
    prefetch = {"backward_pre": "BackwardPrefetch.BACKWARD_PRE", "backward_post": "BackwardPrefetch.BACKWARD_POST", "none": "None"}[plan.backward_prefetch]
    mesh = ("    # HYBRID_SHARD: shard inside a node, replicate across nodes (mesh rows = nodes).\n"
            "    kwargs['device_mesh'] = hybrid_mesh(device)\n") if plan.sharding == "hybrid" else ""
    low_mem = ("    if next(model.parameters()).is_meta:  # low_memory_init: storage only for this rank's shards; rank 0's weights are broadcast\n"
               "        kwargs['param_init_fn'] = lambda m: m.to_empty(device=device, recurse=False)\n"
               ) if plan.low_memory_init else ""
    body = f'''
def shard_model(model, device):
    """Wrap `model` with FSDP1 as the plan says: {FSDP1_STRATEGY[plan.sharding]}, wrap policy {plan.wrap.policy}."""
    # FSDP1 broadcasts rank 0's weights from GPU memory only; on CPU every rank builds the same seeded weights.
    sync = {'device.type == "cuda"' if plan.sync_module_states else 'False'}
    kwargs = dict(
        sharding_strategy=ShardingStrategy.{FSDP1_STRATEGY[plan.sharding]},
        auto_wrap_policy={policy}
        mixed_precision={mp},
        cpu_offload={cpu_offload}
        backward_prefetch={prefetch},
        forward_prefetch={plan.forward_prefetch},
        limit_all_gathers={plan.limit_all_gathers},
        sync_module_states=sync,
        use_orig_params=True,  # keeps parameter names (torch.compile, optimizer groups)
        device_id=device,  # CPU runs (gloo) need it too: FSDP1 otherwise looks for an accelerator
    )
{mesh}{low_mem}    model = FSDP(model, **kwargs)
{_ac_after_wrap(plan)}    return model
'''
    return imports, body


def _ac_after_wrap(plan: Plan) -> str:
    if not plan.activation_checkpointing:
        return ""
    return "    apply_checkpointing(model)\n"


def _fsdp2(plan: Plan) -> tuple[str, str]:
    """Imports and shard_model() for fully_shard."""
    from shardlab.export.keys import FSDP2_RESHARD

    imports = "from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard\n"
    mp = "MixedPrecisionPolicy()" if plan.precision == "fp32" else (
        f"MixedPrecisionPolicy(param_dtype={_dtype(plan, 'auto')}, reduce_dtype={_dtype(plan, plan.reduce_dtype)})")
    offload = "CPUOffloadPolicy(pin_memory=device.type == 'cuda')" if plan.offload.params == "cpu" else "OffloadPolicy()"
    mesh = {
        "hybrid": "hybrid_mesh(device)  # 2-D: replicate across nodes, shard inside a node",
        "ddp": "init_device_mesh(device.type, (dist.get_world_size(), 1), mesh_dim_names=('replicate', 'shard'))  # replicate only",
    }.get(plan.sharding, "init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=('shard',))")
    units = {
        "transformer": "[m for m in model.modules() if isinstance(m, block_classes(model))]",
        "size": f"size_units(model, {plan.wrap.min_num_params})",
        "none": "[]  # the whole model is one unit",
    }[plan.wrap.policy]
    ac = "    apply_checkpointing(model)  # before sharding, as torchtitan does\n" if plan.activation_checkpointing else ""
    prefetch = ("    for unit, nxt in zip(units, units[1:]):  # forward_prefetch: gather the next unit early\n"
                "        unit.set_modules_to_forward_prefetch([nxt])\n") if plan.forward_prefetch else ""
    buffers = "" if plan.precision == "fp32" else "    # buffers keep their own dtype: FSDP2 has no buffer_dtype.\n"
    body = f'''
def shard_model(model, device):
    """Apply fully_shard to each unit, then to the root (reshard_after_forward={FSDP2_RESHARD[plan.sharding]})."""
{ac}    mesh = {mesh}
{buffers}    kwargs = dict(mesh=mesh, reshard_after_forward={FSDP2_RESHARD[plan.sharding]}, mp_policy={mp},
                  offload_policy={offload})
    units = {units}
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
{prefetch}    return model
'''
    if plan.wrap.policy == "size":
        body += '''

def size_units(model, min_params):
    """Size-based wrapping: bottom-up, a module becomes a unit once its not-yet-wrapped parameters reach min_params."""
    units = []

    def visit(module):
        n = sum(p.numel() for p in module.parameters(recurse=False)) + sum(visit(c) for c in module.children())
        if n >= min_params and module is not model:
            units.append(module)
            return 0
        return n

    visit(model)
    return units
'''
    return imports, body


def _ac_helper(plan: Plan) -> str:
    if not plan.activation_checkpointing:
        return ""
    return '''

def apply_checkpointing(model):
    """Recompute each block's activations in backward instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    classes = block_classes(model)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, classes))
'''


def _materialize(plan: Plan) -> str:
    if not (plan.low_memory_init and plan.framework == "fsdp2"):
        return ""
    where = "'cpu'" if plan.offload.params == "cpu" else "device"
    return f'''    # low_memory_init: allocate only this rank's shards, then initialise them in place.
    model.to_empty(device={where})
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
'''


def _build(plan: Plan) -> str:
    if not plan.low_memory_init:
        return "    model = TinyGPT().to(device)\n" if plan.framework == "fsdp2" else "    model = TinyGPT()\n"
    if plan.framework == "fsdp2":
        return "    with torch.device('meta'):  # low_memory_init: no full copy on any rank\n        model = TinyGPT()\n"
    return ("    # low_memory_init: on GPUs only rank 0 holds the full model; FSDP1 cannot broadcast from CPU memory,\n"
            "    # so on a CPU run every rank builds it (same seed, same weights).\n"
            "    if dist.get_rank() == 0 or device.type != 'cuda':\n        model = TinyGPT()\n"
            "    else:\n        with torch.device('meta'):\n            model = TinyGPT()\n")


def _scaler(plan: Plan) -> str:
    if plan.precision != "fp16" or plan.loss_scaling == "none":
        return "    scaler = None\n"
    if plan.framework == "fsdp1":
        return ("    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler\n\n"
                "    scaler = ShardedGradScaler(device.type)  # fp16: dynamic loss scaling over shards\n")
    return "    scaler = torch.amp.GradScaler(device.type)  # fp16: dynamic loss scaling (FSDP2 has none built in)\n"


def _clip(plan: Plan) -> str:
    if plan.gradient_clipping is None:
        return ""
    unscale = "        if scaler is not None:\n            scaler.unscale_(optimizer)\n"
    if plan.framework == "fsdp1":
        return unscale + f"        model.clip_grad_norm_({plan.gradient_clipping!r})\n"
    return unscale + f"        torch.nn.utils.clip_grad_norm_(model.parameters(), {plan.gradient_clipping!r})\n"


def _state_options(full: bool) -> str:
    if not full:
        return "full_state_dict=False"
    # Gathered weights go to CPU memory on GPU runs; on a CPU run the copy would be redundant (and crashes).
    return "full_state_dict=True, cpu_offload=torch.cuda.is_available()"


def _save(full: bool) -> str:
    if not full:
        return "    dcp.save(state, checkpoint_id=path)\n"
    return ("    if dist.get_rank() == 0:\n        os.makedirs(path, exist_ok=True)\n"
            "        torch.save(state, os.path.join(path, \"model.pt\"))\n")


def export_fsdp_code(plan: Plan) -> str:
    """The script's text for an fsdp1 or fsdp2 plan."""
    if plan.framework not in ("fsdp1", "fsdp2"):
        raise bad_input("framework", f"--to fsdp-code needs framework fsdp1 or fsdp2, but the plan's framework is {plan.framework}. "
                        "Translate it first (shardlab translate PLAN --to fsdp2), or export with --to deepspeed.")
    names = block_names(plan)
    imports, shard = (_fsdp1 if plan.framework == "fsdp1" else _fsdp2)(plan)
    t = plan.topology
    optimizer = _OPTIMIZER[plan.optimizer.name].format(lr=plan.optimizer.lr, wd=plan.optimizer.weight_decay, momentum=0.9)
    full = plan.checkpoint != "sharded"
    compile_line = "    model = torch.compile(model)\n" if plan.compile else ""
    return f'''"""{plan.framework.upper()} training set-up exported by shardlab: {plan.sharding}, {plan.precision}, {t.nodes} node(s) x {t.gpus_per_node} GPU(s).

Run on each node: torchrun --nnodes={t.nodes} --nproc-per-node={t.gpus_per_node} THIS_FILE [--steps N] [--save DIR]
(CUDA + NCCL when GPUs are present, otherwise CPU + gloo). `shard_model(model, device)` applies the
plan to any model; `main()` trains a tiny demo model with it.
"""

import argparse
import functools
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
{imports}
BLOCK_CLASS_NAMES = {tuple(names)!r}  # wrap.transformer_layer_cls: the modules that become shard units
MICRO_BATCH, GRAD_ACCUM = {plan.micro_batch_size}, {plan.grad_accum_steps}
VOCAB, SEQ, WIDTH, DEPTH = 256, 32, 64, 4


class {names[0]}(nn.Module):
    """A pre-norm MLP block: the demo model's shard unit."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([{names[0]}(WIDTH) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def setup():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def hybrid_mesh(device):
    """Rows are nodes (replicas), columns the processes of one node (shards)."""
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def block_classes(model):
    found = tuple({{type(m) for m in model.modules() if type(m).__name__ in BLOCK_CLASS_NAMES}})
    if not found:
        raise ValueError(f"no module of class {{BLOCK_CLASS_NAMES}} in the model; set wrap.transformer_layer_cls to its block class")
    return found

{shard}{_ac_helper(plan)}

def save_checkpoint(model, path):
    """checkpoint={plan.checkpoint}: {"one full state dict written by rank 0" if full else "one shard per rank (torch.distributed.checkpoint)"}."""
    state = get_model_state_dict(model, options=StateDictOptions({_state_options(full)}))
{_save(full)}

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save", default=None, help="write a checkpoint to this directory at the end")
    args = parser.parse_args()
    device = setup()
    torch.manual_seed(0)
{_build(plan)}    model = shard_model(model, device)
{_materialize(plan)}{compile_line}    optimizer = {optimizer}
{_scaler(plan)}    gen = torch.Generator().manual_seed(dist.get_rank())
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen).to(device) for _ in range(GRAD_ACCUM)]
    for step in range(args.steps):
        total = 0.0
        for batch in batches:
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1)) / GRAD_ACCUM
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.item()
{_clip(plan)}        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0:
            print(f"step {{step}} loss {{total:.4f}}", flush=True)
    if args.save:
        save_checkpoint(model, args.save)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''
