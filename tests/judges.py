"""The real tools as judges of shardlab's exports, shared by test_export.py and test_load.py.

Each judge feeds an exported file to the tool's own parser / validator and returns what the tool
made of it, so tests can assert on the tool's reading, not on shardlab's.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path

from hypothesis import assume
from hypothesis import strategies as st

from shardlab.plan import Plan

PLACEHOLDERS = {"$NODE_RANK": "0", "$MASTER_ADDR": "10.0.0.1", "$MASTER_PORT": "29500", "$SLURM_NODEID": "0",
                "$SLURM_JOB_ID": "4242"}


class DataParallelSize:
    """The `mpu` DeepSpeedConfig asks for the data-parallel world size."""

    def __init__(self, n: int):
        self.n = n

    def get_data_parallel_world_size(self) -> int:
        return self.n


def deepspeed_config(cfg: dict, world_size: int):
    """DeepSpeed's own parse of `cfg` for `world_size` GPUs.

    DeepSpeedConfig takes the data-parallel size from `mpu` but first asks deepspeed.comm for this
    process's rank, and without an initialised group it silently assumes a world of 1. Answering that
    one question (rank 0) avoids a process group that would outlive the test and clash with other
    tests that create their own.
    """
    from unittest import mock

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    with mock.patch.object(deepspeed.comm, "get_rank", lambda *a, **k: 0):
        return DeepSpeedConfig(cfg, mpu=DataParallelSize(world_size))


def _launch_parser_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {a.dest for a in launch_command_parser()._actions}


def accelerate_judge(yaml_text: str, ds_json: str | None = None, strict_keys: bool = True, ds_name: str = "ds_config.json") -> dict:
    """Load the YAML with accelerate's config loader and run `accelerate launch`'s own validation and
    environment builder on it; returns {'config', 'args', 'env', 'plugin'} as accelerate sees them."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "accelerate_config.yaml")
        path.write_text(yaml_text)
        if ds_json is not None:
            Path(tmp, ds_name).write_text(ds_json)
        cwd = os.getcwd()
        os.chdir(tmp)  # deepspeed_config_file is relative to where accelerate launch runs
        saved = dict(os.environ)
        try:
            config = load_config_from_file(str(path))
            dests = _launch_parser_dests()
            unknown = [k for k in list(config.fsdp_config) + list(config.deepspeed_config) if k not in dests]
            assert not (strict_keys and unknown), f"keys accelerate launch has no option for: {unknown}"
            args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
            args, defaults, mp_flag = _validate_launch_command(args)
            plugin = None
            if args.use_deepspeed:
                fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_flag else [])
                args.deepspeed_fields_from_accelerate_config = ",".join(fields)
                _, env = prepare_deepspeed_cmd_env(args)
                os.environ.update({k: v for k, v in env.items() if k.startswith("ACCELERATE")})
                from accelerate.utils import DeepSpeedPlugin

                plugin = DeepSpeedPlugin()
            else:
                env = prepare_multi_gpu_env(args)
                os.environ.update({k: v for k, v in env.items() if k.startswith(("ACCELERATE", "FSDP", "PARALLELISM"))})
                if args.use_fsdp and str(args.fsdp_version) == "2":
                    # FSDP1's plugin demands an accelerator device at construction; FSDP2's does not.
                    from accelerate.utils import FullyShardedDataParallelPlugin

                    plugin = FullyShardedDataParallelPlugin()
            return {"config": config, "args": args, "env": dict(env), "plugin": plugin, "unknown": unknown}
        finally:
            os.environ.clear()
            os.environ.update(saved)
            os.chdir(cwd)


def command_argv(text: str) -> list[str]:
    """The last line of an exported launch snippet as argv, env assignments dropped, placeholders filled."""
    line = text.strip().splitlines()[-1]
    for k, v in PLACEHOLDERS.items():
        line = line.replace(k, v)
    tokens = shlex.split(line)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    return tokens


def torchrun_args(argv: list[str]):
    from torch.distributed.run import get_args_parser

    assert argv[0] == "torchrun", argv
    return get_args_parser().parse_args(argv[1:])


# ---------------------------------------------------------------------------------------------
# Plans the validator accepts, built so most draws are valid (few rejections).


@st.composite
def valid_plans(draw, frameworks=("fsdp1", "fsdp2", "deepspeed")) -> Plan:
    fw = draw(st.sampled_from(frameworks))
    ds = fw == "deepspeed"
    sharding = draw(st.sampled_from(("ddp", "zero1", "zero2", "zero3", "hybrid") if ds else ("ddp", "zero2", "zero3", "hybrid")))
    nodes, gpn = draw(st.integers(1, 3)), draw(st.sampled_from((1, 2, 4, 8)))
    full3 = sharding in ("zero3", "hybrid")
    targets = ("none", "cpu", "nvme") if ds else ("none", "cpu")
    opt_off = draw(st.sampled_from(targets)) if sharding != "ddp" else "none"
    par_off = (draw(st.sampled_from(targets)) if ds else opt_off) if full3 else "none"
    if not ds and not full3:
        opt_off = "none"
    nvme = "nvme" in (opt_off, par_off)
    precision = draw(st.sampled_from(("fp32", "bf16", "fp16")))
    hpz = draw(st.sampled_from([h for h in (1, 2, 4, 8) if gpn % h == 0])) if ds and full3 else 1
    mbs, gas = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    auto_or = lambda lo, hi: st.one_of(st.just("auto"), st.integers(lo, hi))  # noqa: E731
    d = dict(
        framework=fw, sharding=sharding, precision=precision,
        reduce_dtype=draw(st.sampled_from(("auto", "fp32"))),
        buffer_dtype=draw(st.sampled_from(("auto", "fp32"))) if fw == "fsdp1" else "auto",
        loss_scaling=draw(st.sampled_from(("dynamic", "none"))) if fw != "fsdp2" else "dynamic",
        offload={"optimizer": opt_off, "params": par_off, "nvme_path": "/local_nvme" if nvme else None},
        activation_checkpointing=draw(st.booleans()), micro_batch_size=mbs, grad_accum_steps=gas,
        global_batch_size=draw(st.sampled_from((None, mbs * gas * nodes * gpn))),
        topology={"nodes": nodes, "gpus_per_node": gpn},
        zeropp={"quantized_weights": ds and full3 and draw(st.booleans()),
                "quantized_gradients": ds and full3 and draw(st.booleans()), "hpz_partition_size": hpz},
        wrap={"policy": draw(st.sampled_from(("transformer", "size", "none"))) if not ds else "transformer",
              "transformer_layer_cls": draw(st.sampled_from(("Block", "LlamaDecoderLayer", "GPT2Block,GPT2MLP"))),
              "min_num_params": draw(st.sampled_from((10_000, 100_000_000)))},
        backward_prefetch=draw(st.sampled_from(("backward_pre", "backward_post", "none"))) if fw == "fsdp1" else "backward_pre",
        forward_prefetch=draw(st.booleans()) if not ds else False,
        limit_all_gathers=draw(st.booleans()), sync_module_states=True, low_memory_init=draw(st.booleans()),
        checkpoint=draw(st.sampled_from(("sharded", "full", "full_16bit") if ds and full3 else ("sharded", "full"))),
        gradient_clipping=draw(st.sampled_from((None, 1.0, 0.5))),
        buckets={"reduce_bucket_size": draw(auto_or(1, 10**9)), "allgather_bucket_size": draw(auto_or(1, 10**9)),
                 "prefetch_bucket_size": draw(auto_or(1, 10**9)), "param_persistence_threshold": draw(auto_or(0, 10**6))}
        if ds else {},
        compile=draw(st.booleans()),
        optimizer={"name": draw(st.sampled_from(("adamw", "adam", "sgd"))), "lr": draw(st.sampled_from((1e-4, 3e-4, 0.01))),
                   "weight_decay": draw(st.sampled_from((0.0, 0.1)))},
    )
    plan = Plan.model_validate(d)
    assume(not plan.errors())
    return plan

