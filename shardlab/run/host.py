"""What this machine offers a run, and the checks a valid plan can still fail here.

GPUs are counted through NVML (nvidia-ml-py), so choosing the default device imports no torch;
CUDA_VISIBLE_DEVICES narrows them as CUDA itself would. Runner-level checks raise PlanError via
bad_input, naming the field, the value, why, and the fix.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from shardlab.plan import Plan, bad_input


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Refuse a port that is out of range or already taken, before a server tries it (PlanError)."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise bad_input("--port", f"--port {port} is not a TCP port (1-65535). Use e.g. --port 5006.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise bad_input("--port", f"--port {port}: cannot listen on {host}:{port} ({e.strerror}; another program may be using it). Use another port, e.g. --port {5006 if port != 5006 else 5007}.") from None


def visible_gpus(env: Mapping[str, str] | None = None) -> list[int]:
    """NVML indices of the GPUs a run may use: CUDA_VISIBLE_DEVICES (numeric form) of `env` (default
    os.environ) if set, else all."""
    n = gpu_count()
    vis = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if vis is None:
        return list(range(n))
    out = []
    for part in vis.split(","):
        part = part.strip()
        if not part.isdigit():
            break  # a UUID or -1: CUDA stops at the first entry it cannot use; so do we
        if int(part) < n:
            out.append(int(part))
    return out


def gpu_count() -> int:
    """CUDA GPUs on this machine, asked of NVML (no torch import); 0 if there is no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def default_device(env: Mapping[str, str] | None = None) -> str:
    return "cuda" if visible_gpus(env) else "cpu"


def device_and_ranks(max_gpus: int = 4) -> tuple[str, int]:
    """(device, processes) for a small sharded run here: CUDA with up to `max_gpus` ranks when two or
    more GPUs are visible; otherwise 2 CPU processes over gloo. One GPU cannot show sharding (NCCL
    refuses two ranks on one device), so a single-GPU machine runs on its CPU as well."""
    n = len(visible_gpus())
    if n >= 2:
        return "cuda", min(n, max_gpus)
    return "cpu", 2


def check_run(plan: Plan, *, steps: int, nproc: int, device: str, launcher: str, instrument: bool | str = True,
              env: Mapping[str, str] | None = None, profile_step: int | None = None) -> None:
    """Runner-level checks a valid plan can still fail on this machine (PlanError naming the field);
    `env`: the run's environment (default os.environ), for the GPUs it may see."""
    if instrument not in (True, False, "alternate"):
        raise bad_input("instrument", f"instrument={instrument!r} is not true, false or 'alternate'. Use instrument=True (measure every step), False (bare loop) or 'alternate' (odd steps measured, even steps bare).")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise bad_input("steps", f"steps={steps!r} must be a whole number of at least 1 (optimizer steps to run). Use e.g. steps=10.")
    if profile_step is not None and (not isinstance(profile_step, int) or isinstance(profile_step, bool)
                                     or not 1 <= profile_step <= steps):
        raise bad_input("profile_step", f"profile_step={profile_step!r} must be a step of this run, 1 to steps={steps} (the one step run under torch.profiler). Use e.g. profile_step={min(3, steps)}, or None.")
    if nproc < 1:
        raise bad_input("nproc", f"nproc={nproc} must be at least 1 (processes per node). Use e.g. nproc=2.")
    if device not in ("cpu", "cuda"):
        raise bad_input("device", f"device={device!r} is not cpu or cuda. Use device='cpu' or device='cuda'.")
    if launcher != "torchrun":
        raise bad_input("launcher", f"launcher={launcher!r}: real runs start through torchrun only (the deepspeed and accelerate launchers are export targets). Use launcher='torchrun'.")
    from shardlab.frameworks import check_runnable

    check_runnable(plan, device)  # the same check the worker makes before wrapping
    if device != "cpu":
        have = len(visible_gpus(env))
        need = nproc * plan.topology.nodes
        if need > have:
            raise bad_input("nproc", f"this run needs {need} GPUs (nproc={nproc} x topology.nodes={plan.topology.nodes}) but this machine has {have}. Use nproc <= {have // max(plan.topology.nodes, 1) or 1}, fewer nodes, or device='cpu'.")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as taskset / a container's cpuset set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# CPU ranks per core allowed: the suite's CPU matrix trains 4 gloo ranks (hybrid 2x2) on a 2-core
# machine (DESIGN.md's measured facts: 2-4 processes); 16 ranks on 2 cores (a 2x8 plan) is refused.
CPU_RANKS_PER_CORE = 2


def check_capacity(plan, nproc, device: str, env: Mapping[str, str] | None = None) -> int:
    """Processes per node, refused before anything starts if this machine cannot hold the run:
    at most CPU_RANKS_PER_CORE processes per CPU core (device cpu) or one per GPU visible in `env`
    (default os.environ; device cuda). Returns nproc."""
    if nproc is None:
        nproc = plan.topology.gpus_per_node  # the plan's own count, stated in every message below
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise bad_input("nproc", f"nproc={nproc!r} must be a whole number of at least 1 (processes per node). "
                        f"Pass --nproc 1 (or more), or leave it out to use the plan's topology.gpus_per_node={plan.topology.gpus_per_node}.")
    nodes = plan.topology.nodes
    world = nodes * nproc
    if device == "cpu":
        cores = usable_cores()
        have = CPU_RANKS_PER_CORE * cores
    else:
        have = len(visible_gpus(env))
    if world > have:
        fit = have // nodes
        fix = (f"Pass --nproc {fit} (topology.nodes x nproc <= {have})" if fit >= 1
               else f"Use fewer topology.nodes (at most {have}) with --nproc 1")
        if device == "cuda":
            raise bad_input("nproc", f"this run needs {world} GPUs (topology.nodes={nodes} x nproc={nproc}) but this machine has {have}. {fix}, or device=cpu.")
        raise bad_input("nproc", f"this run would start {world} processes (topology.nodes={nodes} x nproc={nproc}) on a machine with {cores} CPU cores: "
                        f"more than {CPU_RANKS_PER_CORE} processes per core only slows every rank down and can exhaust memory. {fix}.")
    return nproc


def available_memory() -> int:
    """Bytes of memory this machine can still give its processes: psutil's available memory, or less where the
    process's cgroup (v2 memory.max, v1 limit_in_bytes) caps it lower."""
    import psutil

    free = psutil.virtual_memory().available
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f, open(used_file) as g:
                free = min(free, int(f.read()) - int(g.read()))
        except (OSError, ValueError):  # no such cgroup file, or "max": no limit there
            continue
    return max(0, free)


def host_memory_needed(plan: Plan, params: int, ranks: int, device: str, zero_init: bool) -> tuple[int, str]:
    """(bytes, what they are): a lower bound on the memory the run's `ranks` processes on this machine need at once.
    Each builds the whole model in fp32 before it is wrapped (run/build.py), except under low_memory_init: FSDP builds
    it on rank 0 alone (the others on the meta device), and DeepSpeed ZeRO-3 builds a user model partitioned under
    zero.Init (`zero_init`; shardlab's own models are built whole on every rank). On a CPU the training states live
    here too: fp32 parameters, gradients and optimizer states, at least one copy of each across the ranks."""
    from shardlab.estimate.basis import OPTIMIZER_STATE_BYTES

    zero3 = plan.sharding in ("zero3", "hybrid")
    one_copy = plan.low_memory_init and (plan.framework != "deepspeed" or (zero3 and zero_init))
    builders = 1 if one_copy else ranks
    build = builders * 4 * params
    how = (f"the model built in fp32 by {'one process' if builders == 1 else f'each of its {ranks} processes'} "
           f"({builders} x 4 B x {params:,} parameters)")
    if device == "cpu":
        per_param = 8 + OPTIMIZER_STATE_BYTES[plan.optimizer.name]
        if per_param * params > build:
            return per_param * params, (f"its training states ({per_param} B x {params:,} parameters: fp32 weights, "
                                        f"gradients and {plan.optimizer.name} states, fully sharded)")
    return build, how


def check_host_memory(plan: Plan, params: int, ranks: int, device: str, model_name: str, zero_init: bool) -> None:
    """Refuse a run this machine's memory cannot hold even at the lower bound of host_memory_needed (PlanError), rather
    than let the kernel's out-of-memory killer end a rank with SIGKILL minutes later (session 19: a 6.7B-parameter
    hf:llama on the 24 GiB machine's CPU ended "rank 0 was killed by SIGKILL")."""
    need, what = host_memory_needed(plan, params, ranks, device, zero_init)
    have = available_memory()
    if need <= have:
        return
    gib = 2**30
    fix = "Use a smaller model (fewer layers or a narrower hidden size)"
    if what.startswith("the model built") and ranks > 1:
        fix += ", fewer processes (--nproc)"
        if not plan.low_memory_init:
            fix += ", low_memory_init: true (FSDP builds the model on rank 0 only)"
    raise bad_input("model", f"model={model_name!r} needs at least {need / gib:.1f} GiB of this machine's memory for {what}; "
                    f"{have / gib:.1f} GiB is available. {fix}, or a machine with more memory.")
