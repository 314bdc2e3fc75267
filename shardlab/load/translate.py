"""translate(): the same setup in another framework, adjusted until it validates, with notes.

What each framework changes in a plan translated to it is the adapter's (`translate_from` in
shardlab/frameworks/{fsdp1,fsdp2,deepspeed}.py; FSDP's shared part in frameworks/base.py); this module
adds what holds for any crossing between DeepSpeed and FSDP (precision, checkpoints, clipping) and the
fate of carried keys."""

from __future__ import annotations

from shardlab.plan import Plan, PlanError, bad_input, plan_from_dict


def translate(plan: Plan, to: str) -> tuple[Plan, list[str]]:
    """The same setup in framework `to` (fsdp1 | fsdp2 | deepspeed), adjusted until it validates,
    with a note for every behaviour that does not carry over."""
    if to not in ("fsdp1", "fsdp2", "deepspeed"):
        raise bad_input("--to", f"--to {to!r} is not a framework. Use fsdp1, fsdp2 or deepspeed.")
    src, d, notes = plan.framework, plan.to_dict(), []
    d["framework"] = to
    if src == to:
        return plan_from_dict(d), [f"the plan already uses {to}; nothing to translate."]
    cross = (src == "deepspeed") != (to == "deepspeed")
    from shardlab.frameworks import adapter

    adapter(to).translate_from(plan, d, notes)  # what the target framework changes, and why
    if cross and plan.precision != "fp32":
        notes.append("precision: DeepSpeed keeps fp32 master weights and fp32 optimizer states beside the "
                     f"{plan.precision} weights; FSDP's mixed precision keeps the (sharded) parameters and optimizer states "
                     "in the dtype the model was loaded in, so load the model in fp32 to get the same numerics and memory.")
    if cross:
        notes.append("checkpoints: DeepSpeed writes its own per-rank ZeRO checkpoint (zero_to_fp32.py gathers it); FSDP writes "
                     "torch.distributed.checkpoint shards or a full state dict. Existing checkpoints do not load across.")
    d["passthrough"] = _carried(plan, to, notes)
    if cross and plan.gradient_clipping is not None:
        notes.append("gradient_clipping: DeepSpeed clips inside engine.step(); with FSDP the training loop calls clip_grad_norm_ itself.")
    try:
        return plan_from_dict(d), notes
    except PlanError as e:  # what is left is the input's own problem, not the translation's
        raise PlanError(e.findings) from None


# accelerate keys that belong to one framework's block, and FSDP1-only fsdp_config keys (accelerate's to-fsdp2 drops them).
_FSDP1_ONLY = ("fsdp_sharding_strategy", "fsdp_backward_prefetch", "fsdp_backward_prefetch_policy", "fsdp_forward_prefetch",
               "fsdp_use_orig_params", "fsdp_sync_module_states")


def _carried(plan: Plan, to: str, notes: list[str]) -> dict:
    """The plan's passthrough for framework `to`, with a note saying what becomes of each carried key."""
    from shardlab.export.carry import dotted, leaves

    pt = plan.passthrough.model_dump()
    acc = dict(pt["accelerate"])
    drop = ["fsdp_config", "parallelism_config"] if to == "deepspeed" else ["deepspeed_config"]
    dropped = [f"{k}.{dotted(p)}" for k in drop for p, _ in leaves(acc.pop(k, None) or {})]
    if to == "fsdp2" and isinstance(acc.get("fsdp_config"), dict):
        fsdp = acc["fsdp_config"] = dict(acc["fsdp_config"])
        dropped += [f"fsdp_config.{k}" for k in _FSDP1_ONLY if fsdp.pop(k, None) is not None]
        if not fsdp:
            del acc["fsdp_config"]
    if dropped:
        notes.append(f"carried accelerate keys dropped (they have no place in a {to} config): {', '.join(dropped)}.")
    kept = [dotted(p) for p, _ in leaves(acc)]
    if kept:
        notes.append(f"carried accelerate keys kept for an accelerate export (each written back unless it contradicts the plan): {', '.join(kept)}.")
    ds = [dotted(p) for p, _ in leaves(pt["deepspeed"])]
    if ds and to == "deepspeed":
        notes.append(f"carried DeepSpeed keys kept for the DeepSpeed export (each written back unless it contradicts the plan): {', '.join(ds)}.")
    elif ds:
        notes.append(f"carried DeepSpeed keys are not used by {to} (no FSDP equivalent); kept in the plan for an export back to DeepSpeed: {', '.join(ds)}.")
    pt["accelerate"] = acc
    pt["imported"] = None  # the plan now says something else than the file did
    return pt
