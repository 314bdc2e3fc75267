"""What the three framework adapters share: optimizer settings, dtypes, block classes, activation
checkpointing, the device mesh shape, and the `Trainer` the worker drives.

Nothing here decides anything framework-specific; each adapter (fsdp1.py, fsdp2.py, deepspeed.py)
turns a Plan into its own typed settings once and builds from them. torch is imported inside the
functions that need it (`import shardlab` must stay light).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from shardlab.export.keys import SGD_MOMENTUM
from shardlab.plan import Plan, bad_input

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # plan precision -> torch.<name>
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch's defaults, written out so every export says them
OPTIMIZER_CLASSES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}  # plan name -> torch.optim class


def dtype_name(value: str, precision: str) -> str:
    """A plan dtype field ('auto' follows the precision) as a torch dtype attribute name."""
    return DTYPE_NAMES[precision if value == "auto" else value]


def torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


@dataclass(frozen=True)
class OptimizerSettings:
    """A torch.optim class name and its keyword arguments (lr, weight_decay, betas/eps or momentum)."""

    cls: str
    kwargs: dict[str, Any]


def optimizer_settings(plan: Plan) -> OptimizerSettings:
    o = plan.optimizer
    if o.name == "sgd":
        return OptimizerSettings("SGD", {"lr": o.lr, "momentum": SGD_MOMENTUM, "weight_decay": o.weight_decay})
    return OptimizerSettings(OPTIMIZER_CLASSES[o.name], {"lr": o.lr, "betas": ADAM_BETAS, "eps": ADAM_EPS,
                                                         "weight_decay": o.weight_decay})


def build_optimizer(s: OptimizerSettings, params):
    import torch

    return getattr(torch.optim, s.cls)(params, **s.kwargs)


def block_names(plan: Plan) -> tuple[str, ...]:
    """wrap.transformer_layer_cls as class names (accelerate allows a comma-separated list)."""
    names = tuple(n.strip() for n in plan.wrap.transformer_layer_cls.split(",") if n.strip())
    if not names or not all(n.isidentifier() for n in names):
        raise bad_input("wrap.transformer_layer_cls", f"wrap.transformer_layer_cls={plan.wrap.transformer_layer_cls!r} must be Python class names "
                        "separated by commas (e.g. LlamaDecoderLayer). Fix the name.")
    return names


def block_classes(model, names: tuple[str, ...]) -> tuple[type, ...]:
    """The module classes called `names` inside `model`; a PlanError names any that is missing."""
    found = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in found]
    if missing:
        raise bad_input("wrap.transformer_layer_cls", f"wrap.transformer_layer_cls={','.join(names)!r}: {missing[0]!r} is not a module class "
                        f"in this model. Use one of {sorted(found)}.")
    return tuple(found[n] for n in names)


def block_class(model, name: str) -> type:
    """The module class called `name` inside `model` (the transformer block to wrap)."""
    return block_classes(model, tuple(n.strip() for n in name.split(",") if n.strip()) or (name,))[0]


def set_activation_checkpointing(model, classes: tuple[type, ...], on: bool) -> list[str]:
    """Recompute each block's forward in backward (non-reentrant torch.utils.checkpoint).

    Patches the instance's forward instead of wrapping the module, so parameter names (and state
    dicts) stay as they were. Returns the paths of the checkpointed modules.
    """
    if not on:
        return []
    from torch.utils.checkpoint import checkpoint

    done = []
    for name, m in model.named_modules():
        if isinstance(m, classes) and not getattr(m, "_shardlab_ckpt", False):
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
            m._shardlab_ckpt = True
            done.append(name)
    return done


def broadcast_from_rank0(model) -> None:
    """Every rank takes rank 0's parameters and buffers (what sync_module_states does)."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def mesh_shape(kind: str, world: int, per_node: int) -> tuple[int, ...]:
    """'shard': 1-D over all ranks; 'hybrid': (nodes, ranks per node); 'replicate': (ranks, 1)."""
    return {"shard": (world,), "hybrid": (world // per_node, per_node), "replicate": (world, 1)}[kind]


def make_mesh(kind: str, device: str, world: int, per_node: int):
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_shape(kind, world, per_node)
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device, shape, mesh_dim_names=names)


def check_device(plan: Plan, device: str) -> None:
    """What no framework can do on a CPU run (PlanError naming the field)."""
    if device != "cpu":
        return
    for name in ("quantized_weights", "quantized_gradients"):
        if getattr(plan.zeropp, name):
            raise bad_input(f"zeropp.{name}", f"zeropp.{name}=true (ZeRO++ {'qwZ' if name == 'quantized_weights' else 'qgZ'}) has no CPU "
                            f"implementation in DeepSpeed; this run is on device=cpu. Run it on GPUs (device='cuda'), or set zeropp.{name}: false.")
    if plan.offload.optimizer == "nvme" or plan.offload.params == "nvme":
        raise bad_input("offload", "NVMe offload needs DeepSpeed's async I/O op on a CUDA machine; this run is on device=cpu. "
                        "Use offload: cpu, or run on GPUs.")


@dataclass
class Trainer:
    """One framework's way of running a step. `module` is what the batch is fed to."""

    framework: str
    module: Any
    optimizer: Any
    loss: Callable
    clip: float | None = None
    scaler: Any = None
    engine: Any = None  # DeepSpeed engine
    extras: dict = field(default_factory=dict)

    def forward(self, x, y):
        return self.loss(self.module(x), y)

    def backward(self, loss, accum: int) -> None:
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
                import torch

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


def fsdp_translate_from(plan: Plan, d: dict, notes: list[str], to: str) -> None:
    """What FSDP1 and FSDP2 both change in a plan translated to them (`to`) from another framework:
    ZeRO-1, ZeRO++, offload, 16-bit checkpoints and buckets (DeepSpeed-only), and from DeepSpeed its
    prefetch, wrap and zero.Init. Each adapter's `translate_from` adds its own version's rules."""
    src, default = plan.framework, Plan()
    if d["sharding"] == "zero1":
        d["sharding"] = "zero2"
        notes.append("sharding=zero1 has no FSDP equivalent (FSDP shards gradients with the optimizer states); using zero2 (SHARD_GRAD_OP).")
    zp = d["zeropp"]
    if zp["hpz_partition_size"] > 1:
        if d["sharding"] == "zero3" and plan.topology.nodes > 1 and zp["hpz_partition_size"] == plan.topology.gpus_per_node:
            d["sharding"] = "hybrid"
            notes.append("ZeRO++ hpZ over one node becomes sharding=hybrid (HYBRID_SHARD): FSDP replicates gradients and optimizer "
                         "states across nodes too, so each GPU holds more than with hpZ, and gradients are all-reduced across nodes.")
        else:
            notes.append(f"zeropp.hpz_partition_size={zp['hpz_partition_size']} (a secondary weight shard inside a node) has no FSDP equivalent; dropped.")
        zp["hpz_partition_size"] = 1
    for q in ("quantized_weights", "quantized_gradients"):
        if zp[q]:
            zp[q] = False
            notes.append(f"zeropp.{q} (ZeRO++ int8/int4 communication) has no FSDP equivalent; dropped, so {to} sends full-precision bytes.")
    off = d["offload"]
    if "nvme" in (off["optimizer"], off["params"]):
        notes.append("NVMe offload (ZeRO-Infinity) has no FSDP equivalent; FSDP can offload to CPU only.")
    wants = off["optimizer"] != "none" or off["params"] != "none"
    if wants and d["sharding"] in ("zero3", "hybrid"):
        if off["optimizer"] != off["params"] or "nvme" in (off["optimizer"], off["params"]):
            notes.append("offload: FSDP offloads all or nothing (CPUOffload moves parameters, gradients and the optimizer step "
                         f"together); optimizer={off['optimizer']}, params={off['params']} becomes both on cpu.")
        off.update(optimizer="cpu", params="cpu", nvme_path=None)
    elif wants:
        notes.append(f"offload: FSDP offloads all or nothing and only with parameters sharded (zero3); with sharding={d['sharding']} "
                     "the optimizer stays on the GPU, so GPU memory rises. Use sharding zero3 to offload everything to CPU.")
        off.update(optimizer="none", params="none", nvme_path=None)
    elif off["nvme_path"]:
        off["nvme_path"] = None
    if d["checkpoint"] == "full_16bit":
        d["checkpoint"] = "full"
        notes.append("checkpoint=full_16bit (DeepSpeed's gathered 16-bit save) becomes checkpoint=full (one full state dict).")
    if any(v != "auto" for v in d["buckets"].values()):
        notes.append("bucket sizes are DeepSpeed knobs; FSDP communicates one wrap unit at a time (set by wrap). Reset to auto.")
    d["buckets"] = default.buckets.model_dump()
    if src == "deepspeed":
        notes.append("prefetch: ZeRO-3 prefetches by bucket size (stage3_prefetch_bucket_size); FSDP prefetches the next wrap unit "
                     f"({'backward_prefetch, forward_prefetch' if to == 'fsdp1' else 'one unit ahead in backward; forward_prefetch explicit'}).")
        notes.append(f"wrap: DeepSpeed partitions parameters individually; {to} shards by wrap unit, here wrap.policy={d['wrap']['policy']} "
                     f"({d['wrap']['transformer_layer_cls']}). Check it names your model's block class.")
        if d["low_memory_init"]:
            d["sync_module_states"] = True
            notes.append("low_memory_init: zero.Init becomes FSDP's meta-device construction with rank 0 broadcasting the weights (sync_module_states).")
