"""What a Plan means for the arithmetic: dtypes, group sizes, framework defaults, shard padding.

Both memory.py and comm.py start from `resolve(plan, spec)` (the basis of every estimate), so they
agree on every assumption.
The DeepSpeed defaults below are DeepSpeed 0.19.8's own (runtime/zero/config.py), used where the
Plan says "auto": shardlab's DeepSpeed export leaves "auto" keys to DeepSpeed, which then applies
these values (accelerate / HF Trainer would fill some from the model instead, e.g. reduce bucket =
hidden², persistence threshold = 10·hidden; give explicit numbers in the Plan to match such runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from shardlab.models import ModelSpec, ParamShapes, param_shapes
from shardlab.plan import Plan

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

DS_REDUCE_BUCKET = 500_000_000  # zero_optimization.reduce_bucket_size (elements)
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size (elements)
DS_PERSISTENCE = 100_000  # stage3_param_persistence_threshold (elements)
DS_MAX_REUSE = 1_000_000_000  # stage3_max_reuse_distance (elements)
DS_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters (elements)
DS_SUB_GROUP = 1_000_000_000  # sub_group_size: ZeRO-3 steps its partition in sub-groups of this many elements
DS_ALLREDUCE_SIZE = 500_000_000  # without ZeRO the engine flattens gradients this many elements at a time to all-reduce them
DS_ALIGN = 2  # ZeRO-1/2 pad the flat 16-bit group to a multiple of 2 x world size (nccl start alignment)

# Bytes of optimizer state per parameter, kept in fp32 by every framework here.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4}  # Adam: exp_avg + exp_avg_sq; SGD: momentum


@dataclass(frozen=True)
class Setup:
    """A plan reduced to the numbers the estimators need."""

    framework: str  # fsdp1 | fsdp2 | deepspeed
    stage: str  # ddp | zero1 | zero2 | zero3 (hybrid is zero3 with a node-sized shard group)
    hybrid: bool
    world: int
    nodes: int
    gpn: int
    shard: int  # ranks one copy of the states is split over
    hpz: int  # ZeRO++ secondary partition size (1 = off)
    P: int  # compute (and DeepSpeed model) dtype bytes
    R: int  # gradient reduction dtype bytes
    opt_bytes: int
    micro_steps: int
    offload_opt: str
    offload_params: str
    reduce_bucket: int
    prefetch_bucket: int
    persistence: int
    qw: bool
    qg: bool
    spec: ModelSpec
    shapes: ParamShapes

    @property
    def ds(self) -> bool:
        return self.framework == "deepspeed"

    @property
    def unknown_units(self) -> bool:
        """A bare count without wrap-unit information: how the model splits into units is unknown,
        so gather buffers count nothing per unit and zero3 is assumed to re-gather everything."""
        return self.spec.is_bare and not self.spec.wrap_unit_count


def fsdp_stage(s: Setup) -> str:
    """The sharding FSDP really applies: FSDP1 clamps every strategy to NO_SHARD when its sharding
    process group has one rank (torch/distributed/fsdp/_init_utils.py, _init_core_state: "FSDP is
    switching to use NO_SHARD ... since the world size is 1"; for hybrid sharding that group is the
    node's). Memory (H200 #307, llama100k fsdp1 zero2: +7.2% with every unit kept gathered), the
    replayed step and the step time (issue 20's llama1b grid) all price FSDP1 on one rank as NO_SHARD."""
    return "ddp" if s.framework == "fsdp1" and s.shard == 1 else s.stage


def _auto(v, default: int) -> int:
    return default if v == "auto" else int(v)


def resolve(plan: Plan, spec: ModelSpec) -> Setup:
    t = plan.topology
    P = DTYPE_BYTES[plan.precision]
    R = P if plan.reduce_dtype == "auto" else DTYPE_BYTES[plan.reduce_dtype]
    hybrid = plan.sharding == "hybrid"
    stage = "zero3" if hybrid else plan.sharding
    hpz = plan.zeropp.hpz_partition_size
    if plan.framework == "deepspeed" and hybrid and hpz == 1:
        hpz = t.gpus_per_node  # DESIGN.md: hybrid on DeepSpeed = ZeRO-3 with hpZ over the node
    if stage == "ddp":
        shard = 1
    elif hybrid and plan.framework != "deepspeed":
        shard = t.gpus_per_node
    else:
        shard = t.world_size
    b = plan.buckets
    return Setup(plan.framework, stage, hybrid, t.world_size, t.nodes, t.gpus_per_node, shard, hpz, P, R,
                 OPTIMIZER_STATE_BYTES[plan.optimizer.name], plan.grad_accum_steps, plan.offload.optimizer,
                 plan.offload.params, _auto(b.reduce_bucket_size, DS_REDUCE_BUCKET),
                 _auto(b.prefetch_bucket_size, DS_PREFETCH_BUCKET), _auto(b.param_persistence_threshold, DS_PERSISTENCE),
                 plan.zeropp.quantized_weights, plan.zeropp.quantized_gradients, spec, param_shapes(spec))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def shard_numel(s: Setup, n: int | None = None) -> int:
    """Elements of the model's states one rank holds under sharding over `n` ranks, padding included.

    fsdp2: each parameter is chunked on dim 0 (torch.chunk), every rank padded to ceil(dim0/n) rows.
    fsdp1: each unit's flat parameter is padded to a multiple of n.
    deepspeed zero3: each parameter's partition is ceil(numel/n) elements.
    deepspeed zero1/2: the flat group is padded to a multiple of 2·n and split evenly.
    """
    n = s.shard if n is None else n
    sh = s.shapes
    if n == 1:
        return s.spec.params
    if s.framework == "fsdp2":
        per = lambda ts: sum(_cdiv(a, n) * b for a, b in ts)  # noqa: E731
        return per(sh.embed + sh.head) + sh.layers * per(sh.block)
    if s.framework == "fsdp1":
        return _cdiv(sh.root_numel, n) + sh.layers * _cdiv(sh.block_numel, n) if sh.block else _cdiv(s.spec.params, n)
    if s.stage == "zero3":
        per = lambda ts: sum(_cdiv(a * b, n) for a, b in ts)  # noqa: E731
        return per(sh.embed + sh.head) + sh.layers * per(sh.block)
    return _cdiv(s.spec.params, DS_ALIGN * n) * DS_ALIGN


def persistent_numel(s: Setup) -> int:
    """DeepSpeed ZeRO-3: elements of parameters small enough (<= persistence threshold) to stay whole."""
    if not (s.ds and s.stage == "zero3"):
        return 0
    sh, th = s.shapes, s.persistence
    per = lambda ts: sum(a * b for a, b in ts if a * b <= th)  # noqa: E731
    return per(sh.embed + sh.head) + sh.layers * per(sh.block)


def ds3_partitioned(shapes, threshold: int) -> int:
    """DeepSpeed ZeRO-3: elements of the parameters among `shapes` over the persistence threshold (those it
    partitions and gathers)."""
    return sum(a * b for a, b in shapes if a * b > threshold)


def ds3_gathered_at_loss(s: Setup) -> int:
    """Elements DeepSpeed ZeRO-3 holds gathered at the loss where a gather makes a copy (several ranks, or the
    parameters offloaded), from the second step on: up to stage3_max_live_parameters, or the reuse rule's tail where
    that is larger (basis.ds3_kept_for_backward; not with the defaults). memory._ds3_states says why and how it was
    watched; dsreplay keeps the same tail gathered from its forward to its backward."""
    return min(s.spec.params - persistent_numel(s), max(DS_MAX_LIVE, ds3_kept_for_backward(s)))


def ds3_padded(s: Setup, n: int, *, persistent: bool | None = None) -> int:
    """Sum over parameters of ceil(numel/n)·n (what one ZeRO-3 gather of them moves), optionally
    only the persistent (True) or only the partitioned (False) ones."""
    sh, th = s.shapes, s.persistence

    def per(ts):
        out = 0
        for a, b in ts:
            m = a * b
            if persistent is None or (m <= th) == persistent:
                out += _cdiv(m, n) * n
        return out

    return per(sh.embed + sh.head) + sh.layers * per(sh.block)


def ds3_never_released(s: Setup) -> int:
    """Elements DeepSpeed ZeRO-3 gathers in forward and keeps to their backward, from the second step on: the
    all-gathers a step saves (a step gathers 2·partitioned minus these; comm.py).

    The coordinator prefetches at every module's fetch, a bucket (stage3_prefetch_bucket_size elements, at least one
    parameter) each time, so its prefetch runs ahead of the forward `rate` times as fast as the forward uses the
    parameters: fetches per block (one per Linear, two norms, three containers: shardlab's gpt block 9, llama 10)
    x the bucket / the block's partitioned elements. When the prefetch reaches the backward's entries, every
    parameter not yet released is marked as reused and kept: the last 1 - 1/rate of the model, up to
    stage3_max_live_parameters (what the prefetch may hold; memory._ds3_states: gathered at the loss). The reuse
    distance rule keeps its own tail besides. Measured on 2 CPU ranks (benchmarks/ds3_gathered.py --volumes,
    DeepSpeed 0.19.8; the reuse rule alone gave 64,000 in each): a 12-layer gpt of 725,248 partitioned elements at
    rate 2.25 kept 477,184 (402,915 here), at rate 9.1 625,984 (645,309 here); over max_live 300,000 and 500,000
    (a 20-layer gpt), 299,520 and 497,920 (max_live here)."""
    if not (s.ds and s.stage == "zero3") or s.unknown_units:
        return 0
    sh, th = s.shapes, s.persistence
    block = ds3_partitioned(sh.block, th)
    partitioned = ds3_partitioned(sh.embed + sh.head, th) + sh.layers * block
    linears = sum(1 for a, b in sh.block if b > 1 and a * b > th)
    rate = (linears + 5) * max(s.prefetch_bucket, block / max(1, linears)) / max(1, block)
    ahead = int(partitioned * (1 - 1 / rate)) if rate > 1 else 0
    return max(ds3_kept_for_backward(s), min(partitioned, DS_MAX_LIVE, ahead))


def ds3_kept_for_backward(s: Setup) -> int:
    """Elements DeepSpeed ZeRO-3 does not release after forward, from the second step on.

    With the whole step's module trace recorded, a module's parameters stay gathered if they are
    used again within stage3_max_reuse_distance elements (partitioned_param_coordinator.py). A
    forward module is reused in backward after about twice the parameters that follow it, so the
    tail of the model whose 2·(later parameters) < max_reuse_distance stays gathered, whatever
    stage3_max_live_parameters (benchmarks/ds3_gathered.py: its case of reuse 10^6 and max_live 300,000). Persistent parameters are never
    released and not counted here. (At the loss the prefetch gathers more: memory._ds3_states.)
    """
    if not (s.ds and s.stage == "zero3") or s.unknown_units:
        return 0
    sh, th = s.shapes, s.persistence
    full = lambda ts: sum(a * b for a, b in ts)  # noqa: E731
    # modules in forward order: embeddings, blocks, head; walk from the end
    items = [(full(ts), ds3_partitioned(ts, th)) for ts in [sh.embed] + [sh.block] * sh.layers + [sh.head]]
    kept, after = 0, 0
    for tot, np_ in reversed(items):
        if 2 * after >= DS_MAX_REUSE:
            break
        kept += np_
        after += tot
    return kept


def ring(n: int) -> float:
    """Ring all-gather / reduce-scatter factor: each rank sends and receives (n-1)/n of the buffer."""
    return (n - 1) / n if n > 1 else 0.0
