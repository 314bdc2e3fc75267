"""The candidates `shardlab tune` considers: every combination of the settings that change speed or memory.

framework x sharding x offload x activation checkpointing x micro-batch x accumulation (fixed global
batch when one is given) x torch.compile x the bucket / prefetch knobs that matter (a few values
each). A combination the Plan's own rules refuse (e.g. zero1 on FSDP, parameter offload without
ZeRO-3) is kept as a rejected candidate whose reason is the rule's message, so the table can say why
it was never tried. Everything not varied comes from a base plan (precision, optimizer, wrapping).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from shardlab.plan import Plan, bad_input, load_plan

FRAMEWORKS = ("fsdp1", "fsdp2", "deepspeed")
# offload choices by name -> the plan's offload block ("all": FSDP offloads everything or nothing)
OFFLOADS = {"none": {"optimizer": "none", "params": "none"},
            "optimizer": {"optimizer": "cpu", "params": "none"},
            "all": {"optimizer": "cpu", "params": "cpu"}}
MICRO_BATCHES = (1, 2, 4, 8, 16)
# The knobs worth a second value, per framework ({} = the tool's default). DeepSpeed: smaller reduce /
# all-gather buckets (the 5e8-element default is allocated in full, memory.py) and a smaller ZeRO-3
# prefetch; FSDP1: forward prefetch (one more unit gathered ahead). FSDP2 prefetches by default.
KNOBS: dict[str, tuple[dict, ...]] = {
    "fsdp1": ({}, {"forward_prefetch": True}),
    "fsdp2": ({},),
    "deepspeed": ({}, {"buckets": {"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000,
                                   "prefetch_bucket_size": 5_000_000}}),
}


@dataclass
class Space:
    """What to vary. Each field is the list of values tried; `None` for shardings means every sharding
    the topology allows (hybrid only with more than one node)."""

    frameworks: tuple[str, ...] = FRAMEWORKS
    shardings: tuple[str, ...] | None = None
    offloads: tuple[str, ...] = ("none", "optimizer", "all")
    checkpointing: tuple[bool, ...] = (False, True)
    micro_batches: tuple[int, ...] = MICRO_BATCHES
    grad_accums: tuple[int, ...] = (1,)
    global_batch: int | None = None
    compile: tuple[bool, ...] = (False, True)
    knobs: bool = True

    def check(self) -> "Space":
        bad = [f for f in self.frameworks if f not in FRAMEWORKS]
        if bad or not self.frameworks:
            raise bad_input("frameworks", f"frameworks={','.join(self.frameworks) or '(none)'}: {', '.join(bad) or 'empty'} is not a framework. "
                            f"Use a comma-separated choice of {', '.join(FRAMEWORKS)}.")
        bad = [o for o in self.offloads if o not in OFFLOADS]
        if bad:
            raise bad_input("offloads", f"offloads={','.join(self.offloads)}: {', '.join(bad)} is not an offload choice. Use some of {', '.join(OFFLOADS)}.")
        for name, values in (("micro_batches", self.micro_batches), ("grad_accums", self.grad_accums)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise bad_input(name, f"{name}={list(values)} must be whole numbers of at least 1. Use e.g. {name}=(1, 2, 4).")
        gb = self.global_batch
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, int) or gb < 1):
            raise bad_input("global_batch", f"global_batch={gb!r} must be a whole number of sequences, at least 1 (or left out). Use e.g. --global-batch 64.")
        return self


@dataclass
class Candidate:
    """One combination: its plan (None when the combination cannot be written as a plan) and what
    became of it. `status`: rejected | unrun | running | completed | oom | failed | cancelled | timeout;
    `reason`: why it was rejected or failed, or "tight: ..." for one that fits only by the estimate."""

    key: str
    plan: Plan | None
    status: str = "unrun"
    reason: str | None = None
    predicted: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    run_id: str | None = None
    run_dir: str | None = None
    trial: int | None = None
    group: int | None = None  # candidates predicted equal within search.TIE_RESOLUTION share a number (twins)
    step_time_hint_s: float | None = None  # the search's expected step time when it starts the trial (sizes its window)

    @property
    def batch(self) -> int:
        p = self.plan
        return p.micro_batch_size * p.grad_accum_steps * p.world_size if p else 0


def _key(fw, sh, off, ac, mb, ga, comp, knob) -> str:
    parts = [fw, sh, f"mb{mb}x{ga}"]
    if off != "none":
        parts.append(f"offload-{off}")
    if ac:
        parts.append("ac")
    if comp:
        parts.append("compile")
    if knob:
        parts.append("+".join(sorted(knob)))
    return " ".join(parts)


def _shardings(space: Space, base: Plan) -> tuple[str, ...]:
    if space.shardings:
        return tuple(space.shardings)
    return ("ddp", "zero1", "zero2", "zero3") + (("hybrid",) if base.topology.nodes > 1 else ())


def _accums(space: Space, mb: int, world: int) -> list[int]:
    if space.global_batch is None:
        return list(space.grad_accums)
    per = mb * world
    return [space.global_batch // per] if space.global_batch % per == 0 else []


def candidates(space: Space, base: Any = None) -> list[Candidate]:
    """Every combination of `space` on top of `base` (a Plan or anything load_plan takes; its topology
    is the target's), each with its plan, or rejected with the Plan rule's message as the reason."""
    space.check()
    base = load_plan(base if base is not None else Plan(), check=False)
    world = base.world_size
    data0 = base.model_dump(mode="json")
    data0["global_batch_size"] = None
    out: list[Candidate] = []
    combos = itertools.product(space.frameworks, _shardings(space, base), space.offloads, space.checkpointing,
                               space.micro_batches, space.compile)
    for fw, sh, off, ac, mb, comp in combos:
        for ga in _accums(space, mb, world):
            for knob in (KNOBS[fw] if space.knobs else ({},)):
                data = {**data0, "framework": fw, "sharding": sh, "offload": {**data0["offload"], **OFFLOADS[off]},
                        "activation_checkpointing": ac, "micro_batch_size": mb, "grad_accum_steps": ga, "compile": comp}
                for k, v in knob.items():
                    data[k] = {**data0[k], **v} if isinstance(v, dict) else v
                key = _key(fw, sh, off, ac, mb, ga, comp, knob)
                try:
                    plan = load_plan(data, check=False)
                except Exception as e:  # noqa: BLE001 - a combination the model refuses is a rejected row
                    out.append(Candidate(key, None, "rejected", f"invalid: {e}"))
                    continue
                errors = [f for f in plan.findings() if f.level == "error"]
                if errors:
                    out.append(Candidate(key, plan, "rejected", "invalid: " + " ".join(f.message for f in errors)))
                else:
                    out.append(Candidate(key, plan))
    if space.global_batch is not None and not any(_accums(space, mb, world) for mb in space.micro_batches):
        raise bad_input("global_batch", f"global_batch={space.global_batch} is not micro-batch x accumulation x {world} GPUs "
                        f"for any micro-batch in {list(space.micro_batches)}. Use a multiple of {world * min(space.micro_batches)}.")
    return out


def reject_unrunnable(cands: list[Candidate], device: str) -> None:
    """Reject, in place, the valid candidates the trial device cannot run (frameworks.check_runnable, the launcher's own
    check): on CPU processes, e.g. FSDP1's parameter offload, which needs a GPU. Until session 19 they were ranked and
    tried, and their trials failed at launch, spending the budget (a CPU tune of a small Llama tried two and picked none)."""
    from shardlab.frameworks import check_runnable
    from shardlab.plan import PlanError

    for c in cands:
        if c.plan is None or c.status == "rejected":
            continue
        try:
            check_runnable(c.plan, device)
        except PlanError as e:
            c.status, c.reason = "rejected", f"cannot run on {device}: " + " ".join(f.message for f in e.findings)


__all__ = ["Space", "Candidate", "candidates", "reject_unrunnable", "FRAMEWORKS", "OFFLOADS", "KNOBS", "MICRO_BATCHES"]
