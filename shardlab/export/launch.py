"""Launch commands: Plan -> (argv, env) for torchrun, the deepspeed launcher and accelerate launch.

Building a command is separate from running it: `shardlab export --to torchrun` prints what
`launch_command` returns, and the runner (shardlab/run/) executes the very same argv, only with real
values where the export shows placeholders ($MASTER_ADDR, $NODE_RANK, ...). `env` holds only the
variables the command itself needs (none by default, so an exported command is portable);
`sanitized_env` merges them into a real environment together with RUNNER_ENV, the settings that only
shardlab's own runs on this kind of machine need.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Literal, Mapping, Sequence

from shardlab.plan import Plan

Launcher = Literal["torchrun", "deepspeed", "accelerate"]

# NVLink multicast (NVLS) stays off in the runs shardlab starts itself: on the GPU hosts this project is
# measured on it is not available to containers and NCCL / symmetric memory fail when they try it.
# These are NOT written into exported commands: on a real NVSwitch cluster they would turn NVLink SHARP
# off for no reason of the user's. The runner records them in each run's launch.json ("runner_env").
RUNNER_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def sanitize_arch_list(value: str) -> str:
    """'9.0a;8.0+PTX' -> '9.0;8.0+PTX': DeepSpeed's op builder cannot parse arch suffixes such as 'a'."""
    parts = re.split(r"[;\s]+", value.strip())
    fixed = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", p) for p in parts if p]
    return ";".join(dict.fromkeys(fixed))


SAFE_ENV = RUNNER_ENV  # the older name, kept for importers


def extensions_dir(prefix: str | None = None) -> str:
    """Where this environment keeps its JIT-built C++ ops (DeepSpeed's CPU Adam, shm comm):
    $TORCH_EXTENSIONS_DIR if set, else <venv>/torch_extensions. One folder per environment, so two
    environments sharing ~/.cache (built against different torch versions) never rebuild each other's ops."""
    import sys

    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(prefix or sys.prefix, "torch_extensions")


def sanitized_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child-process environment for shardlab's own runs: `base` (default os.environ) + RUNNER_ENV +
    the per-environment TORCH_EXTENSIONS_DIR (unless set) + `extra`, arch list fixed."""
    env = dict(os.environ if base is None else base)
    env.update(RUNNER_ENV)
    env.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    if extra:
        env.update(extra)
    if env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = sanitize_arch_list(env["TORCH_CUDA_ARCH_LIST"])
    return env


def launch_command(
    plan: Plan,
    program: Sequence[str] = ("train.py",),
    *,
    launcher: Launcher = "torchrun",
    nproc_per_node: int | None = None,
    nnodes: int | None = None,
    node_rank: int | str = "$NODE_RANK",
    master_addr: str = "$MASTER_ADDR",
    master_port: int | str = "$MASTER_PORT",
    run_id: str = "shardlab",
    torchrun: Sequence[str] = ("torchrun",),
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the shardlab-set environment that start `program` on one node of the plan.

    `program` is the training script and its arguments; a leading "-m" runs a module. One node with
    no explicit address binds the rendezvous to 127.0.0.1 on `master_port`. `env`: variables the
    command must carry (none by default; the runner adds RUNNER_ENV itself through sanitized_env).
    """
    nproc = nproc_per_node or plan.topology.gpus_per_node
    nodes = nnodes or plan.topology.nodes
    env = dict(env or {})
    single = nodes == 1
    addr = "127.0.0.1" if single and master_addr == "$MASTER_ADDR" else master_addr
    if launcher == "torchrun":
        argv = [*torchrun, f"--nnodes={nodes}", f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={addr}:{master_port}", f"--rdzv-id={run_id}"]
        if not single:
            argv.append(f"--node-rank={node_rank}")
        argv += ["--max-restarts=0", *program]
    elif launcher == "deepspeed":
        argv = ["deepspeed"]
        if not single:
            argv += ["--hostfile=hostfile", f"--num_nodes={nodes}"]
        argv += [f"--num_gpus={nproc}", f"--master_addr={addr}", f"--master_port={master_port}"]
        prog = list(program)
        if prog and prog[0] == "-m":
            argv.append("--module")
            prog = prog[1:]
        argv += [*prog, "--deepspeed_config", config_file or "ds_config.json"]
    elif launcher == "accelerate":
        argv = ["accelerate", "launch", f"--config_file={config_file or 'accelerate_config.yaml'}",
                f"--num_machines={nodes}", f"--num_processes={nodes * nproc}",
                f"--main_process_ip={addr}", f"--main_process_port={master_port}"]
        if not single:
            argv.append(f"--machine_rank={node_rank}")
        prog = list(program)
        if prog and prog[0] == "-m":
            argv.append("-m")
            prog = prog[1:]
        argv += prog
    else:
        raise ValueError(f"launcher={launcher!r} is not one of torchrun, deepspeed, accelerate")
    return argv, env


def render_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """A shell line: env assignments then the command; $VARIABLES stay expandable."""
    def q(s: str) -> str:
        return s if re.fullmatch(r"[\w@%+=:,./$-]+", s) else shlex.quote(s)

    return " ".join([*(f"{k}={q(v)}" for k, v in env.items()), *map(q, argv)])
