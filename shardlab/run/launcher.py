"""Start a real sharded run: `launch(plan, model, steps) -> LiveRun` (liverun.py watches and stops it).

The run is started with exactly the command `shardlab export --to torchrun` prints
(`shardlab.export.launch.launch_command`), with real values for the port, node rank and run id: one
torchrun agent per node of the plan (several "nodes" on one machine meet over a c10d rendezvous on
127.0.0.1), each agent a child of ours in a session of its own, on a free port, so runs never collide
and a terminal's Ctrl-C reaches only us. Before any process starts, launch() refuses what the worker
would refuse (host.check_capacity, host.check_run, frameworks.check_model). The LiveRun's watcher
thread then follows the run (liverun.py); a sampler thread records the memory timeline (timeline.py).
Whatever happens, every process of the run is gone when status.json turns final.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

from shardlab.plan import bad_input, load_plan
from shardlab.run import faults
from shardlab.run.host import CPU_RANKS_PER_CORE, check_capacity, check_host_memory, check_run, default_device, free_port, usable_cores, visible_gpus
from shardlab.run.liveness import boot_start, process_record
from shardlab.run.liverun import _LIVE, DONE_GRACE_S, QUEUE_MAX, LiveRun, StatusWriteError, write_status
from shardlab.run.store import RunFiles, create_run_dir, write_json_atomic

# Re-exported: these lived here before liverun.py / host.py took them.
__all__ = ["CPU_RANKS_PER_CORE", "DONE_GRACE_S", "QUEUE_MAX", "RECORDED_ENV", "LiveRun", "StatusWriteError",
           "check_capacity", "launch", "usable_cores", "write_status"]

# The launching environment's variables copied into launch.json (besides the ones shardlab sets):
# an allow-list of the settings that change how a run behaves, by exact name. Anything else (a
# token, a password, a path list such as PYTHONPATH) is never written into the run folder, whatever
# it is called; a deny-list of "secret-looking" names missed NCCL_PASSWD, DS_API_PASS, OMP_PWD.
RECORDED_ENV = frozenset({
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_LAUNCH_BLOCKING", "CUDA_DEVICE_ORDER",
    "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_IB_DISABLE", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE",
    "NCCL_NVLS_ENABLE", "NCCL_ALGO", "NCCL_PROTO", "NCCL_SOCKET_IFNAME", "NCCL_MIN_NCHANNELS",
    "NCCL_MAX_NCHANNELS", "NCCL_BUFFSIZE", "NCCL_CUMEM_ENABLE", "NCCL_NET_GDR_LEVEL",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT", "TORCH_DISTRIBUTED_DEBUG",
    "TORCH_CPP_LOG_LEVEL", "TORCH_CUDA_ARCH_LIST", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "TORCH_EXTENSIONS_DIR",
    "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_NO_CUDA_MEMORY_CACHING",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR", "DS_BUILD_OPS", "NVSHMEM_DISABLE_NVLS",
    "GLOO_SOCKET_IFNAME", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "MASTER_ADDR", "MASTER_PORT",
})

_SHAPE_KEYS = ("name", "family", "layers", "hidden", "heads", "vocab", "seq_len", "kv_heads", "ffn_hidden")


def _my_boot_start() -> float:
    """When this process started, in seconds after boot (liveness.boot_start: the same figure in every process,
    whatever the clock does), as status.json's launcher_boot_start and SHARDLAB_LAUNCHER carry it."""
    import psutil

    return round(boot_start(psutil.Process()), 3)


def _me() -> str:
    """This process as "pid:seconds after boot it started", for the workers' check that their launcher still lives."""
    return f"{os.getpid()}:{_my_boot_start():.3f}"


def _model_for_worker(model):
    """(display name, what run.json carries: a preset name, a shape dict or a model source, the ModelSpec)."""
    from shardlab.models import PRESETS, resolve_model
    from shardlab.usermodel import source_of

    if hasattr(model, "named_parameters"):
        raise bad_input("model", f"model={type(model).__name__} is an nn.Module object, which the training processes cannot receive. "
                        "Pass the function that builds it as model='module:function' (or the function itself).")
    if callable(model) and not isinstance(model, str):
        model = source_of(model)  # a factory function: its 'module:function' travels to the workers
    spec = resolve_model(model)
    if spec.source is not None:
        return spec.name, spec.source, spec
    if spec.is_bare:
        raise bad_input("model", f"model={model!r} is a bare parameter count; a real run needs a shape. Use a preset (e.g. gpt-tiny) or a shape file with layers, hidden, heads, vocab, seq_len.")
    if isinstance(model, str) and model in PRESETS:
        return model, model, spec
    shape = {k: v for k, v in spec.to_dict().items() if k in _SHAPE_KEYS and v is not None}
    return spec.name, shape, spec


def _recorded_env(env: dict[str, str], ours: dict[str, str]) -> dict[str, str]:
    """What launch.json records: allow-listed variables of `env`, plus what shardlab itself set."""
    keep = {k: v for k, v in env.items() if k in RECORDED_ENV}
    keep.update(ours)
    return dict(sorted(keep.items()))


def launch(plan, model="gpt-tiny", steps: int = 10, nproc: int | None = None, device: str | None = None,
           out: str | Path | None = None, seed: int = 0, timeout_s: float | None = None, progress: bool = False,
           on_event: Callable[[dict], None] | None = None, launcher: str = "torchrun", factory: str | None = None,
           trace_memory: bool = False, instrument: bool | str = True, mem_limit_bytes: int | None = None,
           worker_module: str = "shardlab.run.worker", env: Mapping[str, str] | None = None,
           cwd: str | Path | None = None, profile_step: int | None = None) -> LiveRun:
    """Start `plan` for real on this machine and return at once (call .wait() to block).

    out: the run store (default: $SHARDLAB_RUNS_DIR, else ./runs; see store.default_runs_dir).
    nproc: processes per node (default: the plan's topology.gpus_per_node; the plan written to the
    run folder says what really ran). device: 'cuda' if a GPU is present, else 'cpu'. timeout_s:
    seconds without a new metrics or event line before the run is stopped as 'timeout' (start-up
    counts). mem_limit_bytes: an address-space limit (RLIMIT_AS) put on each rank as soon as it
    starts: on a CPU this is how a run is made to meet an out-of-memory failure on purpose.
    model: a preset, a shape file or dict, a model source ('hf:llama hidden_size=64 ...', a Hugging
    Face config.json, 'module:function'; see shardlab/usermodel.py) or a factory function defined in
    an importable module. instrument: True measures every step; False runs the bare loop (loss and timings only);
    "alternate" measures odd steps and runs even steps bare, for comparing the two in one run.
    worker_module: the program torchrun runs (`python -m worker_module RUN_DIR`); only for testing
    the launcher against a stand-in. profile_step: one step (1..steps) run under torch.profiler; its
    metrics line gains `profile` (run/profile.py: the GPU's busy time, the host's own and its waits).
    env: the environment the run's processes start from (default: os.environ as it is now), before
    shardlab adds its own variables; every variable launch() passes on to them (OMP_NUM_THREADS,
    CUDA_VISIBLE_DEVICES, TORCH_EXTENSIONS_DIR, ...) is read from it, never from os.environ. A program that
    starts runs from one thread while another changes os.environ (a test suite, a server) passes a copy
    taken while os.environ was as the runs need it. cwd: the agents' working folder (default: the
    current one), where a 'module:function' factory's module is imported from.
    Bad input raises PlanError before anything starts.
    """
    timeout_s = _checked_args(seed, timeout_s, out)
    env = dict(os.environ if env is None else env)  # one copy: every later read sees the same variables
    cwd = str(Path(cwd if cwd is not None else os.getcwd()).resolve())
    device = device or default_device(env)
    plan, nproc, (model_name, model_arg, spec) = _checked(plan, model, steps, nproc, device, launcher, instrument, factory, env,
                                                          profile_step)
    run_id, run_dir = create_run_dir(out)
    run_dir = run_dir.resolve()
    gpus = visible_gpus(env) if device == "cuda" else []
    _write_inputs(run_dir, plan, model_arg, steps, device, seed, factory, trace_memory, instrument, gpus, profile_step)
    cmds = _agent_commands(plan, run_dir, run_id, nproc, device, gpus, worker_module, launcher, env, cwd)
    info = _first_status(run_id, plan, model_name, spec, device, nproc, steps, seed, timeout_s)
    write_json_atomic(RunFiles(run_dir).status, info)
    watchdog, agents = _start_processes(run_dir, cmds, info, env, cwd)
    sampler = _start_sampler(run_dir, agents, info, nproc, gpus, mem_limit_bytes)
    bar = None
    if progress:
        from shardlab.run.progress import Progress

        bar = Progress(steps, plan.world_size, desc=f"{plan.framework} {plan.sharding} {model_name}")
    run = LiveRun(run_dir, agents=agents, sampler=sampler, steps=steps, world_size=plan.world_size, timeout_s=timeout_s,
                  on_event=on_event, progress=bar, info=info, watchdog=watchdog)
    _LIVE.add(run)
    run._watcher.start()
    return run


def _checked_args(seed, timeout_s, out) -> float | None:
    """launch()'s plain arguments, checked before anything starts (PlanError naming each); the timeout as a float. From
    Python, timeout_s='x' and seed='x' started a run that failed later, and out=5 raised a TypeError (session 19)."""
    import numbers

    from shardlab.safe_input import finite_number, short

    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise bad_input("seed", f"seed={short(seed)} must be a whole number of at least 0 (it seeds the weights and the batches). Use e.g. seed=0.")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise bad_input("out", f"out={short(out)} is not a folder path. Give the run store's folder, e.g. out='runs', or leave it out.")
    return None if timeout_s is None else finite_number("timeout_s", timeout_s, positive=True)


def _checked(plan, model, steps, nproc, device, launcher, instrument, factory, env, profile_step=None):
    """(plan as it will run, nproc, (model name, model for run.json, ModelSpec)); PlanError for
    anything the worker would refuse, before a file is written or a process started."""
    plan = load_plan(plan)
    if device not in ("cpu", "cuda"):
        raise bad_input("device", f"device={device!r} is not cpu or cuda. Use device='cpu' or device='cuda'.")
    nproc = check_capacity(plan, nproc, device, env)
    check_run(plan, steps=steps, nproc=nproc, device=device, launcher=launcher, instrument=instrument, env=env,
              profile_step=profile_step)
    if nproc != plan.topology.gpus_per_node:
        plan = load_plan(plan.model_copy(update={"topology": plan.topology.model_copy(update={"gpus_per_node": nproc})}))
    model_name, model_arg, spec = _model_for_worker(model)
    # every node's ranks run on this machine; a user model under DeepSpeed ZeRO-3 is built under zero.Init (run/build.py)
    check_host_memory(plan, spec.params, nproc * plan.topology.nodes, device, model_name, zero_init=spec.source is not None)
    from shardlab.usermodel import resolve as resolve_source
    from shardlab.usermodel import with_wrap_class

    plan = with_wrap_class(plan, spec)  # a model's own block class, written into the run's plan.yaml
    if factory is None:
        from shardlab.frameworks import check_model

        built = resolve_source(spec.source).build("meta")[0] if spec.source else None
        # a block class the model lacks: the worker would refuse it at wrap time
        check_model(plan, built if built is not None else model_arg)
        if built is not None and not any(p.requires_grad for p in built.parameters()):
            # every weight frozen: the first backward failed ("element 0 of tensors does not require grad"), exit 1
            raise bad_input("model", f"model={model_name!r} has no trainable parameters (every one has requires_grad=False), so a "
                            "training step has nothing to compute gradients for. Leave some parameters trainable in the factory.")
    return plan, nproc, (model_name, model_arg, spec)


def _write_inputs(run_dir: Path, plan, model_arg, steps, device, seed, factory, trace_memory, instrument, gpus,
                  profile_step=None) -> None:
    """plan.yaml, run.json, the empty append-only files and prediction.json: what the worker reads."""
    files = RunFiles(run_dir)
    files.plan.write_text(plan.to_yaml())
    config = {"model": model_arg, "steps": steps, "device": device, "seed": seed, "factory": factory,
              "trace_memory": trace_memory, "instrument": instrument}
    if profile_step is not None:  # only when asked: run.json's keys are what readers of older folders know
        config["profile_step"] = profile_step
    write_json_atomic(files.config, config)
    for name in RunFiles.APPEND_ONLY:
        (run_dir / name).touch()
    from shardlab.run.prediction import write_prediction

    write_prediction(run_dir, plan, model_arg, device, (gpus or [0])[0] if device == "cuda" else None)


def _agent_commands(plan, run_dir: Path, run_id: str, nproc: int, device: str, gpus: list, worker_module: str,
                    launcher: str, env: Mapping[str, str], cwd: str) -> list[tuple[list[str], dict]]:
    """(argv, full environment) of each node's torchrun agent: the exported launch command with this run's
    values, its environment `env` + shardlab's variables. Records them (only RECORDED_ENV of `env`) in launch.json."""
    from shardlab.export.launch import RUNNER_ENV, launch_command, sanitized_env

    nodes, port = plan.topology.nodes, free_port()
    cores = os.cpu_count() or 1
    ours = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or str(max(1, cores // plan.world_size)),
            "SHARDLAB_RUN_DIR": str(run_dir), "SHARDLAB_LAUNCHER": _me()}
    if device == "cpu":
        ours["DS_ACCELERATOR"] = "cpu"
    cmds, recorded = [], []
    for node in range(nodes):
        argv, set_env = launch_command(
            plan, ["-m", worker_module, str(run_dir)], launcher="torchrun", nproc_per_node=nproc, nnodes=nodes,
            node_rank=node, master_addr="127.0.0.1", master_port=port, run_id=run_id,
            torchrun=[sys.executable, "-m", "torch.distributed.run"])
        # torchrun's own per-rank log files: logs/node{n}/<run id>_*/attempt_0/<local rank>/std{out,err}.log
        argv = [*argv[:-3], f"--log-dir={run_dir / 'logs' / f'node{node}'}", "--redirects=3", *argv[-3:]]
        node_env = {**set_env, **ours}
        if device == "cuda" and nodes > 1:
            # "nodes" sharing one machine: each agent sees its own slice of the GPUs
            node_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus[node * nproc:(node + 1) * nproc])
        cmds.append((argv, sanitized_env(node_env, base=env)))
        recorded.append(_recorded_env(cmds[-1][1], node_env))
    write_json_atomic(RunFiles(run_dir).launch, {
        "launcher": launcher, "cwd": cwd, "master_port": port,
        # set for shardlab's own runs only, never written into exports (export/launch.py says why)
        "runner_env": dict(RUNNER_ENV),
        "agents": [{"node": n, "argv": a, "env": recorded[n]} for n, (a, _) in enumerate(cmds)],
    })
    return cmds


def _first_status(run_id, plan, model_name, spec, device, nproc, steps, seed, timeout_s) -> dict:
    """status.json as the run starts: what runs, where, and no processes yet."""
    from shardlab.models import flops_per_token

    return {"id": run_id, "status": "running", "model": model_name, "framework": plan.framework,
            "sharding": plan.sharding, "precision": plan.precision, "wrap_class": spec.wrap_cls or plan.wrap.transformer_layer_cls,
            "model_params": spec.params, "flops_per_token": flops_per_token(spec), "device": device,
            "nodes": plan.topology.nodes, "nproc_per_node": nproc, "world_size": plan.world_size, "steps": steps,
            "steps_done": 0, "seed": seed, "timeout_s": timeout_s, "started_at": time.time(), "ended_at": None,
            "exit_codes": None, "failed_rank": None, "error": None, "phase": None, "launcher_pid": os.getpid(),
            "launcher_boot_start": _my_boot_start(), "oom_kills_at_start": faults.kernel_oom_kills(), "processes": []}


def _start_processes(run_dir: Path, cmds, info: dict, env: Mapping[str, str], cwd: str):
    """(watchdog, agents): the watchdog first (from then on, if this process dies the watchdog ends the
    run), then one torchrun agent per node (each with its full environment from `cmds`), each in a session
    of its own, all in `cwd`. Their pids go into status.json."""
    import subprocess

    import psutil

    from shardlab.export.launch import sanitized_env

    files = RunFiles(run_dir)
    with open(run_dir / "logs" / "watchdog.log", "ab") as wlog:
        watchdog = subprocess.Popen([sys.executable, "-m", "shardlab.run.watchdog", str(run_dir), str(os.getpid())],
                                    stdin=subprocess.PIPE, stdout=wlog, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=sanitized_env({"PYTHONUNBUFFERED": "1"}, base=env), cwd=cwd)
    agents = []
    try:
        for node, (argv, node_env) in enumerate(cmds):
            log = open(run_dir / "logs" / f"agent{node}.log", "ab")
            agents.append(subprocess.Popen(argv, env=node_env, stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd))
            log.close()
    except OSError as e:
        for a in agents:
            a.kill()
            a.wait()
        info.update(status="failed", error=f"could not start torchrun: {e}", ended_at=time.time())
        write_json_atomic(files.status, info)
        watchdog.stdin.close()
        raise
    procs = [psutil.Process(a.pid) for a in agents]
    info["processes"] = [process_record(p, f"agent{n}") for n, p in enumerate(procs)]
    write_json_atomic(files.status, info)
    return watchdog, agents


def _start_sampler(run_dir: Path, agents, info: dict, nproc: int, gpus: list, mem_limit_bytes: int | None):
    """The memory timeline's sampler over the agents' process trees (and the per-rank memory limit)."""
    import psutil

    from shardlab.run.timeline import Sampler

    nodes = len(agents)
    procs = {n: psutil.Process(a.pid) for n, a in enumerate(agents)}
    gpu_index = {(n, i): gpus[n * nproc + i] for n in range(nodes) for i in range(nproc)} if gpus else None
    sampler = Sampler(RunFiles(run_dir).timeline, procs, nproc_per_node=nproc, gpu_index=gpu_index)
    if mem_limit_bytes:
        sampler.on_rank = faults.limit_memory(int(mem_limit_bytes))
    sampler.start()
    return sampler


@atexit.register
def _cancel_live_runs() -> None:
    # A kernel restart or the end of a script must not leave torchrun agents training in the background.
    for run in list(_LIVE):
        try:
            run.cancel(wait=5)
        except Exception:
            pass
