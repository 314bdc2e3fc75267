"""The workshop's own helpers, beside the notebooks that import them (`from labkit import ...`; the
notebooks run with labs/ as their folder): where to run, reusing runs, and notebook 07's exercises
and self-checks. Course material lives here, not in the `shardlab` package: shardlab keeps only what
a library user needs (the run store's location, the device choice), and this file re-exports those.

A self-check compares a learner's answer with the answer shardlab itself computes right now (the
estimator, the exporters, the plan rules, or a real run's metrics), never with a number typed in
here, so the exercises stay right when the estimator or the presets change. `check(id, answer)`
returns a `Check` that shows as a one-line verdict in a notebook; an unanswered exercise (None) is
"not answered yet", not an error, so the notebook still runs top to bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from shardlab.estimate.gpus import DEFAULT_GPU
from shardlab.run.host import device_and_ranks as lab_device  # noqa: F401  (device, processes) for a lab run
from shardlab.run.host import visible_gpus
from shardlab.run.store import default_runs_dir as runs_dir
from shardlab.units import GB


def gpu_count() -> int:
    """CUDA GPUs a run may use here (NVML, narrowed by CUDA_VISIBLE_DEVICES; no torch import)."""
    return len(visible_gpus())


def run_once(plan, model: str = "gpt-tiny", steps: int = 4, nproc: int | None = None, device: str | None = None,
             out: str | None = None, timeout_s: float = 300, seed: int = 0):
    """A completed run of exactly this setup (plan, model, steps, ranks, device, seed) from the run store,
    or a new one launched and waited for. A later notebook reuses what an earlier one already ran, so a
    workshop does not pay twice for the same run; a failed run raises with its error and log tail."""
    import shardlab
    from shardlab.plan import load_plan
    from shardlab.run.store import list_runs, load_run

    if device is None or nproc is None:
        d, n = lab_device()
        device, nproc = device or d, nproc or n
    out = out or runs_dir()
    want = load_plan(plan)
    want = load_plan({**want.to_dict(), "topology": {"nodes": want.topology.nodes, "gpus_per_node": nproc}})
    runs = list_runs(out)
    for d in reversed(list(runs.loc[runs["status"] == "completed", "dir"])):
        r = load_run(d)
        cfg = r.config
        same = (cfg.get("model"), cfg.get("steps"), cfg.get("device"), cfg.get("seed")) == (model, steps, device, seed)
        if same and r.plan is not None and r.plan.to_dict() == want.to_dict():
            return r
    # progress: a bar that names each start-up phase, so a lab cell never waits without a word
    run = shardlab.launch(want, model=model, steps=steps, nproc=nproc, device=device, out=out, timeout_s=timeout_s, seed=seed,
                          progress=True)
    status = run.wait()
    if status != "completed":
        raise RuntimeError(f"run {run.id} ({want.framework} {want.sharding} {want.precision}) ended {status}: "
                           f"{run.info.get('error')}\n{run.log(0)[-1500:]}")
    return run


# --------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class Check:
    """One exercise's verdict: ok True (right), False (not yet) or None (no answer given)."""

    id: str
    ok: bool | None
    message: str

    def __bool__(self) -> bool:
        return bool(self.ok)

    def __str__(self) -> str:
        mark = {True: "✔ right", False: "✘ not yet", None: "… not answered yet"}[self.ok]
        return f"[{self.id}] {mark}: {self.message}"

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        color = {True: "#1b7f3b", False: "#b00020", None: "#8a6d00"}[self.ok]
        return f'<span style="color:{color}">{str(self)}</span>'


@dataclass(frozen=True)
class Exercise:
    """One question of notebook 07: how to compute its answer from shardlab, and how close is right."""

    id: str
    question: str
    expected: Callable[..., Any]  # computes the right answer from shardlab
    judge: Callable[[Any, Any], bool]  # (answer, expected) -> right?
    hint: str
    unit: str = ""


def _close(rel: float) -> Callable[[Any, Any], bool]:
    def judge(answer, expected) -> bool:
        a = float(answer)
        return abs(a - float(expected)) <= rel * abs(float(expected))
    return judge


def _word(answer, expected) -> bool:
    norm = lambda s: str(s).strip().lower().replace("shardingstrategy.", "").replace("-", "_").replace(" ", "_")  # noqa: E731
    return norm(answer) == norm(expected)


def _int(answer, expected) -> bool:
    return float(answer) == float(expected) and float(answer).is_integer()


# --------------------------------------------------------------------------------------------
# The answers, computed


def _states_bytes(plan_dict: dict, model, gpu: str = DEFAULT_GPU) -> int:
    from shardlab.estimate import estimate
    from shardlab.plan import plan_from_dict

    g = estimate(plan_from_dict(plan_dict, check=False), model, gpu).per_gpu
    return g["params"] + g["grads"] + g["optimizer"]


def states_zero2_64gpus() -> float:
    """GB (10^9) of model states per GPU: 7.5B params, DeepSpeed ZeRO-2, fp16, 64 GPUs."""
    plan = {"framework": "deepspeed", "sharding": "zero2", "precision": "fp16", "topology": {"nodes": 8, "gpus_per_node": 8}}
    return _states_bytes(plan, 7.5e9) / GB


def zero3_comm_ratio() -> float:
    """ZeRO-3's communication bytes per step over DDP's (gpt-1.3b, one node of 8 GPUs)."""
    from shardlab.estimate import estimate
    from shardlab.plan import Plan

    def total(sharding: str) -> float:
        plan = Plan(framework="fsdp2", sharding=sharding, topology={"gpus_per_node": 8})
        return estimate(plan, "gpt-1.3b").comm_per_step["total"]

    return total("zero3") / total("ddp")


def fsdp_name_for_zero2() -> str:
    """The FSDP1 sharding strategy shardlab exports for sharding=zero2."""
    import yaml

    from shardlab.export import export
    from shardlab.plan import Plan

    cfg = yaml.safe_load(export(Plan(framework="fsdp1", sharding="zero2", topology={"gpus_per_node": 2}), "accelerate"))
    fsdp = cfg.get("fsdp_config", {})
    for key in ("fsdp_sharding_strategy", "fsdp_reshard_after_forward"):
        if isinstance(fsdp.get(key), str):
            return fsdp[key]
    raise RuntimeError(f"the accelerate export names no FSDP1 sharding strategy: {fsdp}")


def blamed_field() -> str:
    """The field shardlab blames for FSDP2 with ZeRO-1."""
    from shardlab.plan import plan_from_dict

    errors = plan_from_dict({"framework": "fsdp2", "sharding": "zero1"}, check=False).errors()
    return errors[0].field


def min_gpus_llama7b() -> int:
    """Fewest H100 80GB GPUs for llama-7b with FSDP2 ZeRO-3, bf16, micro-batch 1, everything counted."""
    from shardlab.estimate.fits import min_gpus
    from shardlab.plan import Plan

    return int(min_gpus(Plan(framework="fsdp2", sharding="zero3", topology={"gpus_per_node": 8}), "llama-7b", "h100-80gb"))


SLOW_NET_BW = 1.25e9  # bytes/s: 10 Gb/s Ethernet between nodes


def slow_network_pick() -> str:
    """zero3 or hybrid: the shorter step for gpt-1.3b on 2 x 8 A100 80GB with a 10 Gb/s inter-node link."""
    from shardlab.estimate import estimate, get_gpu
    from shardlab.plan import Plan

    gpu = replace(get_gpu("a100-80gb"), name="a100-80gb-10gbe", inter_node_bw=SLOW_NET_BW)
    times = {s: estimate(Plan(framework="fsdp2", sharding=s, topology={"nodes": 2, "gpus_per_node": 8}), "gpt-1.3b", gpu).time["step_time_s"]
             for s in ("zero3", "hybrid")}
    return min(times, key=times.get)


def max_model_zero3_8xa100() -> float:
    """Billions of parameters whose model states fit per GPU with ZeRO-3 on 8 x A100 40GB."""
    from shardlab.estimate.fits import max_model_size
    from shardlab.plan import Plan

    plan = Plan(framework="deepspeed", sharding="zero3", topology={"gpus_per_node": 8})
    return max_model_size(plan, "a100-40gb", include="states") / GB


def param_bytes_per_rank(run=None) -> int:
    """Bytes of parameters each rank holds for gpt-tiny under FSDP2 ZeRO-3: measured in `run` (a run,
    run folder, or run id under runs_dir()) when given, else the estimator's figure for 2 ranks."""
    if run is not None:
        from shardlab.run.store import load_run

        r = load_run(run if hasattr(run, "dir") or Path(str(run)).is_dir() else Path(runs_dir()) / str(run))
        m = r.metrics
        last = m[m["step"] == m["step"].max()]
        return int(last["state_bytes.params"].max())
    from shardlab.estimate import estimate
    from shardlab.plan import Plan

    return int(estimate(Plan(framework="fsdp2", sharding="zero3", topology={"gpus_per_node": 2}), "gpt-tiny").per_gpu["params"])


EXERCISES: dict[str, Exercise] = {e.id: e for e in (
    Exercise("states_zero2", "Model states per GPU (GB = 10^9 bytes) for a 7.5B-parameter model trained with "
             "DeepSpeed ZeRO-2, fp16 mixed-precision Adam, on 64 GPUs.", states_zero2_64gpus, _close(0.03),
             "Parameters stay whole (2 bytes each); gradients (2 bytes) and optimizer states (12 bytes) are split 64 ways.", "GB"),
    Exercise("comm_ratio", "With the estimator (FSDP2, gpt-1.3b, one node of 8 GPUs): ZeRO-3's communication bytes per "
             "step divided by DDP's. Two decimals.", zero3_comm_ratio, _close(0.03),
             "estimate(plan, 'gpt-1.3b').comm_per_step['total'] for sharding zero3 and for ddp, then divide. The ZeRO paper "
             "counts 3 model sizes against 2; the estimator also counts what FSDP really gathers (the root unit, padding)."),
    Exercise("fsdp_zero2", "The FSDP1 sharding strategy (its ShardingStrategy name) that does what ZeRO-2 does.",
             fsdp_name_for_zero2, _word, "Gradients and optimizer states sharded, parameters kept whole between forward and backward."),
    Exercise("blamed_field", "framework: fsdp2 with sharding: zero1 is refused. Which plan field does shardlab blame?",
             blamed_field, _word, "Validate the plan and read the `field` of its error (Plan(...).errors())."),
    Exercise("min_gpus", "The fewest H100 80GB GPUs on which llama-7b trains with FSDP2 ZeRO-3, bf16, micro-batch 1 "
             "(activations and buffers counted).", min_gpus_llama7b, _int,
             "Try shardlab.estimate.fits.min_gpus, or estimate() with growing topology.gpus_per_node until per_gpu['total'] fits."),
    Exercise("slow_network", "2 nodes x 8 A100 80GB joined by 10 Gb/s Ethernet (1.25 GB/s): for gpt-1.3b, which "
             "sharding gives the shorter step, zero3 or hybrid?", slow_network_pick, _word,
             "Make a GPU with dataclasses.replace(get_gpu('a100-80gb'), inter_node_bw=1.25e9) and compare time['step_time_s']."),
    Exercise("max_model", "The largest model (billions of parameters) whose model states fit on each of 8 A100 40GB "
             "GPUs with ZeRO-3 (states only, no activations).", max_model_zero3_8xa100, _close(0.05),
             "ZeRO-3 holds 16 bytes per parameter split over 8 GPUs; or search with shardlab.estimate.fits.max_model_size.", "billion"),
    Exercise("param_bytes", "Bytes of parameters that each rank holds in a gpt-tiny FSDP2 ZeRO-3 run (2 ranks unless "
             "you pass the run: then that run's ranks).",
             param_bytes_per_rank, _int, "FSDP keeps its shard of the parameters in fp32: 4 bytes x parameters / ranks "
             "(shardlab.models.PRESETS['gpt-tiny'].params)."),
)}


def question(exercise: str) -> str:
    return _get(exercise).question


def solution(exercise: str, **kwargs) -> Any:
    """The right answer as shardlab computes it now (for facilitators)."""
    return _get(exercise).expected(**kwargs)


def check(exercise: str, answer: Any, **kwargs) -> Check:
    """Judge `answer` against shardlab's own figure. kwargs go to the answer's computation (e.g. run=...)."""
    ex = _get(exercise)
    if answer is None or answer is ...:
        return Check(ex.id, None, "replace None with your answer, then run the cell again.")
    expected = ex.expected(**kwargs)
    try:
        ok = ex.judge(answer, expected)
    except (TypeError, ValueError):
        return Check(ex.id, False, f"{answer!r} is not the kind of answer asked for ({'a number' if ex.judge is not _word else 'a name'}). Hint: {ex.hint}")
    if ok:
        shown = f"{expected:,.2f}" if isinstance(expected, float) else f"{expected:,}" if isinstance(expected, int) else str(expected)
        return Check(ex.id, True, f"{answer!r} agrees with shardlab's {shown}{' ' + ex.unit if ex.unit else ''}.")
    return Check(ex.id, False, f"{answer!r} is not it. Hint: {ex.hint}")


def _get(exercise: str) -> Exercise:
    if exercise not in EXERCISES:
        from shardlab.plan import bad_input

        raise bad_input("exercise", f"exercise={exercise!r} is not one of the lab exercises. Use one of: {', '.join(EXERCISES)}.")
    return EXERCISES[exercise]


__all__ = ["runs_dir", "gpu_count", "lab_device", "run_once", "Check", "EXERCISES", "check", "solution", "question"]
