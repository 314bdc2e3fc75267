"""How a comparison-table row is verified: by the frameworks themselves, never by shardlab's rules.

`api(name)` reads the installed torch / DeepSpeed objects a row describes (enum members, dataclass
and pydantic config fields, signatures, the engine's own assertion) and says whether they are as the
row says; `launch(launcher)` hands the launch command shardlab exports to that launcher's own
argument parser. Each returns (what was checked, outcome). torch, deepspeed and accelerate are
imported only here, when a table is built.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _zero_fields() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {a for k, v in DeepSpeedZeroConfig.model_fields.items() for a in (k, v.alias) if a}


def _sharding() -> tuple[str, bool]:
    from torch.distributed.fsdp import ShardingStrategy

    members = set(ShardingStrategy.__members__)
    return (f"torch ShardingStrategy members {sorted(members)} (none shards optimizer states alone); DeepSpeed zero_optimization.stage",
            members == {"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"} and "stage" in _zero_fields())


def _offload() -> tuple[str, bool]:
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from torch.distributed.fsdp import CPUOffload, CPUOffloadPolicy

    ok = (_fields(CPUOffload) == {"offload_params"} and _fields(CPUOffloadPolicy) == {"pin_memory"}
          and {"offload_optimizer", "offload_param"} <= _zero_fields() and set(OffloadDeviceEnum.__members__) == {"none", "cpu", "nvme"})
    return "fields of torch CPUOffload / CPUOffloadPolicy (one switch, no target), DeepSpeed offload_optimizer / offload_param devices", ok


def _loading() -> tuple[str, bool]:
    import deepspeed
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    params = inspect.signature(FSDP.__init__).parameters
    return "FSDP(param_init_fn=, sync_module_states=) in torch's signature; deepspeed.zero.Init exists", (
        {"param_init_fn", "sync_module_states"} <= set(params) and callable(getattr(deepspeed.zero, "Init", None)))


def _checkpointing() -> tuple[str, bool]:
    from torch.distributed.fsdp import StateDictType

    return "torch StateDictType has SHARDED/FULL; DeepSpeed has stage3_gather_16bit_weights_on_model_save", (
        {"SHARDED_STATE_DICT", "FULL_STATE_DICT"} <= set(StateDictType.__members__)
        and "stage3_gather_16bit_weights_on_model_save" in _zero_fields())


def _prefetch() -> tuple[str, bool]:
    from torch.distributed.fsdp import BackwardPrefetch, FSDPModule

    return "torch BackwardPrefetch members, FSDPModule.set_modules_to_*_prefetch, DeepSpeed stage3_prefetch_bucket_size", (
        set(BackwardPrefetch.__members__) == {"BACKWARD_PRE", "BACKWARD_POST"}
        and all(hasattr(FSDPModule, f"set_modules_to_{d}_prefetch") for d in ("forward", "backward"))
        and "stage3_prefetch_bucket_size" in _zero_fields())


def _wrapping() -> tuple[str, bool]:
    import torch.distributed.fsdp.wrap as w

    return "torch.distributed.fsdp.wrap has transformer_ / size_based_auto_wrap_policy; DeepSpeed's ZeRO config has no wrap key", (
        callable(getattr(w, "transformer_auto_wrap_policy", None)) and callable(getattr(w, "size_based_auto_wrap_policy", None))
        and not any("wrap" in k for k in _zero_fields()))


def _accumulation() -> tuple[str, bool]:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    src = inspect.getsource(DeepSpeedEngine.no_sync)
    return "FSDP.no_sync, FSDPModule.set_requires_gradient_sync; DeepSpeedEngine.no_sync asserts gradients are not partitioned", (
        hasattr(FSDP, "no_sync") and hasattr(FSDPModule, "set_requires_gradient_sync")
        and "assert not self.zero_optimization_partition_gradients()" in src)


def _mixed_precision() -> tuple[str, bool]:
    import deepspeed.runtime.config as c
    from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

    return "fields of torch MixedPrecision / MixedPrecisionPolicy; DeepSpeed reads communication_data_type", (
        {"param_dtype", "reduce_dtype", "buffer_dtype"} <= _fields(MixedPrecision)
        and {"param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs"} <= _fields(MixedPrecisionPolicy)
        and "buffer_dtype" not in _fields(MixedPrecisionPolicy) and hasattr(c, "get_communication_data_type"))


def _scaler() -> tuple[str, bool]:
    import deepspeed.runtime.constants as c
    import torch.distributed.fsdp as fsdp
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return "torch ships ShardedGradScaler (FSDP1) and no FSDP2 scaler; DeepSpeed reads fp16.loss_scale", (
        ShardedGradScaler is not None and not any("Scaler" in n for n in dir(fsdp)) and c.FP16_LOSS_SCALE == "loss_scale")


def _multi_node() -> tuple[str, bool]:
    from torch.distributed.fsdp import ShardingStrategy

    return "torch ShardingStrategy.HYBRID_SHARD; DeepSpeed zero_hpz_partition_size, zero_quantized_weights / _gradients", (
        "HYBRID_SHARD" in ShardingStrategy.__members__
        and {"zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients"} <= _zero_fields())


API: dict[str, Callable[[], tuple[str, bool]]] = {
    "sharding": _sharding, "offload": _offload, "loading": _loading, "checkpointing": _checkpointing,
    "prefetch": _prefetch, "wrapping": _wrapping, "accumulation": _accumulation, "mixed_precision": _mixed_precision,
    "scaler": _scaler, "multi_node": _multi_node,
}


def api(name: str) -> tuple[str, bool]:
    text, ok = API[name]()
    return f"framework API: {text}", bool(ok)


def launch(launcher: str) -> tuple[str, bool]:
    """The launch command shardlab exports for 2 nodes x 8 GPUs, read back by the launcher's own
    argument parser: verified when it reads 2 nodes, 8 processes per node and the training script."""
    from shardlab.export.launch import launch_command, render_command
    from shardlab.plan import Plan

    argv, _ = launch_command(Plan(framework="deepspeed", topology={"nodes": 2, "gpus_per_node": 8}), ["train.py"], launcher=launcher,
                             node_rank=0, master_addr="10.0.0.1", master_port=29500)  # what each node fills in
    try:
        ok = _READERS[launcher](argv)
    except SystemExit:  # argparse refused the command line
        ok = False
    return f"{launcher}'s own argument parser on: {render_command(argv, {})}", ok


def _torchrun_reads(argv: list[str]) -> bool:
    from torch.distributed.run import get_args_parser

    a = get_args_parser().parse_args(argv[1:])
    return (argv[0], a.nnodes, str(a.nproc_per_node), a.training_script) == ("torchrun", "2", "8", "train.py")


def _deepspeed_reads(argv: list[str]) -> bool:
    from deepspeed.launcher.runner import parse_args

    a = parse_args(argv[1:])
    return (argv[0], a.num_nodes, a.num_gpus, a.user_script) == ("deepspeed", 2, 8, "train.py")


def _accelerate_reads(argv: list[str]) -> bool:
    from accelerate.commands.launch import launch_command_parser

    a = launch_command_parser().parse_args(argv[2:])
    return (argv[:2], a.num_machines, a.num_processes, a.training_script) == (["accelerate", "launch"], 2, 16, "train.py")


_READERS = {"torchrun": _torchrun_reads, "deepspeed": _deepspeed_reads, "accelerate": _accelerate_reads}
