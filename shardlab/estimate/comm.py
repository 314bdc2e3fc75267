"""Communication per optimizer step per GPU: two views of the same collectives.

payload (`comm_payload_per_step`): what the runner counts. Per rank per optimizer step, the bytes of
the tensor handed to each collective call: all_gather_into_tensor its output (the gathered size),
reduce_scatter_tensor its input (the full unreduced size), all_reduce and broadcast the tensor. Keys:
all_gather, reduce_scatter, all_reduce, broadcast (and all_to_all for ZeRO++ qgZ). Padding to the
shard count is included, because the real tensors carry it. Scalar collectives (loss-scale overflow
checks, gradient norms) are a few bytes and left out.

wire (`comm_per_step`): the bytes a rank sends (= receives) with the ring algorithm, which is what
takes time: all-gather and reduce-scatter move (n-1)/n of the payload, all-reduce 2(n-1)/n, for a
group of n ranks. Each collective is filed as intra_node when its group lies inside one node and as
inter_node when it spans nodes: a ring across nodes runs at the speed of its slowest (inter-node)
link, so all of its bytes are paced by the NIC (the accounting the ZeRO++ paper uses, where ZeRO-3
moves 3M across nodes and qwZ + qgZ + hpZ 0.75M). Keys: forward_all_gather, backward_all_gather,
reduce_scatter, all_reduce, all_gather_after_step, all_to_all, then intra_node, inter_node, total.

How each setup communicates (M = Ψ elements, per micro-batch unless said otherwise; gradient
accumulation over k micro-batches multiplies the per-micro-batch collectives by k):
- FSDP NO_SHARD (ddp): all_reduce of all gradients in the reduce dtype every micro-batch.
- FSDP zero2 (SHARD_GRAD_OP): forward all_gather (params stay gathered through backward) +
  reduce_scatter of gradients: 2M, the ZeRO paper's ZeRO-2 volume.
- FSDP zero3: forward all_gather + backward all_gather + reduce_scatter: 3M, 1.5x DDP. FSDP1 keeps
  the root unit gathered after forward, so its backward gather skips the root; FSDP2 does the same
  only with reshard_after_forward=None, and shardlab passes True (runner and exported code), so
  there the root is gathered again. Hybrid: the same inside the node, plus an all_reduce of each
  shard across nodes.
- DeepSpeed ddp: all_reduce of gradients once per optimizer step (at the accumulation boundary).
- DeepSpeed zero1 / zero2: gradients are averaged with all_reduce (stage_1_and_2.py average_tensor:
  with the default use_multi_rank_bucket_allreduce each bucket is all-reduced and each rank keeps its
  slice), zero1 once per step and zero2 every micro-batch; after the step the updated 16-bit
  partitions are all_gathered. Wire: 2M + M = 3M, not the paper's 2M (which assumes reduce-scatter).
- DeepSpeed zero3: all_gather in forward and again in backward, reduce_scatter of gradients.
  Parameters at or under the persistence threshold stay whole and are all_gathered once per
  optimizer step, after the step (stage3.py _post_step); from the second step on, the parameters the
  prefetch reaches before their release stay gathered to their backward (no backward gather; up to
  stage3_max_live_parameters, basis.ds3_never_released). ZeRO++: qwZ gathers int8 weights in forward (half), hpZ gathers backward weights inside
  the hpZ group (intra-node), qgZ replaces the reduce-scatter by int4 all-to-alls (a quarter),
  one inside the node and one across nodes.
"""

from __future__ import annotations

from shardlab.models import wrap_units
from shardlab.plan import Plan

from .basis import Setup, ds3_never_released, ds3_padded, ring, shard_numel

WIRE_KEYS = ("forward_all_gather", "backward_all_gather", "reduce_scatter", "all_reduce", "all_gather_after_step", "all_to_all")
PAYLOAD_KEYS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "all_to_all")
QWZ_BYTES = 1  # int8 weights (per-block fp32 scales are under 0.5% and left out)
QGZ_BYTES = 0.5  # int4 gradients


class _Acc:
    def __init__(self, nodes: int):
        self.nodes = nodes
        self.wire = dict.fromkeys(WIRE_KEYS, 0.0)
        self.payload = dict.fromkeys(PAYLOAD_KEYS, 0.0)
        self.intra = 0.0
        self.inter = 0.0

    def add(self, wire_key: str, payload_key: str | None, payload: float, n: int, spans_nodes: bool, times: int = 1, factor: float = 1.0):
        w = payload * ring(n) * factor * times
        self.wire[wire_key] += w
        if payload_key:
            self.payload[payload_key] += payload * times
        if spans_nodes and self.nodes > 1:
            self.inter += w
        else:
            self.intra += w


def comm(plan: Plan, s: Setup) -> dict:
    """{'wire': {...}, 'payload': {...}, 'notes': [...]} per GPU per optimizer step."""
    a = _Acc(s.nodes)
    k = s.micro_steps
    notes: list[str] = []
    if s.world > 1:
        (_deepspeed if s.ds else _fsdp)(plan, s, a, k, notes)
    wire = {key: int(v) for key, v in a.wire.items()}
    wire.update(intra_node=int(a.intra), inter_node=int(a.inter), total=int(a.intra + a.inter))
    payload = {key: int(v) for key, v in a.payload.items()}
    payload["total"] = sum(payload.values())
    return {"wire": wire, "payload": payload, "notes": notes}


def _fsdp(plan: Plan, s: Setup, a: _Acc, k: int, notes: list[str]) -> None:
    P, R, psi = s.P, s.R, s.spec.params
    if s.stage == "ddp":
        a.add("all_reduce", "all_reduce", R * psi, s.world, True, k, factor=2)
        return
    n = s.shard
    local = shard_numel(s)
    full = local * n  # padded gathered size of all units
    units = wrap_units(s.spec, plan.wrap.policy, plan.wrap.min_num_params)
    # unknown units (bare count): assume many units, so the root's share is negligible
    root_share = 0.0 if s.unknown_units else units[0][1] / psi
    spans = s.nodes > 1 and not s.hybrid
    a.add("forward_all_gather", "all_gather", P * full, n, spans, k)
    if s.stage == "zero3":
        if s.framework == "fsdp1":
            # FSDP1 never frees the root's parameters after forward (they are needed first in backward)
            back = 0 if (len(units) == 1 and not s.unknown_units) else int(full * (1 - root_share))
            notes.append("FSDP1 keeps the root unit gathered after forward: no backward all-gather for it")
        else:
            # FSDP2 keeps the root gathered only when reshard_after_forward is left None; shardlab's
            # runner and exported code pass True explicitly, so the root is re-gathered too
            back = full
        a.add("backward_all_gather", "all_gather", P * back, n, spans, k)
    a.add("reduce_scatter", "reduce_scatter", R * full, n, spans, k)
    if s.hybrid and s.nodes > 1:
        a.add("all_reduce", "all_reduce", R * local, s.nodes, True, k, factor=2)


def _deepspeed(plan: Plan, s: Setup, a: _Acc, k: int, notes: list[str]) -> None:
    P, R, psi, N = s.P, s.R, s.spec.params, s.world
    if s.stage in ("ddp", "zero1", "zero2"):
        times = k if s.stage == "zero2" else 1
        a.add("all_reduce", "all_reduce", R * psi, N, True, times, factor=2)
        if s.stage != "ddp":
            a.add("all_gather_after_step", "all_gather", P * shard_numel(s) * N, N, True, 1)
            notes.append("DeepSpeed ZeRO-1/2 average gradients with all-reduce (use_multi_rank_bucket_allreduce)")
        return
    gathered = ds3_padded(s, N, persistent=False)
    kept = min(ds3_never_released(s), gathered)
    back_share = max(0.0, 1 - kept / gathered) if gathered else 0.0  # share released after forward
    if s.qw:
        a.add("forward_all_gather", None, QWZ_BYTES * gathered, N, True, k)
        a.payload["all_gather"] += QWZ_BYTES * gathered * k
    else:
        a.add("forward_all_gather", "all_gather", P * gathered, N, True, k)
    if s.hpz > 1:
        hp_gather = ds3_padded(s, s.hpz, persistent=False) * back_share
        a.add("backward_all_gather", "all_gather", P * hp_gather, s.hpz, False, k)
    else:
        a.add("backward_all_gather", "all_gather", P * gathered * back_share, N, True, k)
    full = ds3_padded(s, N)
    if s.qg:
        # int4 all-to-all inside the node, then across nodes (hierarchical, ZeRO++ section 4.3)
        a.add("all_to_all", "all_to_all", QGZ_BYTES * full, s.gpn, False, k)
        if s.nodes > 1:
            a.add("all_to_all", "all_to_all", QGZ_BYTES * full, N, True, k)
    else:
        a.add("reduce_scatter", "reduce_scatter", R * full, N, True, k)
    if persist := ds3_padded(s, N, persistent=True):
        # persistent parameters stay whole; after each step _post_step re-gathers them from the
        # updated partitions (stage3.py), once per optimizer step
        a.add("all_gather_after_step", "all_gather", P * persist, N, True, 1)
        notes.append(f"{persist:,} elements under the persistence threshold stay gathered; re-gathered once after each step")
    if kept:
        notes.append(f"{kept:,} elements stay gathered from forward to backward (steady state: the prefetch runs ahead, up to max_live)")
