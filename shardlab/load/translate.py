"""translate(): the same setup in another framework, adjusted until it validates, with notes."""

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
    default = Plan()
    if to == "deepspeed":
        _to_deepspeed(d, notes, default)
    else:
        _to_fsdp(plan, d, notes, default, to)
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


def _to_deepspeed(d: dict, notes: list[str], default: Plan) -> None:
    if d["sharding"] == "hybrid":
        notes.append("sharding=hybrid becomes ZeRO-3 with hpZ (zero_hpz_partition_size = GPUs per node): DeepSpeed still shards "
                     "gradients and optimizer states over all GPUs and keeps only a secondary weight copy per node, where "
                     "HYBRID_SHARD replicates everything across nodes. Memory per GPU is lower, inter-node traffic higher.")
    if d["offload"]["params"] == "cpu":
        notes.append("offload: FSDP's CPUOffload becomes ZeRO-Offload of parameters and optimizer; DeepSpeed runs the optimizer "
                     "step on the CPU (DeepSpeedCPUAdam), where FSDP steps the CPU shards with the torch optimizer.")
    fsdp_only = {"forward_prefetch": "ZeRO-3 prefetches by buckets.prefetch_bucket_size instead",
                 "backward_prefetch": "DeepSpeed has no such knob", "limit_all_gathers": "DeepSpeed bounds gathers by stage3_max_live_parameters",
                 "sync_module_states": "DeepSpeed broadcasts the initial weights itself", "buffer_dtype": "DeepSpeed casts the whole module"}
    for name, why in fsdp_only.items():
        if d[name] != getattr(default, name):
            notes.append(f"{name}={d[name]} is an FSDP knob that does not carry over ({why}); reset to {getattr(default, name)}.")
            d[name] = getattr(default, name)
    if d["wrap"] != default.wrap.model_dump():
        notes.append("wrap: DeepSpeed partitions each parameter on its own and has no wrap units; wrap reset to its default.")
        d["wrap"] = default.wrap.model_dump()
    if d["low_memory_init"]:
        notes.append("low_memory_init: FSDP's meta-device / rank-0 loading becomes DeepSpeed's zero.Init (ZeRO-3) construction.")
    notes.append("bucket sizes: DeepSpeed communicates in buckets (reduce_bucket_size, prefetch_bucket_size) where FSDP "
                 "communicates one wrap unit at a time; the plan leaves them on auto.")


def _to_fsdp(plan: Plan, d: dict, notes: list[str], default: Plan, to: str) -> None:
    src = plan.framework
    if d["sharding"] == "zero1":
        d["sharding"] = "zero2"
        notes.append("sharding=zero1 has no FSDP equivalent (FSDP shards gradients with the optimizer states); using zero2 (SHARD_GRAD_OP).")
    zp = d["zeropp"]
    if zp["hpz_partition_size"] > 1:
        if d["sharding"] == "zero3" and plan.topology.nodes > 1 and zp["hpz_partition_size"] == plan.topology.gpus_per_node:
            d["sharding"] = "hybrid"
            notes.append("ZeRO++ hpZ over one node becomes sharding=hybrid (HYBRID_SHARD): FSDP replicates gradients and optimizer "
                         "states across nodes too, so each GPU holds more than with hpZ, and gradients are all-reduced across nodes.")
        else:
            notes.append(f"zeropp.hpz_partition_size={zp['hpz_partition_size']} (a secondary weight shard inside a node) has no FSDP equivalent; dropped.")
        zp["hpz_partition_size"] = 1
    for q in ("quantized_weights", "quantized_gradients"):
        if zp[q]:
            zp[q] = False
            notes.append(f"zeropp.{q} (ZeRO++ int8/int4 communication) has no FSDP equivalent; dropped, so {to} sends full-precision bytes.")
    off = d["offload"]
    if "nvme" in (off["optimizer"], off["params"]):
        notes.append("NVMe offload (ZeRO-Infinity) has no FSDP equivalent; FSDP can offload to CPU only.")
    wants = off["optimizer"] != "none" or off["params"] != "none"
    if wants and d["sharding"] in ("zero3", "hybrid"):
        if off["optimizer"] != off["params"] or "nvme" in (off["optimizer"], off["params"]):
            notes.append("offload: FSDP offloads all or nothing (CPUOffload moves parameters, gradients and the optimizer step "
                         f"together); optimizer={off['optimizer']}, params={off['params']} becomes both on cpu.")
        off.update(optimizer="cpu", params="cpu", nvme_path=None)
    elif wants:
        notes.append(f"offload: FSDP offloads all or nothing and only with parameters sharded (zero3); with sharding={d['sharding']} "
                     "the optimizer stays on the GPU, so GPU memory rises. Use sharding zero3 to offload everything to CPU.")
        off.update(optimizer="none", params="none", nvme_path=None)
    elif off["nvme_path"]:
        off["nvme_path"] = None
    if d["checkpoint"] == "full_16bit":
        d["checkpoint"] = "full"
        notes.append("checkpoint=full_16bit (DeepSpeed's gathered 16-bit save) becomes checkpoint=full (one full state dict).")
    if any(v != "auto" for v in d["buckets"].values()):
        notes.append("bucket sizes are DeepSpeed knobs; FSDP communicates one wrap unit at a time (set by wrap). Reset to auto.")
    d["buckets"] = default.buckets.model_dump()
    if src == "deepspeed":
        notes.append("prefetch: ZeRO-3 prefetches by bucket size (stage3_prefetch_bucket_size); FSDP prefetches the next wrap unit "
                     f"({'backward_prefetch, forward_prefetch' if to == 'fsdp1' else 'one unit ahead in backward; forward_prefetch explicit'}).")
        notes.append(f"wrap: DeepSpeed partitions parameters individually; {to} shards by wrap unit, here wrap.policy={d['wrap']['policy']} "
                     f"({d['wrap']['transformer_layer_cls']}). Check it names your model's block class.")
        if d["low_memory_init"]:
            d["sync_module_states"] = True
            notes.append("low_memory_init: zero.Init becomes FSDP's meta-device construction with rank 0 broadcasting the weights (sync_module_states).")
    if d["precision"] == "fp16" and d["loss_scaling"] == "none" and to == "fsdp2":
        d["loss_scaling"] = "dynamic"
        notes.append("fp16 with FSDP2 needs a gradient scaler; loss_scaling set to dynamic (torch.amp.GradScaler).")
    if d["precision"] == "fp16" and to == "fsdp1":
        notes.append("fp16 with FSDP1 scales the loss with ShardedGradScaler in the training loop (DeepSpeed scales inside the engine).")
    if to == "fsdp2":
        if d["backward_prefetch"] != default.backward_prefetch:
            notes.append(f"backward_prefetch={d['backward_prefetch']} is FSDP1-only; FSDP2 always prefetches one unit ahead in backward. Reset.")
            d["backward_prefetch"] = default.backward_prefetch
        if src == "fsdp1" and not d["limit_all_gathers"]:
            notes.append("limit_all_gathers=false has no FSDP2 counterpart (FSDP2 frees memory without a rate limiter).")
        if d["buffer_dtype"] != "auto":
            notes.append(f"buffer_dtype={d['buffer_dtype']} has no FSDP2 counterpart (MixedPrecisionPolicy leaves buffers alone); reset to auto.")
            d["buffer_dtype"] = "auto"
        if d["sharding"] in ("hybrid", "ddp"):
            notes.append(f"sharding={d['sharding']} is expressed in FSDP2 by a 2-D device mesh (replicate x shard) with reshard_after_forward.")
