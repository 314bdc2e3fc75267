"""FSDP1 training set-up exported by shardlab: zero3, bf16, 1 node(s) x 8 GPU(s).

Run on each node: torchrun --nnodes=1 --nproc-per-node=8 THIS_FILE [--steps N] [--save DIR]
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
from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

BLOCK_CLASS_NAMES = ('LlamaDecoderLayer',)  # wrap.transformer_layer_cls: the modules that become shard units
MICRO_BATCH, GRAD_ACCUM = 1, 1
VOCAB, SEQ, WIDTH, DEPTH = 256, 32, 64, 4


class LlamaDecoderLayer(nn.Module):
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
        self.blocks = nn.ModuleList([LlamaDecoderLayer(WIDTH) for _ in range(DEPTH)])
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
    found = tuple({type(m) for m in model.modules() if type(m).__name__ in BLOCK_CLASS_NAMES})
    if not found:
        raise ValueError(f"no module of class {BLOCK_CLASS_NAMES} in the model; set wrap.transformer_layer_cls to its block class")
    return found


def shard_model(model, device):
    """Wrap `model` with FSDP1 as the plan says: FULL_SHARD, wrap policy transformer."""
    # FSDP1 broadcasts rank 0's weights from GPU memory only; on CPU every rank builds the same seeded weights.
    sync = device.type == "cuda"
    kwargs = dict(
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes(model)),
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16),
        cpu_offload=CPUOffload(offload_params=False),
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        forward_prefetch=False,
        limit_all_gathers=True,
        sync_module_states=sync,
        use_orig_params=True,  # keeps parameter names (torch.compile, optimizer groups)
        device_id=device,  # CPU runs (gloo) need it too: FSDP1 otherwise looks for an accelerator
    )
    model = FSDP(model, **kwargs)
    apply_checkpointing(model)
    return model


def apply_checkpointing(model):
    """Recompute each block's activations in backward instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    classes = block_classes(model)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, classes))


def save_checkpoint(model, path):
    """checkpoint=sharded: one shard per rank (torch.distributed.checkpoint)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    dcp.save(state, checkpoint_id=path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save", default=None, help="write a checkpoint to this directory at the end")
    args = parser.parse_args()
    device = setup()
    torch.manual_seed(0)
    model = TinyGPT()
    model = shard_model(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0001, weight_decay=0.0)
    scaler = None
    gen = torch.Generator().manual_seed(dist.get_rank())
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen).to(device) for _ in range(GRAD_ACCUM)]
    for step in range(args.steps):
        total = 0.0
        for batch in batches:
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1)) / GRAD_ACCUM
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.item()
        if scaler is not None:
            scaler.unscale_(optimizer)
        model.clip_grad_norm_(1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0:
            print(f"step {step} loss {total:.4f}", flush=True)
    if args.save:
        save_checkpoint(model, args.save)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
