"""Memory per GPU, per node's CPU RAM and NVMe, as each framework really holds it.

What each per-GPU figure counts (bytes, one rank; Ψ = parameters, S = this rank's shard of Ψ with
the framework's padding, P = compute dtype bytes, R = reduce dtype bytes, K = optimizer bytes/param):

params     the parameter tensors the rank owns between steps. FSDP1/FSDP2 keep the sharded
           parameters in their original fp32 (4·S; mixed precision only casts the gathered copy).
           DeepSpeed keeps the model in P: full (P·Ψ) for ddp/zero1/zero2, partitions (P·S) for zero3
           plus, whole, every parameter at or under stage3_param_persistence_threshold (it keeps both
           its partition and the full tensor), plus the hpZ secondary partition (P·Ψ/hpz) with hpZ.
grads      gradient storage that lives from backward to the step. FSDP: sharded fp32 (4·S; the reduced
           gradient is cast back to the parameter dtype); NO_SHARD: full fp32. DeepSpeed (gradient
           accumulation dtype = model dtype by default): ddp the full P·Ψ .grad tensors, zero1 the
           same while accumulating (grad_accum_steps > 1) and else the P·S partition, zero2 the P·S
           partition buffer, zero3 the P·S grad_partitions_flat_buffer.
optimizer  fp32 master weights + optimizer states. FSDP: states only (K·S; the fp32 parameters are
           the master copy). DeepSpeed: fp32 master (4·S; ZeRO-1/2/3 clone one even in fp32,
           without ZeRO fp32 has none) + K·S states.
activations the peak of what one micro-batch's forward keeps for backward plus the loss's fp32
           temporaries at the start of backward (activations.py), in P; with activation
           checkpointing one block input per layer plus the larger of the loss peak and one
           recomputed block. A bare parameter count has no shape: 0, and flagged.
buffers    transient working memory alive during forward/backward: gathered units (FSDP: root unit
           + (1 + prefetch) largest blocks; zero2 keeps every unit gathered from forward to backward),
           the unsharded gradient of one unit being reduced, DeepSpeed's contiguous reduce bucket
           (reduce_bucket_size elements, allocated in full), and ZeRO-3's parameters gathered at the
           loss (over several ranks or offloaded: up to stage3_max_live_parameters, _ds3_states).
step_buffers temporaries of the optimizer step (DeepSpeed's fp32 copy of the gradient partition,
           torch's foreach Adam temporaries); they exist after activations are freed.
overhead   CUDA_CONTEXT_BYTES (CUDA context, NCCL communicator buffers) plus what the caching
           allocator cannot give back at the memory limit (allocator.STRANDED of the peak allocated).
peak_allocated  what torch.cuda.max_memory_allocated should read: params + optimizer + the larger of
           the forward/backward peak (activations + buffers, plus gradients where they already exist
           then) and the step peak (grads + step_buffers + resident buffers, those alive for the whole
           run: the reduce bucket). FSDP's gradients do not exist during forward: the optimizer's
           zero_grad(set_to_none=True) frees them and backward frees activations as it creates the
           sharded gradients, so they count only from the second micro-batch of an accumulation
           (measured on an H100: fsdp2 zero3 gpt-1b peaks at 21.6 GiB, 3.5 GiB of fp32 grads under
           the sum of all states + activations). DeepSpeed's gradient partitions are flat buffers
           allocated once, so they are there during forward.
peak_reserved what torch.cuda.max_memory_reserved should read. FSDP1 and FSDP2, with or
           without CPU offload: the segments a replay of this step's requests makes
           (stepsim.py: states, activations, loss rows, gathered units, reduce buffers, optimizer
           states and temporaries, two steps, through the caching allocator's rules). DeepSpeed without ZeRO, ZeRO-1 and ZeRO-3 (ZeRO-3 with
           or without CPU offload): the same replay with DeepSpeed's own allocation order (dsreplay.py:
           the engine's flat buffers and empty_cache at start-up, gradient buckets and partitions, its
           optimizer step; with offload the parameters copied in on the coordinator's stream and the
           gradients' copies out on the reduce stream). Otherwise the allocator model (allocator.py): the peak's segments times a fitted
           factor, at least the peak plus DeepSpeed ZeRO-1/2's reduce bucket, which each step makes
           again in a segment of its own.
total      peak_allocated + overhead: what the GPU must hold (allocator.fit gives the verdict).

CPU figures are per node (all local ranks), NVMe per node. Offload moves the optimizer side
(master, states, fp32 gradients) and, for ZeRO-3 / FSDP, the parameter shards.
"""

from __future__ import annotations

from shardlab.models import wrap_units
from shardlab.plan import Plan
from shardlab.units import GIB

from .activations import activation_peak, backward_transient, block_bytes, peak_in_a_block, rope_tables, saved_blocks, sdpa_math
from .allocator import CUDA_CONTEXT_BYTES, FRAGMENTATION, STRANDED, allocator_limit, fits_under, on_gpu, reserved, stranded
from .basis import DS_ALLREDUCE_SIZE, DS_SUB_GROUP, Setup, ds3_gathered_at_loss, fsdp_stage, persistent_numel, shard_numel
from .dsreplay import ds_replayed_reserved
from .stepsim import replayed_reserved


def _compiled_blocks(plan: Plan, s: Setup) -> bool:
    """Whether each block runs under torch.compile (FSDP2 compiles its units; activations.py)."""
    return bool(plan.compile) and s.framework == "fsdp2"


def replayed(plan: Plan, s: Setup, workspace: int, limit: int | None = None) -> int | None:
    """Peak reserved bytes from the replay of this framework's step (dsreplay.py for DeepSpeed, stepsim.py
    for FSDP), or None where that replay does not cover the plan. limit: the GPU's allocator limit, under which
    the FSDP replay runs (stepsim._on_gpu: the same replay counts what the step time prices there); None: none."""
    if s.ds:
        return ds_replayed_reserved(plan, s, workspace)
    return replayed_reserved(plan, s, workspace, limit)


def activations(plan: Plan, s: Setup) -> int:
    """Peak bytes of activations and loss temporaries for one micro-batch on one GPU (activations.py)."""
    return activation_peak(s.spec, s.P, plan.micro_batch_size * s.spec.seq_len, plan.activation_checkpointing,
                           _compiled_blocks(plan, s))


def _blocks_in_backward(plan: Plan, s: Setup) -> int:
    """The blocks' saved activations as backward meets them, plus what one block's backward adds beside
    them (SDPA's math path: activations.py)."""
    tokens, compiled = plan.micro_batch_size * s.spec.seq_len, _compiled_blocks(plan, s)
    recomputed = tokens * block_bytes(s.spec, s.P, compiled) + rope_tables(s.spec, s.P, compiled) if plan.activation_checkpointing else 0
    return (saved_blocks(s.spec, s.P, tokens, plan.activation_checkpointing, compiled)
            + backward_transient(s.spec, s.P, tokens, compiled) + recomputed)


def _fsdp(plan: Plan, s: Setup) -> dict:
    stage = fsdp_stage(s)
    local = s.spec.params if stage == "ddp" else shard_numel(s)
    params, grads, opt = 4 * local, 4 * local, s.opt_bytes * local
    units = wrap_units(s.spec, plan.wrap.policy, plan.wrap.min_num_params)
    root = 0 if s.unknown_units else units[0][1]
    block = max((n for _, n in units[1:]), default=0)
    depth = 1 if (s.framework == "fsdp2" or plan.backward_prefetch != "none" or plan.forward_prefetch) else 0
    if stage == "zero2" or (stage == "ddp" and s.framework == "fsdp2"):
        # reshard_after_forward=False keeps every unit gathered until backward; FSDP2's replicate is
        # the same machinery and gathers into its own storage even in fp32 at world size 1 (H200:
        # fsdp2 ddp fp32 gpt350 mb2 measured 14.47 GiB, 12.49 predicted without this copy)
        gathered = at_loss = s.P * s.spec.params
    elif stage == "ddp":
        # only the low-precision cast copies; FSDP1's NO_SHARD frees each unit's copy when its forward
        # ends (_flat_param.py post_reshard frees _mp_shard for NO_SHARD), so none is left at the loss
        gathered = s.P * (root + 2 * block) if s.P < 4 else 0
        at_loss = gathered if s.framework == "fsdp2" else 0
    else:
        gathered = s.P * (root + (1 + depth) * block)
        # FSDP2 (reshard_after_forward=True, runner and exported code) reshards every unit after forward, the root
        # too; FSDP1 never reshards the root after forward (_runtime_utils._post_forward_reshard: not for the root
        # handle), so its gathered copy is alive at the loss
        at_loss = s.P * root if s.framework == "fsdp1" else 0
    reduce_buf = s.R * max(root, block) if stage != "ddp" or s.R != 4 else 0
    step = 4 * local if s.opt_bytes else 0  # foreach Adam: one fp32 temporary per parameter
    notes = {
        "params": f"sharded fp32 parameters (4 B x {local:,} elements)",
        "grads": f"sharded fp32 gradients (4 B x {local:,})",
        "optimizer": f"optimizer states fp32 ({s.opt_bytes} B x {local:,}); the fp32 params are the master copy",
        "buffers": f"gathered units in {s.P}-byte dtype ({'all units, zero2' if stage == 'zero2' else f'root + {1 + depth} blocks'}) + one unit's unsharded gradient"
                   + (" (FSDP1 on one rank is NO_SHARD)" if stage != s.stage else ""),
    }
    cpu = {"params": 0, "grads": 0, "optimizer": 0}
    if s.offload_opt == "cpu" or s.offload_params == "cpu":  # FSDP offloads all three or none
        cpu = {"params": params, "grads": grads, "optimizer": opt}
        params = grads = opt = 0
        step = 0
    return dict(params=params, grads=grads, optimizer=opt, gathered=gathered, reduce=reduce_buf, resident=0,
                step=step, cpu=cpu, nvme={}, notes=notes, at_loss=at_loss)


def _ds_step_copies(s: Setup, local: int) -> int:
    """DeepSpeed ZeRO's optimizer-step temporaries: it flattens the gradient partition into a new
    16-bit tensor and casts that to fp32 (stage_1_and_2.py step: flatten(...).to(fp32); stage3.py
    _prepare_fp32_grad_for_sub_group, one sub-group at a time), both alive at the cast; in fp32 the
    cast returns the flattened copy itself. (H200 host probe #212 hostB ZeRO-2: the step peaks
    1.63 GiB over the resident states = the 16-bit partition + its flat copy + the fp32 copy.)"""
    n = min(local, DS_SUB_GROUP) if s.stage == "zero3" else local
    return 4 * n + (s.P * n if s.P < 4 else 0)


def _ds12_backward(s: Setup, bucket: int, head: int, partition: int) -> tuple[int, int, int]:
    """DeepSpeed ZeRO-1/2 gradient memory in backward, as (kept between micro-batches, beside all the
    blocks' saved activations when their backward starts, at the end of backward); bytes.

    Both allocate the whole reduce bucket at the first gradient hook (stage_1_and_2.py setup_buckets).
    ZeRO-2 copies each gradient into it as it is made and frees the .grad; its reduction epilogue
    (every micro-batch) makes the partition buffer beside the bucket, then frees the bucket. ZeRO-1
    without overlap_comm (its default) only allocates the bucket in its hooks: the .grad tensors
    stay, and the epilogue that reduces them and frees the bucket runs only at the accumulation
    boundary (engine.py allreduce_gradients -> reduce_gradients), so between micro-batches the
    bucket stays beside the accumulated .grad, through the next forward's loss peak (H200 #32,
    llama300 ZeRO-1 mb2 x 4: 12.6% under without it; #105, gpt1280 fp32 mb1 x 2: 6.2%). Activations
    are freed block by block as gradients appear, so the backward peak is at one of its ends.
    """
    psi, P = s.spec.params, s.P
    many = s.micro_steps > 1
    if s.stage == "zero2":
        return (partition if many else 0), bucket, bucket + (0 if many else partition)
    acc = P * psi + bucket if many else 0
    # at the boundary the .grad tensors move into the bucket and on into the partition buffer
    end = P * psi + bucket + max(0, partition - P * min(psi, s.reduce_bucket))
    return acc, (0 if many else head + bucket), end - acc


def _ds3_states(s: Setup) -> tuple[int, int, int, int, int]:
    """DeepSpeed ZeRO-3 on the GPU: (partition elements, parameter, gradient, step-temporary and
    gathered bytes)."""
    P = s.P
    local = shard_numel(s)
    # persistent parameters (numel <= threshold) are held whole besides their partition
    params = P * local + P * persistent_numel(s) + (P * shard_numel(s, s.hpz) if s.hpz > 1 else 0)
    if s.shard == 1 and s.offload_params == "none":
        # a partition of one rank is the whole parameter: the "gather" points param.data at its
        # ds_tensor (partition_parameters.py, all_gather_coalesced -> _no_gather_coalesced ->
        # NoGatherHandle), no copy. With parameter offload the partition is copied to the GPU.
        gathered = 0
    else:
        # Gathered at the loss: up to stage3_max_live_parameters, not the reuse-distance tail. The coordinator
        # prefetches at every module's fetch, containers included (a block of shardlab's gpt is 9 fetches, each
        # up to stage3_prefetch_bucket_size elements), so from the second step on (the trace complete) the
        # prefetch runs ahead of the forward until the gathered elements reach max_live; once it reaches the
        # backward's entries it marks every parameter still gathered as reused (__most_recent_step_id_param_
        # fetched_for beyond the release's step: kept), and the forward ends with max_live elements gathered,
        # the model's tail. Watched on 2 CPU ranks (gloo, DeepSpeed 0.19.8, 12-20-layer gpt and llama, limits
        # scaled down): gathered at the end of forward = min(partitioned, max_live) plus less than one
        # parameter (the prefetch's last), whatever the reuse distance (benchmarks/ds3_gathered.py). It fits
        # the H200 runs: two ranks, #1403 gpt1.3b (reuse tail + prefetch: 0.65 GiB short, -2.2%), and one rank
        # with the parameters offloaded (copied in, so gathered: #35 llama300, #117 llama65k + AC, #36 llama1b
        # + AC; the whole 16-bit model within 0.01 GiB, where the reuse-distance rule was 9.9% under).
        # Where stage3_max_reuse_distance passes twice the tail's size (not with the defaults), the reuse rule keeps
        # more than that (basis.ds3_kept_for_backward; ds3_gathered.py's case of reuse 10^6 and max_live 300,000):
        # basis.ds3_gathered_at_loss, which the reserved replay (dsreplay.py) uses too.
        gathered = P * ds3_gathered_at_loss(s)
    return local, params, P * local, _ds_step_copies(s, local), gathered


def _deepspeed(plan: Plan, s: Setup) -> dict:
    psi, P = s.spec.params, s.P
    # ZeRO clones an fp32 master even from an fp32 model: stage 1/2 always, and stage 3 because its
    # aliasing test compares a tensor's device with the string 'cuda:N' (stage3.py
    # _create_fp32_partitions), which torch.device never equals. H200 #16 (gpt350 ZeRO-3 fp32) holds
    # 4 bytes/param more between steps than the aliased master allows. Without ZeRO in fp32 the
    # torch optimizer updates the model itself.
    master = 4 if (P < 4 or s.stage != "ddp") else 0
    notes = {}
    bucket = min(DS_ALLREDUCE_SIZE, psi) if s.stage == "ddp" else s.reduce_bucket
    head = P * sum(a * b for a, b in s.shapes.head)  # final norm + LM head: the first gradients of backward
    many = s.micro_steps > 1
    if s.stage == "ddp":
        local = psi
        params, grads = P * psi, P * psi
        # 16-bit without ZeRO is DeepSpeed's FP16_Optimizer (engine.py: DDP_BFLOAT16 / FP16): its step
        # casts every .grad to fp32 and flattens the list, so both fp32 copies live at the flatten
        # (fp16/fused_optimizer.py step; H200 host probe #210 hostB: the step peaks 2.04 GiB = 2 + 4 + 4
        # bytes per parameter over the resident states). In fp32 it hands the torch optimizer the model.
        step = 8 * psi if P < 4 else 0
        gathered = 0
        # .grad tensors appear one by one in backward (accumulated in place from the second
        # micro-batch on); at the boundary the engine flattens them for its all-reduce
        # (engine.py allreduce_gradients -> buffered_allreduce_fallback, 500M elements at a time)
        acc = grads if many else 0
        bwd_start, bwd_end = (0 if many else head), (0 if many else grads) + P * bucket
        notes["grads"] = f"full {P}-byte .grad tensors"
    elif s.stage in ("zero1", "zero2"):
        local = shard_numel(s)
        params = P * psi
        # ZeRO-1 reduces only at the accumulation boundary: between micro-batches the full 16-bit
        # .grad accumulates; in the boundary backward it is reduced and freed as it goes, leaving
        # the partition (as ZeRO-2 does every micro-batch)
        full_grads = s.stage == "zero1" and many
        grads = P * psi if full_grads else P * local
        step = _ds_step_copies(s, local)
        gathered = 0
        partition = 0 if s.offload_opt != "none" else P * local  # offload copies it to the CPU instead
        acc, bwd_start, bwd_end = _ds12_backward(s, P * s.reduce_bucket, head, partition)
        notes["grads"] = f"full {P}-byte .grad (accumulating between boundaries)" if full_grads else f"{P}-byte gradient partition"
    else:
        local, params, grads, step, gathered = _ds3_states(s)
        notes["grads"] = f"{P}-byte gradient partitions (grad_partitions_flat_buffer)"
    opt = (master + s.opt_bytes) * local
    notes["params"] = (f"{P}-byte model, full" if s.stage != "zero3" else
                       f"{P}-byte partitions (ds_tensor) + {persistent_numel(s):,} persistent elements whole") + (
        f" + hpZ secondary partition over {s.hpz}" if s.stage == "zero3" and s.hpz > 1 else "")
    notes["optimizer"] = f"fp32 master ({master} B) + states ({s.opt_bytes} B) x {local:,} elements"
    notes["buffers"] = (f"reduce bucket {bucket:,} elements" + (f"; gathered {gathered:,} B at the loss (the prefetch runs ahead up to stage3_max_live_parameters)" if s.stage == "zero3" and gathered else ""))
    cpu = {"params": 0, "grads": 0, "optimizer": 0}
    nvme = {}
    if s.offload_opt in ("cpu", "nvme"):
        # master + states (and the fp32 gradient partition the CPU optimizer reads) leave the GPU
        cpu["grads"] = 4 * local + (grads if s.stage == "zero3" else 0)
        grads = 0 if s.stage in ("zero2", "zero3") else grads
        if s.offload_opt == "cpu":
            cpu["optimizer"] = opt
        else:
            nvme["optimizer"] = opt
        opt, step = 0, 0
    if s.stage == "zero3" and s.offload_params in ("cpu", "nvme"):
        moved = P * local
        params -= moved
        if s.offload_params == "cpu":
            cpu["params"] = moved
        else:
            nvme["params"] = moved
    out = dict(params=params, grads=grads, optimizer=opt, gathered=gathered, reduce=P * bucket,
               resident=P * bucket, step=step, cpu=cpu, nvme=nvme, notes=notes)
    if s.stage != "zero3":
        out.update(acc=acc, bwd_start=bwd_start, bwd_end=bwd_end)
    if s.stage in ("zero1", "zero2") and s.offload_opt == "none":
        # the reduce bucket, freed when backward ends and split by the optimizer step's requests, is made
        # again in a segment of its own next step (allocator.py, `again`)
        out["again"] = P * bucket
    return out


def _gpu(gpu=None):
    from .gpus import DEFAULT_GPU, get_gpu

    return get_gpu(gpu if gpu is not None else DEFAULT_GPU)


def cublas_workspaces(gpu=None) -> int:
    """Bytes of the cuBLAS workspaces a training step holds: torch allocates one per (cuBLAS handle,
    stream) through the caching allocator and keeps it, and a training step uses two handles, the
    forward's thread and autograd's backward thread (so 64 MiB on Hopper). Measured: the H200 host
    probe's rows whose states and activations are tiny (#205-#209, 17M parameters, and #214-#219,
    219M) each peak 63-66 MiB above the analytical sum, whatever the framework."""
    return 2 * _gpu(gpu).cublas_workspace


def memory(plan: Plan, s: Setup, traced_activations: int | None = None, gpu=None) -> dict:
    """Per-GPU, CPU (per node) and NVMe (per node) bytes, with notes and flags.

    traced_activations: the forward/backward working set from a trace (trace.py), used in place of
    the activation formula (DeepSpeed's traced estimate: its states stay analytical).
    gpu: the GPU (table name or GPU) whose cuBLAS workspace size applies (default: DEFAULT_GPU's)."""
    parts = _deepspeed(plan, s) if s.ds else _fsdp(plan, s)
    act = activations(plan, s) if traced_activations is None else traced_activations
    buffers = parts["gathered"] + parts["reduce"]
    if s.ds and s.stage != "zero3":
        # DeepSpeed without ZeRO-3 makes its gradient buffers lazily: ZeRO-1/2's reduce bucket and
        # gradient partition at the first gradient hook (stage_1_and_2.py setup_buckets /
        # copy_grads_in_partition) and frees them when backward ends (_release_ipg_buffers); without
        # ZeRO the .grad tensors appear one by one in backward. So they are absent at the loss's
        # peak and meet only the blocks' activations later in backward. (H200 matrix: counting them
        # in forward over-predicted deepspeed zero2 + AC llama300 mb4 by 20%.)
        blocks = _blocks_in_backward(plan, s)
        if traced_activations is not None:
            blocks = min(blocks, act)
        fwd_bwd = parts["acc"] + max(act, blocks + parts["bwd_start"], parts["bwd_end"])
        parts["resident"] = 0  # released at the end of backward, before the step
    elif not s.ds:
        # FSDP: at the loss's peak only the root unit is gathered (blocks were resharded after
        # forward, no gradient is being reduced yet); later in backward the head's loss rows are
        # gone and a block is gathered and its gradient reduced beside the remaining activations
        grads_in_forward = parts["grads"] if s.micro_steps > 1 else 0
        blocks = _blocks_in_backward(plan, s)
        fwd_bwd = grads_in_forward + max(act + parts["at_loss"], min(blocks, act) + buffers)
    else:
        fwd_bwd = parts["grads"] + act + buffers
    workspace = cublas_workspaces(gpu)  # resident from the first forward and backward matmul on
    live = parts["params"] + parts["optimizer"] + workspace + max(fwd_bwd, parts["grads"] + parts["step"] + parts["resident"])
    overhead = CUDA_CONTEXT_BYTES + stranded(live)
    # reserved: the step's own requests replayed through the allocator's rules where the replay covers
    # the plan (stepsim.py), else the fitted allocator model (allocator.py)
    limit = allocator_limit(_gpu(gpu))
    # under the GPU's limit where the step fits it (what that GPU shows); else without one (what the step would need)
    resv = replayed(plan, s, workspace, limit if fits_under(live, limit) else None)
    per_gpu = {"params": parts["params"], "grads": parts["grads"], "optimizer": parts["optimizer"],
               "activations": act, "buffers": buffers + workspace, "step_buffers": parts["step"], "overhead": overhead,
               "peak_allocated": live,
               "peak_reserved": on_gpu(max(resv, live) if resv else reserved(live, parts.get("again", 0)), live, limit),
               "total": live + overhead}
    cpu = {k: v * s.gpn for k, v in parts["cpu"].items()}
    cpu["total"] = sum(cpu.values())
    nvme = {k: v * s.gpn for k, v in parts["nvme"].items()}
    nvme["total"] = sum(nvme.values())
    flags = []
    if s.spec.is_bare:
        flags.append("bare parameter count: model states only, activations are 0 (give a shape for activations)")
    if s.unknown_units:
        flags.append("no wrap units known: per-unit gather buffers counted as 0 (give a shape or an nn.Module)")
    if getattr(s.spec, "layout", "shardlab") == "transformers" and not s.spec.block_work:
        # e.g. a Mamba hybrid (transformers' Bamba): its block cannot run on the meta device, so nothing was counted; the
        # analytical figure then held 0.3% of the traced step's peak at 4 x 256 (session 23's sweep) and said nothing
        flags.append(f"this model's block could not be counted (it does not run on the meta device): its activations are priced "
                     f"as shardlab's own {s.spec.family} block's, which may be far from what it keeps. The traced estimate "
                     "(--trace, method='trace') runs its real step.")
    notes = dict(parts["notes"])
    notes["buffers"] += f"; cuBLAS workspaces {workspace / 2**20:g} MiB (forward and backward threads)"
    notes["activations"] = ("none (bare count)" if s.spec.is_bare else
                            f"{plan.micro_batch_size} x {s.spec.seq_len} tokens, {s.P}-byte, "
                            + ("SDPA's math path on CUDA (fp32 without a fused kernel: a [B, heads, T, T] softmax per block)"
                               if sdpa_math(s.spec, s.P, _compiled_blocks(plan, s)) else "SDPA/flash (no T^2 scores)")
                            + (", peak at a block's backward (the math path's score gradients)"
                               if peak_in_a_block(s.spec, s.P, plan.micro_batch_size * s.spec.seq_len, plan.activation_checkpointing,
                                                  _compiled_blocks(plan, s)) else ", peak at the fp32 loss's backward")
                            + (", checkpointed" if plan.activation_checkpointing else ""))
    notes["step_buffers"] = ("fp32 copy of the gradient partition for the optimizer step" if s.ds else "foreach optimizer temporaries (fp32)")
    notes["peak_reserved"] = (f"this step's requests replayed through the caching allocator's rules ({'dsreplay' if s.ds else 'stepsim'}.py)" if resv else
                              f"peak allocated in 2 MiB segments x {1 + FRAGMENTATION:.3f}, a fitted fragmentation factor (allocator.py)"
                              + (", at least the peak + the reduce bucket made again each step" if parts.get("again") else ""))
    notes["overhead"] = f"CUDA context etc. {CUDA_CONTEXT_BYTES / GIB:g} GiB + {STRANDED:.0%} of the peak stranded in the allocator's split segments"
    return {"per_gpu": per_gpu, "cpu": cpu, "nvme": nvme, "notes": notes, "flags": flags}
