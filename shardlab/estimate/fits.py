"""What fits: each strategy's verdict for a model, the largest model a strategy holds, the fewest GPUs.

Two ways to count, because published "max model size" claims rarely say which they mean:
- include="states": parameters + gradients + optimizer states (the ZeRO paper's model states) must
  fit in the GPU's memory; nothing else is counted.
- include="all": the estimate's own verdict (Estimate.fits, allocator.fit): the peak allocated
  (activations of a GPT shape of that size at the plan's micro-batch and sequence length, buffers)
  plus what the allocator cannot give back must fit beside the CUDA context.
"""

from __future__ import annotations

from shardlab.models import ModelSpec, bare, resolve_model
from shardlab.plan import Plan, load_plan, plan_from_dict

from .gpus import DEFAULT_GPU, GPU, get_gpu

# strategy name -> plan changes; zero1 is DeepSpeed only, so it switches the framework
STRATEGIES: dict[str, dict] = {
    "ddp": {"sharding": "ddp"},
    "zero1": {"sharding": "zero1", "framework": "deepspeed"},
    "zero2": {"sharding": "zero2"},
    "zero3": {"sharding": "zero3"},
    "zero3+offload": {"sharding": "zero3", "offload": {"optimizer": "cpu", "params": "cpu", "nvme_path": None}},
}

# GPT-3 paper widths (Brown et al. 2020, Table 2.1) and the head size 128 used above 1B
_WIDTHS = (768, 1024, 1536, 2048, 2560, 4096, 5120, 12288)


def _with(plan: Plan, changes: dict) -> Plan:
    d = plan.to_dict()
    for k, v in changes.items():
        d[k] = v
    if d["framework"] != "deepspeed":
        d["zeropp"] = {"quantized_weights": False, "quantized_gradients": False, "hpz_partition_size": 1}
    return plan_from_dict(d, check=False)


def gpt_shape_for(params: float, seq_len: int = 2048, vocab: int = 50257) -> ModelSpec:
    """A GPT-3-style shape with about `params` parameters (for activation-inclusive what-fits)."""
    d = _WIDTHS[0]
    for w in _WIDTHS:
        if 12 * w * w * 4 <= params:  # at least 4 layers at this width
            d = w
    layers = max(1, round((params - 2 * vocab * d) / (12 * d * d)))
    return ModelSpec(f"gpt-{params / 1e9:.3g}b-shape", layers, d, max(1, d // 128), vocab, seq_len)


def _states(est) -> int:
    g = est.per_gpu
    return g["params"] + g["grads"] + g["optimizer"]


def _used(est, include: str) -> int:
    return _states(est) if include == "states" else est.per_gpu["total"]


def _fits(est, include: str) -> bool:
    return _states(est) <= est.gpu.memory_bytes if include == "states" else est.fits


def fits(plan, model, gpu: str | GPU | dict = DEFAULT_GPU, include: str = "all") -> list[dict]:
    """For each strategy: fits or not, bytes used, headroom (GPU memory minus used), CPU per node."""
    from . import estimate

    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    g, spec = get_gpu(gpu), resolve_model(model)
    rows = []
    for name, changes in STRATEGIES.items():
        e = estimate(_with(plan, changes), spec, g)
        used = _used(e, include)
        rows.append({"strategy": name, "framework": e.plan.framework, "fits": _fits(e, include), "used_bytes": used,
                     "headroom_bytes": g.memory_bytes - used, "cpu_bytes_per_node": e.cpu["total"]})
    return rows


def max_model_size(plan, gpu: str | GPU | dict = DEFAULT_GPU, strategy: str | None = None, include: str = "states",
                   seq_len: int = 2048, cpu_memory: int | None = None, hi: float = 1e13) -> int:
    """The largest parameter count that fits per GPU under `strategy` (default: the plan's own).

    include="states" uses a bare count (model states only); include="all" a GPT shape of that size.
    `cpu_memory` (bytes per node) also bounds what offload may put in CPU RAM; without it, offloaded
    states are unbounded and the answer is limited by the GPU side only (up to `hi`).
    Binary search to 0.1% (the memory figures grow monotonically with the parameter count).
    """
    from . import estimate

    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    if strategy is not None:
        plan = _with(plan, STRATEGIES[strategy])
    g = get_gpu(gpu)
    make = (lambda n: bare(n)) if include == "states" else (lambda n: gpt_shape_for(n, seq_len))

    def ok(n: float) -> bool:
        e = estimate(plan, make(n), g)
        return _fits(e, include) and (cpu_memory is None or e.cpu["total"] <= cpu_memory)

    lo = 1e6
    if not ok(lo):
        return 0
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return int(lo)


def min_gpus(plan, model, gpu: str | GPU | dict = DEFAULT_GPU, include: str = "all", max_gpus: int = 4096) -> int | None:
    """The fewest GPUs (keeping the plan's GPUs per node once past one node) on which `model` fits
    under the plan's strategy; None if even `max_gpus` is not enough (e.g. ddp never shrinks)."""
    from . import estimate

    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    g, spec = get_gpu(gpu), resolve_model(model)
    gpn = max(plan.topology.gpus_per_node, 1)
    n = 1
    while n <= max_gpus:
        nodes, per = (1, n) if n <= gpn else (-(-n // gpn), gpn)
        p = _with(plan, {"topology": {"nodes": nodes, "gpus_per_node": per}})
        if p.sharding == "hybrid" and nodes == 1:
            p = _with(p, {"sharding": "zero3"})
        if _fits(estimate(p, spec, g), include):
            return nodes * per
        n *= 2
    return None
