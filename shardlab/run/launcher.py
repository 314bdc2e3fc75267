"""Start a real sharded run, watch it, stop it: `launch(plan, model, steps) -> LiveRun`.

The run is started with exactly the command `shardlab export --to torchrun` prints
(`shardlab.export.launch.launch_command`), with real values for the port, node rank and run id: one
torchrun agent per node of the plan (several "nodes" on one machine meet over a c10d rendezvous on
127.0.0.1), each agent a child of ours in a session of its own, on a free port, so runs never collide
and a terminal's Ctrl-C reaches only us. A watcher thread tails the worker's metrics and events, keeps
status.json current, and ends the run on the first failure, on `timeout_s` seconds without progress,
or on cancel(); a sampler thread records the memory timeline (timeline.py). Whatever happens, every
process of the run is gone when status.json turns final.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from shardlab.plan import bad_input, load_plan
from shardlab.run import faults
from shardlab.run.host import check_run, default_device, free_port, visible_gpus
from shardlab.run.store import FINAL, JsonlTail, Run, RunFiles, create_run_dir, read_json, write_json_atomic

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
_LIVE: "set[LiveRun]" = set()
DONE_GRACE_S = 1.0  # after every rank said done, how long their processes get to exit on their own
QUEUE_MAX = 10_000  # items kept for a slow (or absent) iterator; older metrics lines are dropped, never blocking


class StatusWriteError(RuntimeError):
    """status.json could not be written: the run is ended, since its state can no longer be recorded."""


def write_status(run_dir: Path, info: dict, *, last: bool = False) -> None:
    """Write status.json atomically. When that fails (the folder deleted or made read-only), raise
    StatusWriteError; for the `last` write, first try rewriting the file in place, which a
    read-only folder still allows, so the store shows the final status and its reason."""
    path = RunFiles(run_dir).status
    try:
        write_json_atomic(path, info)
        return
    except OSError as e:
        first = e
    if last:
        try:
            with open(path, "r+") as f:
                f.write(json.dumps(info, indent=1, default=str))
                f.truncate()
            return
        except OSError:
            pass
    raise StatusWriteError(f"status.json in {run_dir} cannot be written ({first.strerror or first}); the run was stopped "
                           "because its state could no longer be recorded. Check that the run folder exists and is writable.")


def _me() -> str:
    """This process as "pid:start time", for the workers' check that their launcher still lives."""
    import psutil

    return f"{os.getpid()}:{psutil.Process().create_time():.3f}"


class _Feed:
    """The watcher -> iterator queue, bounded: when nobody reads, memory stays at QUEUE_MAX items
    (the launcher kept every metrics line, ~2.9 KB each, for the whole run); the oldest metrics are
    dropped first, status items and the end mark never."""

    def __init__(self, maxlen: int = QUEUE_MAX):
        import collections

        self.items: "collections.deque" = collections.deque()
        self.maxlen = maxlen
        self.cond = threading.Condition()
        self.dropped = 0

    def put(self, item) -> None:
        with self.cond:
            if len(self.items) >= self.maxlen:
                for i, old in enumerate(self.items):
                    if old is not None and old.get("type") == "metrics":
                        del self.items[i]
                        self.dropped += 1
                        break
            self.items.append(item)
            self.cond.notify()

    def get(self):
        with self.cond:
            while not self.items:
                self.cond.wait()
            return self.items.popleft()


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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as taskset / a container's cpuset set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# CPU ranks per core allowed: the suite's CPU matrix trains 4 gloo ranks (hybrid 2x2) on a 2-core
# machine (DESIGN.md's measured facts: 2-4 processes); 16 ranks on 2 cores (a 2x8 plan) is refused.
CPU_RANKS_PER_CORE = 2


def check_capacity(plan, nproc, device: str) -> int:
    """Processes per node, refused before anything starts if this machine cannot hold the run:
    at most CPU_RANKS_PER_CORE processes per CPU core (device cpu) or one per visible GPU (cuda).
    Returns nproc."""
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
        have = len(visible_gpus())
    if world > have:
        fit = have // nodes
        fix = (f"Pass --nproc {fit} (topology.nodes x nproc <= {have})" if fit >= 1
               else f"Use fewer topology.nodes (at most {have}) with --nproc 1")
        if device == "cuda":
            raise bad_input("nproc", f"this run needs {world} GPUs (topology.nodes={nodes} x nproc={nproc}) but this machine has {have}. {fix}, or device=cpu.")
        raise bad_input("nproc", f"this run would start {world} processes (topology.nodes={nodes} x nproc={nproc}) on a machine with {cores} CPU cores: "
                        f"more than {CPU_RANKS_PER_CORE} processes per core only slows every rank down and can exhaust memory. {fix}.")
    return nproc


class LiveRun(Run):
    """A run this process launched: the files (as Run) plus its processes, events and control.

    Iterate over it (or pass on_event to launch) to receive, in order, {"type": "metrics", ...line},
    {"type": "event", ...line} and finally {"type": "status", "status": ...}; `on_event` is called on
    the watcher thread, so keep it short and thread-safe (widgets: schedule the UI update).
    """

    def __init__(self, run_dir: Path, *, agents, sampler, steps: int, world_size: int,
                 timeout_s: float | None, on_event: Callable[[dict], None] | None, progress, info: dict,
                 watchdog=None):
        super().__init__(run_dir)
        self.agents = agents  # list of subprocess.Popen, index = node rank
        self.watchdog = watchdog  # subprocess.Popen of run/watchdog.py, its stdin our pipe
        self.sampler = sampler
        self.steps = steps
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.on_event = on_event
        self.progress = progress
        self._info = info
        self._queue = _Feed()
        self._finished = threading.Event()
        self._cancel = threading.Event()
        self._metrics = JsonlTail(self.files.metrics)
        self._events = JsonlTail(self.files.events)
        self.steps_by_rank: dict[int, int] = {}
        self.worker_events: list[dict] = []
        self._recorded: dict[int, int] = {}
        self._watcher = threading.Thread(target=self._watch, name=f"shardlab-watch-{self.id}", daemon=True)

    # ---- what the files say, or what this process knows when they cannot say it
    @property
    def info(self) -> dict:
        """status.json; once the run is over, this process's own final record when the file was
        deleted or could not be written (a run folder removed or made read-only mid-run)."""
        on_disk = super().info
        if self._finished.is_set() and on_disk.get("status") not in FINAL:
            return dict(self._info)
        return on_disk or dict(self._info)

    # ---- public control
    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the run ends (or `timeout` seconds pass); return its status. Ctrl-C raises
        KeyboardInterrupt here as usual; the run goes on until cancel()."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            self._finished.wait(poll if left is None else min(poll, left))
        return self.status

    def cancel(self, wait: float = 8.0) -> None:
        """Stop the run: every process is sent SIGTERM, then SIGKILL after 2 s; status becomes cancelled."""
        if self._finished.is_set():
            return
        self._cancel.set()
        if threading.current_thread() is not self._watcher:
            self._finished.wait(wait)

    def __iter__(self) -> Iterator[dict]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item

    @property
    def steps_done(self) -> int:
        """Steps every rank has finished."""
        if len(self.steps_by_rank) < self.world_size:
            return 0
        return min(self.steps_by_rank.values())

    # ---- the watcher
    def _emit(self, item: dict) -> None:
        self._queue.put(item)
        if self.on_event is not None:
            try:
                self.on_event(item)
            except Exception as e:  # a broken callback must not stop the watching
                print(f"shardlab: on_event callback raised {type(e).__name__}: {e}", file=sys.stderr)

    def _write_info(self, **changes) -> None:
        if self._info.get("status") == "running" and changes.get("status", "running") == "running" and self._outside_cancel():
            return  # never write over another process's cancel mark; the watcher acts on it next
        self._info.update(changes)
        write_status(self.dir, self._info)

    def _outside_cancel(self) -> bool:
        """load_run(dir).cancel() in another process marked the run cancelled (before killing it)."""
        if (read_json(self.files.status, {}) or {}).get("status") == "cancelled":
            self._cancel.set()
        return self._cancel.is_set()

    def _record_ranks(self) -> None:
        """Put the ranks' pids in status.json once known, so another process can cancel the run."""
        ranks = self.sampler.rank_of_pid()
        if len(ranks) == len(self._recorded):
            return
        self._recorded = ranks
        agents = [p for p in self._info["processes"] if p["role"].startswith("agent")]
        procs = []
        for pid, rank in sorted(ranks.items(), key=lambda x: x[1]):
            try:
                procs.append({"pid": pid, "create_time": self.sampler.ranks[rank].create_time(), "role": f"rank{rank}"})
            except Exception:
                pass
        self._write_info(processes=agents + procs)

    def _drain(self) -> bool:
        """Pass on the metrics and event lines written since the last call; True if there were any."""
        new = False
        for line in self._metrics.new():
            new = True
            if isinstance(line.get("rank"), int):
                self.steps_by_rank[line["rank"]] = self.steps_by_rank.get(line["rank"], 0) + 1
            if self.progress is not None:
                self.progress.update(line)
            self._emit({"type": "metrics", **line})
        for ev in self._events.new():
            new = True
            self.worker_events.append(ev)
            if self.progress is not None:
                self.progress.event(ev)
            self._emit({"type": "event", **ev})
        return new

    def _watch(self) -> None:
        self._emit({"type": "status", "status": "running", "id": self.id})
        last_progress = time.monotonic()
        last_written = 0.0
        failure: faults.Failure | None = None
        first_failure = all_done = None
        next_link = 0.0
        status = None
        try:
            while True:
                now = time.monotonic()
                if not self.dir.is_dir():
                    status, failure = "failed", faults.Failure("failed", None, error=f"the run folder {self.dir} was deleted while the run was going; the run was stopped.")
                    break
                if self._drain():
                    last_progress = now
                    if now - last_written > 0.5:
                        self._write_info(steps_done=self.steps_done)
                        last_written = now
                if self._cancel.is_set():
                    status = "cancelled"
                    break
                codes = [a.poll() for a in self.agents]
                # Every rank said done: the work and its metrics are complete. Interpreter and
                # torchrun teardown can take seconds on a busy machine; wait briefly, then end it.
                if len({e.get("rank") for e in self.worker_events if e.get("event") == "done"}) >= self.world_size:
                    all_done = all_done or now
                    if all(c is not None for c in codes) or now - all_done > DONE_GRACE_S:
                        status = "completed"
                        break
                if now >= next_link:
                    next_link = now + 1.0
                    faults.link_rank_logs(self.dir, self.sampler)
                    self._record_ranks()
                if self._outside_cancel():
                    status = "cancelled"
                    break
                found = faults.detect(self.worker_events, self.sampler, codes)
                if found is not None:
                    failure = found  # re-judged each pass: later evidence can name the root cause better
                    first_failure = first_failure or now
                    if now - first_failure > faults.GRACE_S or all(c is not None for c in codes):
                        status = failure.status
                        break
                if all(c is not None for c in codes):
                    status = "completed" if all(c == 0 for c in codes) else "failed"
                    break
                if self.timeout_s is not None and now - last_progress > self.timeout_s:
                    status = "timeout"
                    break
                time.sleep(0.1)
        except StatusWriteError as e:
            status, failure = "failed", faults.Failure("failed", None, error=str(e))
        except Exception as e:  # the watcher itself broke: end the run rather than leave it unwatched
            status, failure = "failed", faults.Failure("failed", None, error=f"shardlab watcher: {type(e).__name__}: {e}")
        self._finish(status, failure)

    def _finish(self, status: str, failure) -> None:
        """Stop every process, write the final status; whatever fails here, wait() returns."""
        report = {"status": status, "error": failure.error if failure else None}
        try:
            faults.kill_all(self.agents, self.sampler, self._info.get("processes"))
            self.sampler.stop()
            self._drain()  # lines written in the last moments before the end still count
            faults.link_rank_logs(self.dir, self.sampler)
            codes = [a.returncode for a in self.agents]
            report = faults.report(self.dir, status, failure, self.worker_events, self.sampler, codes,
                                   self.steps_done, self.steps)
            self._info.update(**report, steps_done=self.steps_done, ended_at=time.time())
            write_status(self.dir, self._info, last=True)
        except Exception as e:  # noqa: BLE001 - e.g. the folder deleted or read-only: the status stays in memory
            self._info.update(status=report.get("status", status), ended_at=time.time())
            if not self._info.get("error"):
                self._info["error"] = f"{type(e).__name__}: {e}"
            print(f"shardlab: run {self.id} ended {self._info['status']}, but its status could not be written: {e}", file=sys.stderr)
        finally:
            self._release_watchdog()
            if self.progress is not None:
                try:
                    self.progress.close(self._info.get("status", status))
                except Exception:
                    pass
            _LIVE.discard(self)
            self._finished.set()
            self._emit({"type": "status", "status": self._info.get("status", status), "id": self.id})
            self._queue.put(None)

    def _release_watchdog(self) -> None:
        """Tell the watchdog the run ended normally (it exits); it never acts after this."""
        w = self.watchdog
        if w is None:
            return
        try:
            w.stdin.write(b"done\n")
            w.stdin.close()
            try:
                w.wait(timeout=1)
            except Exception:  # a starved machine: reap it later, the run is over either way
                threading.Thread(target=w.wait, name="shardlab-watchdog-reap", daemon=True).start()
        except Exception:
            try:
                w.kill()
                w.wait(timeout=1)
            except Exception:
                pass


def launch(plan, model="gpt-tiny", steps: int = 10, nproc: int | None = None, device: str | None = None,
           out: str | Path | None = None, seed: int = 0, timeout_s: float | None = None, progress: bool = False,
           on_event: Callable[[dict], None] | None = None, launcher: str = "torchrun", factory: str | None = None,
           trace_memory: bool = False, instrument: bool | str = True, mem_limit_bytes: int | None = None,
           worker_module: str = "shardlab.run.worker") -> LiveRun:
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
    the launcher against a stand-in.
    Bad input raises PlanError before anything starts.
    """
    import psutil

    from shardlab.export.launch import RUNNER_ENV, launch_command, sanitized_env
    from shardlab.models import flops_per_token
    from shardlab.run.timeline import Sampler

    plan = load_plan(plan)
    device = device or default_device()
    if device not in ("cpu", "cuda"):
        raise bad_input("device", f"device={device!r} is not cpu or cuda. Use device='cpu' or device='cuda'.")
    nproc = check_capacity(plan, nproc, device)
    check_run(plan, steps=steps, nproc=nproc, device=device, launcher=launcher, instrument=instrument)
    if nproc != plan.topology.gpus_per_node:
        plan = load_plan(plan.model_copy(update={"topology": plan.topology.model_copy(update={"gpus_per_node": nproc})}))
    model_name, model_arg, spec = _model_for_worker(model)
    from shardlab.usermodel import resolve as resolve_source
    from shardlab.usermodel import with_wrap_class

    plan = with_wrap_class(plan, spec)  # a model's own block class, written into the run's plan.yaml
    if factory is None:
        from shardlab.frameworks import check_model

        # a block class the model lacks: the worker would refuse it at wrap time
        check_model(plan, resolve_source(spec.source).build("meta")[0] if spec.source else model_arg)
    nodes = plan.topology.nodes
    world = plan.world_size

    run_id, run_dir = create_run_dir(out)
    run_dir = run_dir.resolve()
    files = RunFiles(run_dir)
    files.plan.write_text(plan.to_yaml())
    write_json_atomic(files.config, {"model": model_arg, "steps": steps, "device": device, "seed": seed,
                                             "factory": factory, "trace_memory": trace_memory, "instrument": instrument})
    for name in RunFiles.APPEND_ONLY:
        (run_dir / name).touch()
    from shardlab.run.prediction import write_prediction

    write_prediction(run_dir, plan, model_arg, device, (visible_gpus() or [0])[0] if device == "cuda" else None)

    port = free_port()
    cores = os.cpu_count() or 1
    ours = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // world)),
            "SHARDLAB_RUN_DIR": str(run_dir), "SHARDLAB_LAUNCHER": _me()}
    if device == "cpu":
        ours["DS_ACCELERATOR"] = "cpu"
    gpus = visible_gpus() if device == "cuda" else []
    cmds = []
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
        cmds.append((argv, node_env))
    write_json_atomic(files.launch, {
        "launcher": launcher, "cwd": os.getcwd(), "master_port": port,
        # set for shardlab's own runs only, never written into exports (export/launch.py says why)
        "runner_env": dict(RUNNER_ENV),
        "agents": [{"node": n, "argv": a, "env": _recorded_env(sanitized_env(e), e)} for n, (a, e) in enumerate(cmds)],
    })
    info = {"id": run_id, "status": "running", "model": model_name, "framework": plan.framework,
            "sharding": plan.sharding, "precision": plan.precision, "wrap_class": spec.wrap_cls or plan.wrap.transformer_layer_cls,
            "model_params": spec.params, "flops_per_token": flops_per_token(spec), "device": device, "nodes": nodes,
            "nproc_per_node": nproc, "world_size": world, "steps": steps, "steps_done": 0, "seed": seed,
            "timeout_s": timeout_s, "started_at": time.time(), "ended_at": None, "exit_codes": None,
            "failed_rank": None, "error": None, "phase": None, "launcher_pid": os.getpid(), "processes": []}
    write_json_atomic(files.status, info)

    import subprocess

    # Started before the agents: from here on, if this process dies the watchdog ends the run.
    with open(run_dir / "logs" / "watchdog.log", "ab") as wlog:
        watchdog = subprocess.Popen([sys.executable, "-m", "shardlab.run.watchdog", str(run_dir), str(os.getpid())],
                                    stdin=subprocess.PIPE, stdout=wlog, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=sanitized_env({"PYTHONUNBUFFERED": "1"}))
    agents = []
    try:
        for node, (argv, node_env) in enumerate(cmds):
            log = open(run_dir / "logs" / f"agent{node}.log", "ab")
            agents.append(subprocess.Popen(argv, env=sanitized_env(node_env), stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd()))
            log.close()
    except OSError as e:
        for a in agents:
            a.kill()
            a.wait()
        info.update(status="failed", error=f"could not start torchrun: {e}", ended_at=time.time())
        write_json_atomic(files.status, info)
        watchdog.stdin.close()
        raise
    procs = {n: psutil.Process(a.pid) for n, a in enumerate(agents)}
    info["processes"] = [{"pid": p.pid, "create_time": p.create_time(), "role": f"agent{n}"} for n, p in procs.items()]
    write_json_atomic(files.status, info)

    gpu_index = {(n, i): gpus[n * nproc + i] for n in range(nodes) for i in range(nproc)} if gpus else None
    sampler = Sampler(files.timeline, procs, nproc_per_node=nproc, gpu_index=gpu_index)
    if mem_limit_bytes:
        sampler.on_rank = faults.limit_memory(int(mem_limit_bytes))
    sampler.start()
    bar = None
    if progress:
        from shardlab.run.progress import Progress

        bar = Progress(steps, world, desc=f"{plan.framework} {plan.sharding} {model_name}")
    run = LiveRun(run_dir, agents=agents, sampler=sampler, steps=steps, world_size=world, timeout_s=timeout_s,
                  on_event=on_event, progress=bar, info=info, watchdog=watchdog)
    _LIVE.add(run)
    run._watcher.start()
    return run


@atexit.register
def _cancel_live_runs() -> None:
    # A kernel restart or the end of a script must not leave torchrun agents training in the background.
    for run in list(_LIVE):
        try:
            run.cancel(wait=5)
        except Exception:
            pass
