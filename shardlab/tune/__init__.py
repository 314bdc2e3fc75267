"""`shardlab tune`: the fastest (or largest-batch, or smallest) way to train a model on given GPUs.

`tune(model, gpus=1, ...) -> TuneResult`: enumerate candidate plans (space.py), drop the invalid and
those that do not fit by the memory estimate with a margin, rank the rest by the estimate, and
confirm the best few with short real runs through the ordinary runner until the measured best beats
every unrun candidate's optimistic prediction or the budget is spent (search.py, trials.py). Each
trial times a few seconds of steps and reports the median with its spread (window.py); two trials
whose intervals overlap are not told apart, and the top two are re-measured when the budget allows. The
result (result.py) holds the pick as a Plan, the ranked table and the Pareto data. Without a GPU the
trials run as CPU processes (small models only); a budget of 0 (`dry_run=True`) ranks by estimate
alone for any target GPU and runs nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from shardlab.plan import bad_input

from .result import TuneResult
from .search import GOALS, MEMORY_MARGIN, STEP_ERROR_BOUND, Budget, check_goal, predict, rank, search
from .space import FRAMEWORKS, Candidate, Space, candidates, reject_unrunnable
from .window import WINDOW_S

# Largest model (parameters) tune runs trials of on CPU processes: gpt-tiny (0.7M) trains in seconds
# there; a 30M model already takes tens of seconds a step on the 2-core machines the labs run on.
CPU_MAX_PARAMS = 30_000_000
DEFAULT_WARMUP = 3  # untimed steps per trial; the timed ones cover window.WINDOW_S seconds unless steps is given


def _target(device: str, gpu: str | None):
    """(GPU-table entry to price and fit against, calibration argument for estimate)."""
    from shardlab.estimate import get_gpu
    from shardlab.estimate.calibrate import CPU_DEVICE, find

    if gpu is not None:
        return get_gpu(gpu), None
    if device == "cpu":
        return CPU_DEVICE, (find("cpu") or False)  # as run/prediction.py prices a CPU run
    from shardlab.run.prediction import gpu_table_name_nvml

    name = gpu_table_name_nvml(0)
    if name is None:
        raise bad_input("gpu", "the GPU of this machine is not in the GPU table; name it. Pass --gpu NAME (shardlab estimate --help lists them).")
    return get_gpu(name), None


def _check_cpu_model(spec) -> None:
    if spec.params > CPU_MAX_PARAMS:
        raise bad_input("model", f"model={spec.name} has {spec.params:,} parameters: too large for trial runs on CPU processes "
                        f"(at most {CPU_MAX_PARAMS:,}; each trial would take minutes). Use --dry-run (rank by estimate for a target "
                        "--gpu), run on a machine with a GPU, or tune a small model such as gpt-tiny.")


def _checked_budget(goal, budget, dry_run, gpus, nodes, steps, warmup) -> Budget:
    """tune()'s arguments checked (PlanError naming the field otherwise); the trial budget."""
    check_goal(goal)
    b = Budget.parse(budget)  # checked even when dry_run makes it 0: a bad value is a mistake either way
    if not isinstance(dry_run, bool):
        raise bad_input("dry_run", f"dry_run={dry_run!r} must be True or False. Use dry_run=True to rank by estimate only.")
    b = Budget(runs=0) if dry_run else b
    for name, v in (("gpus", gpus), ("nodes", nodes)) + ((("steps", steps),) if steps is not None else ()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad_input(name, f"{name}={v!r} must be a whole number of at least 1. Use e.g. --{name} 1.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise bad_input("warmup", f"warmup={warmup!r} must be a whole number of at least 0 (untimed steps at the start of each trial).")
    if steps is not None and steps <= warmup:  # the CLI has no --warmup: name what its user set (was "warmup=3 must be ...")
        raise bad_input("steps", f"steps={steps} leaves no step to time after each trial's {warmup} warm-up steps. "
                        f"Use --steps {warmup + 1} or more (e.g. --steps {warmup + 5}), or a smaller warmup from Python.")
    return b


def _check_host(base, gpus: int, device: str) -> None:
    """Trial runs need the GPUs (or CPU cores) here: refused before the search, naming --gpus / --nodes."""
    from shardlab.plan import PlanError
    from shardlab.run.host import check_capacity

    try:
        check_capacity(base, gpus, device)
    except PlanError as e:
        why = str(e).split(". ")[0].removeprefix("error: ").replace("nproc=", "gpus=")
        raise bad_input("gpus", f"trial runs of --nodes {base.topology.nodes} x --gpus {gpus} on device={device} cannot start here: {why}. "
                        "Use fewer --gpus / --nodes, --device cpu (small models), or rank by estimate only: --dry-run --gpu NAME.") from None


def _space_for(space: Space | None, frameworks, global_batch, cpu_trials: bool) -> Space:
    """What to vary: the given Space or the default one, narrowed to `frameworks` / a fixed global batch."""
    defaulted = space is None
    space = space or Space()
    if frameworks is not None:
        names = frameworks.split(",") if isinstance(frameworks, str) else frameworks
        if not isinstance(names, (list, tuple)) or not all(isinstance(f, str) for f in names):
            raise bad_input("frameworks", f"frameworks={str(frameworks)[:60]!r} must be names: a comma-separated string or a list "
                            f"of some of {', '.join(FRAMEWORKS)}. Use e.g. frameworks='fsdp2,deepspeed'.")
        space.frameworks = tuple(f.strip() for f in names if f.strip())
    if global_batch is not None:
        space.global_batch = global_batch
    if cpu_trials and defaulted:
        space.compile = (False,)  # torch.compile on CPU processes needs a C++ toolchain and minutes: not by default
    return space


def tune(model: Any = "gpt-tiny", gpus: int = 1, nodes: int = 1, gpu: str | None = None, goal: str = "fastest",
         budget: Any = 5, frameworks=None, dry_run: bool = False, out=None, *, device: str | None = None,
         space: Space | None = None, base=None, global_batch: int | None = None, steps: int | None = None,
         warmup: int = DEFAULT_WARMUP, window_s: float = WINDOW_S, bound: float = STEP_ERROR_BOUND, margin: float = MEMORY_MARGIN,
         on_event: Callable[[dict], None] | None = None, cancel=None, runner=None, timeout_s: float = 300,
         launch_kw: dict | None = None) -> TuneResult:
    """Search plans for `model` on `nodes` x `gpus` GPUs (or CPU processes) and return the TuneResult.

    gpu: the GPU-table name to price and fit against (default: this machine's GPU; on a CPU run the
    CPU stand-in). budget: trial runs (int / '5') or minutes ('10m'); 0 ranks by estimate only, as
    dry_run=True does. frameworks: a subset of fsdp1, fsdp2, deepspeed (list or comma-separated).
    out: the run store for the trials (default: the usual one). space: what to vary (space.Space);
    base: the plan the unvaried settings come from. global_batch: sequences per optimizer step, fixed
    (accumulation = global / (micro-batch x GPUs)). steps: steps per trial, fixed; None (the default):
    `warmup` untimed steps, then enough to time `window_s` seconds at the candidate's predicted step
    time (window.py, bounded). on_event: called with each trial's start and end
    ({"type": "trial", ...}) and every runner line (launch's on_event). cancel: a threading.Event;
    setting it stops the current trial run (no process left) and the search. runner: what runs a
    trial (a callable taking a Candidate; tests pass a stand-in), a TrialRunner if None; launch_kw:
    more arguments for each trial's launch() (the GPU benchmark passes its worker_module).
    """
    from shardlab.models import resolve_model
    from shardlab.plan import Plan, load_plan
    from shardlab.run.host import default_device
    from shardlab.run.store import new_run_id

    t0 = time.monotonic()
    b = _checked_budget(goal, budget, dry_run, gpus, nodes, steps, warmup)
    device = device or default_device()
    space = _space_for(space, frameworks, global_batch, cpu_trials=device == "cpu" and not b.zero)
    spec = resolve_model(model)
    if not b.zero and device == "cpu":
        _check_cpu_model(spec)
    base = load_plan(base if base is not None else Plan(), check=False)
    base = base.model_copy(update={"topology": base.topology.model_copy(update={"nodes": nodes, "gpus_per_node": gpus})})
    if not b.zero and runner is None:
        _check_host(base, gpus, device)
    target, calibration = _target(device if not b.zero else (device if gpu is None else "cuda"), gpu)
    cands = candidates(space, base)
    if not b.zero:  # trials run here: what this device cannot run is no candidate (ranking alone prices any plan)
        reject_unrunnable(cands, device)
    predict(cands, spec, target, calibration, margin)
    tune_id = new_run_id()
    settings = {"model": spec.name, "params": spec.params, "gpus": gpus, "nodes": nodes, "target": target.name,
                "device": device if not b.zero else None, "goal": goal, "budget": str(b), "steps": steps, "warmup": warmup,
                "window_s": None if steps else window_s,
                "step_error_bound": bound, "memory_margin": margin, "frameworks": list(space.frameworks),
                "global_batch": space.global_batch}
    import threading

    cancel = cancel if cancel is not None else threading.Event()
    if runner is None and not b.zero:
        from .trials import TrialRunner

        runner = TrialRunner(model, device=device, nproc=gpus, steps=steps, warmup=warmup, out=out, tune_id=tune_id,
                             timeout_s=timeout_s, on_event=on_event, cancel=cancel, launch_kw=launch_kw, window_s=window_s)
    stop = search(cands, goal, b, runner, bound=bound, margin=margin, on_event=on_event, cancelled=cancel.is_set)
    from .search import best

    pick = best(cands, goal)  # a measured pick only, except when nothing was to be run
    if stop == "estimate-only":
        pick = next(iter(rank(cands, goal)), None)
    res = TuneResult(cands, pick, goal, stop, settings, round(time.monotonic() - t0, 2), tune_id)
    if on_event:
        on_event({"type": "done", "stop": stop, "pick": pick.key if pick else None})
    return res


class _CallableModule(type(sys.modules[__name__])):
    """`shardlab.tune` is this package and the function at once: `shardlab.tune(model, ...)` and
    `from shardlab import tune; tune(...)` call tune(), as `shardlab.launch(...)` calls launch()."""

    def __call__(self, *args, **kwargs) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["tune", "TuneResult", "Space", "Candidate", "Budget", "GOALS", "STEP_ERROR_BOUND", "MEMORY_MARGIN", "WINDOW_S", "candidates"]
