"""FSDP1 training set-up exported by shardlab: zero3 (FULL_SHARD), bf16, 1 node(s) x 8 GPU(s).

Run on each node: torchrun --nnodes=1 --nproc-per-node=8 THIS_FILE [--steps N] [--save DIR]
(CUDA + NCCL when GPUs are present, otherwise CPU + gloo). `shard_model(model, device)` applies the
plan to any model; `main()` trains a tiny demo model with it. The constants below are the plan's settings.
"""

import argparse
import functools
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint

from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

# The plan's settings, as shardlab's fsdp1 adapter resolved them (shardlab/frameworks/).
FRAMEWORK = "fsdp1"
BLOCK_CLASS_NAMES = ("LlamaDecoderLayer",)
MICRO_BATCH = 1
GRAD_ACCUM = 1
SHARDING_STRATEGY = "FULL_SHARD"
MESH = "shard"
WRAP_POLICY = "transformer"
MIN_NUM_PARAMS = 100000000
PARAM_DTYPE = "bfloat16"
REDUCE_DTYPE = "bfloat16"
BUFFER_DTYPE = "bfloat16"
OFFLOAD_PARAMS = False
BACKWARD_PREFETCH = "BACKWARD_PRE"
FORWARD_PREFETCH = False
LIMIT_ALL_GATHERS = True
SYNC_MODULE_STATES = True
USE_ORIG_PARAMS = True
ACTIVATION_CHECKPOINTING = True
COMPILE = False
LOW_MEMORY_INIT = False
OPTIMIZER = "AdamW"
OPTIMIZER_KWARGS = {"lr": 0.0001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.0}
GRAD_CLIP = 1.0
GRAD_SCALER = False
FULL_CHECKPOINT = False

VOCAB, SEQ, WIDTH, DEPTH = 256, 32, 64, 4


class LlamaDecoderLayer(nn.Module):
    """A pre-norm MLP block: the demo model's shard unit (named like wrap.transformer_layer_cls)."""

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


def make_mesh(device):
    """MESH 'shard': 1-D over all ranks; 'hybrid': rows are nodes (replicas), columns the ranks of
    one node (shards); 'replicate': every rank a replica (DDP)."""
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if MESH == "shard":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    shape = (world // per_node, per_node) if MESH == "hybrid" else (world, 1)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))


def block_classes(model):
    found = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in BLOCK_CLASS_NAMES if n not in found]
    if missing:
        raise ValueError(f"no module of class {missing[0]} in the model; set wrap.transformer_layer_cls to its block class")
    return tuple(found[n] for n in BLOCK_CLASS_NAMES)


def apply_checkpointing(model):
    """Recompute each block's activations in backward instead of keeping them (module names stay)."""
    for m in model.modules():
        if isinstance(m, block_classes(model)) and not getattr(m, "_shardlab_ckpt", False):
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
            m._shardlab_ckpt = True


def dtype(name):
    return None if name is None else getattr(torch, name)


def shard_model(model, device):
    """Wrap `model` with FullyShardedDataParallel as the settings say."""
    if ACTIVATION_CHECKPOINTING:
        apply_checkpointing(model)
    policy = None
    if WRAP_POLICY == "transformer":
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set(block_classes(model)))
    elif WRAP_POLICY == "size":
        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=MIN_NUM_PARAMS)
    mixed = None
    if PARAM_DTYPE is not None:
        mixed = MixedPrecision(param_dtype=dtype(PARAM_DTYPE), reduce_dtype=dtype(REDUCE_DTYPE), buffer_dtype=dtype(BUFFER_DTYPE))
    kwargs = dict(
        sharding_strategy=ShardingStrategy[SHARDING_STRATEGY], auto_wrap_policy=policy, mixed_precision=mixed,
        # parameters already live in CPU memory on a CPU run: offloading means something on GPUs only
        cpu_offload=CPUOffload(offload_params=OFFLOAD_PARAMS and device.type == "cuda"),
        backward_prefetch=None if BACKWARD_PREFETCH is None else BackwardPrefetch[BACKWARD_PREFETCH],
        forward_prefetch=FORWARD_PREFETCH, limit_all_gathers=LIMIT_ALL_GATHERS, use_orig_params=USE_ORIG_PARAMS,
        # FSDP1 broadcasts rank 0's weights from GPU memory only; on CPU every rank builds the same seeded weights
        sync_module_states=SYNC_MODULE_STATES and device.type == "cuda",
        device_id=device,  # CPU runs (gloo) need it too: FSDP1 otherwise looks for an accelerator
    )
    if MESH == "hybrid":
        kwargs["device_mesh"] = make_mesh(device)
    if next(model.parameters()).is_meta:  # low_memory_init: storage only for this rank's shards
        kwargs["param_init_fn"] = lambda m: m.to_empty(device=device, recurse=False)
    model = FSDP(model, **kwargs)
    return torch.compile(model) if COMPILE else model


def make_scaler(device):
    return ShardedGradScaler(device.type) if GRAD_SCALER else None  # fp16: dynamic loss scaling over shards


def clip_gradients(model):
    model.clip_grad_norm_(GRAD_CLIP)


def make_optimizer(model):
    return getattr(torch.optim, OPTIMIZER)(model.parameters(), **OPTIMIZER_KWARGS)


def train_step(model, optimizer, scaler, batches):
    """One optimizer step over GRAD_ACCUM micro-batches; returns the summed loss."""
    total = 0.0
    for batch in batches:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)) / GRAD_ACCUM
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if GRAD_CLIP is not None:
        clip_gradients(model)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def build_model(device):
    torch.manual_seed(0)
    if not LOW_MEMORY_INIT:
        return TinyGPT().to(device) if FRAMEWORK == "fsdp2" else TinyGPT()
    # FSDP1 broadcasts rank 0's weights from GPU memory only: on a CPU run every rank builds them
    if FRAMEWORK == "fsdp1" and (dist.get_rank() == 0 or device.type != "cuda"):
        return TinyGPT()
    with torch.device("meta"):  # no full copy on this rank
        return TinyGPT()


def materialize(model, device):
    """FSDP2 low_memory_init: allocate only this rank's shards, then initialise them in place."""
    model.to_empty(device="cpu" if OFFLOAD_PARAMS else device)
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def save_checkpoint(model, path):
    """FULL_CHECKPOINT: one full state dict written by rank 0; else one shard per rank (DCP)."""
    # gathered weights go to CPU memory on GPU runs; on a CPU run the copy would be redundant
    options = StateDictOptions(full_state_dict=FULL_CHECKPOINT, cpu_offload=FULL_CHECKPOINT and torch.cuda.is_available())
    state = get_model_state_dict(model, options=options)
    if not FULL_CHECKPOINT:
        dcp.save(state, checkpoint_id=path)
    elif dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        torch.save(state, os.path.join(path, "model.pt"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save", default=None, help="write a checkpoint to this directory at the end")
    args = parser.parse_args()
    device = setup()
    model = shard_model(build_model(device), device)
    if LOW_MEMORY_INIT and FRAMEWORK == "fsdp2":
        materialize(model, device)
    optimizer = make_optimizer(model)
    scaler = make_scaler(device)
    gen = torch.Generator().manual_seed(dist.get_rank())
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen).to(device) for _ in range(GRAD_ACCUM)]
    for step in range(args.steps):
        total = train_step(model, optimizer, scaler, batches)
        if dist.get_rank() == 0:
            print(f"step {step} loss {total:.4f}", flush=True)
    if args.save:
        save_checkpoint(model, args.save)
    # Free the wrapped model and optimizer (their communication hooks) while the process group exists:
    # torn down at interpreter exit, after it, a gloo run can abort ("terminate called without an active
    # exception").
    del model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
