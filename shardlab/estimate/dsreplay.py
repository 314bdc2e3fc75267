"""DeepSpeed's reserved memory from a replay: its own allocation order through the caching allocator.

stepsim.py replays FSDP's training step request by request through cachesim.py's rules. DeepSpeed
allocates in an order of its own, and that order is what decides its reserved memory (no fitted
factor): `DSStep` keeps stepsim's forward, loss and backward of the activations (they do not depend on
the framework) and replaces the parameters, gradients and optimizer with DeepSpeed 0.19.8's requests:

engine start-up  the model is cast on the CPU and moved to the GPU parameter by parameter (engine.py
                 _configure_distributed_model). Without ZeRO in 16-bit, FP16_Optimizer clones every
                 parameter, flattens the clones into one buffer (the parameters become views of it),
                 clones that to an fp32 master and runs one optimizer step on zero gradients, so Adam's
                 states exist from the start (fp16/fused_optimizer.py). ZeRO-1/2 call empty_cache,
                 flatten the 16-bit model into one buffer (the per-parameter blocks stay cached, free),
                 clone this rank's partition to fp32 and make and drop one fp32 gradient
                 (stage_1_and_2.py __init__, initialize_optimizer_states). ZeRO-3 partitions each
                 parameter, then `defragment` frees every partition and calls empty_cache (the whole
                 model's segments are given back) before one flat 16-bit buffer is made; the fp32
                 master (a cast, then a clone), a zeroed fp32 gradient of the largest sub-group, the
                 contiguous gradient bucket (reduce_bucket_size elements) and the flat gradient
                 partition (stage3.py _setup_for_real_optimizer) follow and stay.
backward         each parameter's gradient is made by autograd. Without ZeRO and in ZeRO-1 it stays
                 (.grad) until the boundary; ZeRO-1 allocates its whole bucket at the first gradient
                 hook and frees it when the boundary's reduction has moved the gradients into the
                 partition buffer. ZeRO-2 copies each gradient into its bucket and frees it; the
                 partition buffer is made when the bucket first flushes, the bucket freed at every
                 backward's end. ZeRO-3 copies into its resident bucket; each flush reduce-scatters
                 into a new tensor on its reduce stream, copied into the flat partition and freed.
                 Without ZeRO the boundary flattens the gradients to all-reduce them (500M elements
                 at a time).
optimizer step   FP16_Optimizer casts each .grad to fp32 and flattens the casts (both alive at the
                 flatten). ZeRO-1/2/3 take the gradient norm one gradient at a time in fp32, flatten
                 the partition in 16 bits and cast that to fp32 (per sub-group in ZeRO-3). FusedAdam
                 makes its two states at the first step (ZeRO and fp32 without ZeRO).

ZeRO-3 with CPU offload (session 12, read from stage3.py, partition_parameters.py and
partitioned_param_coordinator.py):
optimizer        the optimizer's device is the CPU: the fp32 master, the zeroed gradient and the flat
                 gradient partition are pinned host memory; the GPU keeps the 16-bit flat partition (or
                 nothing, below) and the reduce bucket. Each flush concatenates the bucket on the reduce
                 stream; per parameter partition_grads copies its gradient partition into the pinned buffer
                 and that back to the GPU, whose fp64 norm and fp32 cast are made beside it at the
                 boundary (DSStep._flush_offloaded). DeepSpeedCPUAdam's step asks the GPU for nothing.
parameters       no `defragment`, so no empty_cache: the model moved to the GPU by the engine stays cached
                 on the default stream once its parameters are partitioned into pinned host memory; each
                 forward the coordinator copies every parameter in (NoGatherHandle: ds_tensor.to(device)) on
                 its allgather stream (FETCH_STREAM), and releases it after its module's backward (all are
                 gathered at the loss: memory.py's measured rule). One rank only (several all-gather too).
Judged by the five recorded runs (#35, #36, #117, #309, #505: -0.9, -2.1, +1.3, -1.6, -0.6%; with the
fitted factor -2.6, -31.1, -17.7, -13.1, -0.7%) and #309's allocator probe by stream (default 15.07 vs
15.27 GiB, reduce stream 2.60 vs 2.69).

The runner resets the peak statistics at every measured step, after the engine is built, so the
replay's peak is taken from the first step on. Reserved memory is what the replay's allocator holds at
its peak: what torch.cuda.max_memory_reserved reads. Not covered (None: allocator.reserved's factor):
ZeRO-1/2 with the optimizer offloaded, NVMe offload, ZeRO-3 parameter offload over several ranks,
ZeRO++, a bare count.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from .activations import _counted, _hf_llama
from .basis import DS_ALLREDUCE_SIZE, DS_SUB_GROUP, ds3_gathered_at_loss, ds3_partitioned, shard_numel
from .cachesim import AddressSpaceExceeded
from .stepsim import REDUCE_STREAM, Recipe, _Step, declined, recipe

# Stages whose reserved memory comes from the replay. ZeRO-2 is replayed but not used: on the recorded
# H200 rows (16 configurations, docs/benchmarks.md "Session 10: reserved") the replay's median error is
# 0.7% against the factor's 4.1%, but 3 rows miss by more than 10% against the factor's 1, each short by
# one segment of a step-sized buffer the run made and the replay does not (#9 -12.0%, #114 -16.2%,
# the llama1b grid's zero2 mb4x1 -10.4%; not explained yet).
REPLAYED = ("ddp", "zero1", "zero3")


class DSRecipe(NamedTuple):
    """DeepSpeed's side of the replay (elements unless named bytes); hashable, replays are cached."""

    stage: str  # ddp | zero1 | zero2 | zero3
    psi: int  # parameters
    local: int  # this rank's partition (padded)
    bucket: int  # reduce_bucket_size
    embed: tuple  # parameter elements, forward order
    block: tuple
    layers: int
    head: tuple
    lazy_workspaces: bool  # cuBLAS workspaces made at each thread's first matmul (DSStep's comment)
    off_opt: bool = False  # ZeRO-3 offload_optimizer to the CPU (DSStep's offload comment)
    off_params: bool = False  # ZeRO-3 offload_param to the CPU
    persistence: int = 0  # stage3_param_persistence_threshold: parameters this small stay on the GPU whole
    kept_blocks: int = 0  # ZeRO-3 over several ranks: the last blocks gathered at the loss (basis.ds3_gathered_at_loss)


FETCH_STREAM = 2  # ZeRO-3's parameter coordinator copies offloaded parameters in on its allgather stream
NORM_CHUNK = 250_000_000  # stage3.py _constant_buffered_norm2's buffer_size (elements per fp64 cast)


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - k) for k in range(0, total, size)] if total else []


class DSStep(_Step):
    """stepsim's step with DeepSpeed's parameters, gradients and optimizer (module docstring)."""

    # torch makes a cuBLAS handle's workspace (memory.cublas_workspaces) at the handle's first matmul
    # (one per handle and stream, made through the caching allocator when first asked for): the
    # forward thread's at the first forward, autograd's device thread's at the head's backward (stepsim
    # _loss), and it stays where best fit put it then, not at start-up. Allocator probe #306 (llama100k
    # ZeRO-1, one rank) lists two segments of the first step that the replay with both made at start-up
    # fitted in cached blocks (3.26 GiB short): the flattened gradient (1964 MiB) and the fp32 norm of the
    # embedding's gradient (1372 MiB). Made lazily, autograd's workspace lands in the start-up's free
    # 1964 MiB clone segment and the flattened gradient makes its segment at 7.73 GiB allocated, the
    # probe's figure; the norm's still fits (-4.6%, that segment short). Probe #10: the sixth 1000 MiB
    # loss segment, made now (-6.9 -> -0.4%). Only where the block's saved tensors are listed
    # (stepsim.block_tensors): a block counted in hidden-sized pieces frees no block of the workspace's
    # size in forward as the real one does (GPT-2's [T, 3d] and [T, 4d]), so the workspace would split a
    # loss segment there (#406 hf-gpt2 +1.2 -> +13.4%); those keep both made at start-up.
    # docs/benchmarks.md, session 11 i13b wave 2: every recorded row before and after.

    def __init__(self, r: Recipe, d: DSRecipe):
        super().__init__(r)
        self.d = d
        self.LAZY_WORKSPACES = d.lazy_workspaces
        self.fill = 0  # elements waiting in the gradient bucket
        self.order = list(d.embed) + list(d.block) * d.layers + list(d.head)
        self.grads = [("grad", k) for k in range(len(self.order))]  # each parameter's .grad key, made once
        self.pending: list[int] = []  # ZeRO-3 with the optimizer offloaded: the bucket's parameters (elements)
        self._clean: dict = {}  # _flush_offloaded's requests known to change nothing, by the segment count then
        self.boundary = True  # the micro-batch whose backward ends the accumulation
        # ZeRO-3 with the parameters offloaded: each non-persistent parameter's GPU copy, keyed by its index
        self.fetched = [("gp", k) for k in range(len(self.order))]
        self.fetch = [(k, r.P * n) for k, n in enumerate(self.order) if n > d.persistence] if d.off_params else []
        # ZeRO-3 over several ranks: the tail gathered at the loss stays gathered from its forward to its backward
        self.kept_from = d.layers - d.kept_blocks

    def _forward(self, mb) -> None:
        if self.LAZY_WORKSPACES and ("ws", 0) not in self.sim.live:  # the forward thread's first matmul
            self.sim.alloc(("ws", 0), self.r.workspace)
        if self.fetch:  # each parameter copied in on the fetch stream as its module's forward starts (module docstring)
            self.sim.allocs([self.fetched[k] for k, _ in self.fetch], [n for _, n in self.fetch], FETCH_STREAM)
        super()._forward(mb)

    def _copy_in(self, key, unit: int) -> None:
        """ZeRO-3 over several ranks: each module's parameters are gathered into a new flat tensor made on the
        coordinator's allgather stream (partitioned_param_coordinator.py __all_gather_params_ runs
        all_gather_coalesced under `stream(self.__allgather_stream)`; partition_parameters.py _all_gather_dtype
        makes `flat_tensor` there), so they come from that stream's pool, not the compute stream's."""
        self.sim.alloc(key, self.r.P * unit, FETCH_STREAM)

    # parameters of a backward unit (stepsim's _backward names them by key): the range of their indices
    def _unit_params(self, key) -> range:
        d = self.d
        ne, nb = len(d.embed), len(d.block)
        if key[0] == "head":
            first, n = ne + nb * d.layers, len(d.head)
        elif key[0] == "b":
            first, n = ne + nb * key[1], nb
        else:
            first, n = 0, ne
        return range(first, first + n)

    def _start_key(self) -> tuple:
        r = self.r
        return self.d, r.P, r.opt_states, r.workspace

    def _init(self) -> None:
        sim, d, P = self.sim, self.d, self.r.P
        # module.to(device), parameter by parameter, already cast on the CPU: where the parameters are
        # freed once flattened, they and what is made beside them are one batch (cachesim.batch)
        moved = [P * n for n in self.order]
        ne, nb, n = len(d.embed), len(d.block), len(moved)
        layers = [(ne, nb, d.layers)]  # the blocks' parameters, copies of one block's (cachesim.batch's runs)
        if d.stage == "ddp":
            if P < 4:  # FP16_Optimizer: clone, flatten (the parameters and clones freed), fp32 master, one
                sim.batch(moved + moved + [P * d.psi], keep={2 * n: ("flat",)},  # step on zero gradients
                          runs=layers + [(n + ne, nb, d.layers)])
                self._master(d.psi)
                states = self.r.opt_states
                sim.batch([4 * d.psi] * (1 + states), keep={1 + st: ("os", st) for st in range(states)})
                self.made_states = True
            else:
                for k, n in enumerate(moved):
                    sim.alloc(("p", k), n)
        elif d.stage in ("zero1", "zero2"):
            # empty_cache between the move and the flat buffer gives nothing back here (the allocator
            # is fresh, so every segment holds a parameter still alive): left out of the batch
            sim.batch(moved + [P * d.psi], keep={n: ("flat",)}, runs=layers)
            self._master(d.local)
            sim.touch(4 * d.local)  # initialize_optimizer_states' zero gradient, dropped
        elif d.off_params:
            # the model moved parameter by parameter, then each partitioned into pinned CPU memory and its GPU
            # tensor freed (partition_parameters.py _partition_param, free_param); a persistent one (numel <=
            # the threshold) gets a GPU partition. With the parameters offloaded there is no `defragment`, so no
            # empty_cache (stage3.py _create_fp16_partitions_with_defragmentation): the moved model's segments
            # stay cached on the default stream
            persist = [P * n for n in self.order if n <= d.persistence]
            sim.batch(moved + persist, keep={n + j: ("pp", j) for j in range(len(persist))}, runs=layers)
            self._zero3_buffers()
        else:
            # each parameter partitioned, then `defragment` frees every partition and calls empty_cache:
            # nothing of the per-parameter blocks stays reserved, so they are not replayed
            sim.empty_cache()
            sim.alloc(("flat",), P * d.local)
            self._zero3_buffers()
        sim.peak_reserved = sim.reserved  # the runner resets the peak statistics at each measured step

    def _zero3_buffers(self) -> None:
        """ZeRO-3's optimizer buffers (stage3.py _setup_for_real_optimizer). With the optimizer offloaded its
        device is the CPU: the fp32 master, the zeroed gradient of initialize_optimizer_states and the flat
        gradient partition are made there (pinned); only the contiguous gradient bucket is on the GPU."""
        sim, d, P = self.sim, self.d, self.r.P
        if not d.off_opt:
            for i, n in enumerate(_chunks(d.local, DS_SUB_GROUP)):
                sim.alloc(("cast", i), 4 * n)
                sim.alloc(("master", i), 4 * n)
                sim.free(("cast", i))
            sim.touch(4 * min(d.local, DS_SUB_GROUP))
        sim.alloc(("bucket",), P * d.bucket)
        if not d.off_opt:
            sim.alloc(("part",), P * d.local)

    def _master(self, n: int) -> None:
        """The fp32 master weights: a 16-bit clone of the flat buffer (or partition) cast to fp32."""
        if self.r.P < 4:
            self.sim.batch([self.r.P * n, 4 * n], keep={1: ("master",)})
        else:
            self.sim.alloc(("master",), 4 * n)

    def _flush(self) -> None:
        """The bucket's gradients reduced into this rank's partition buffer."""
        sim, d = self.sim, self.d
        if d.off_opt:
            self._flush_offloaded()
        elif d.stage == "zero3":
            sim.touch(self.r.P * -(-self.fill // self.r.shard), REDUCE_STREAM)
        elif d.stage == "zero2" and ("part",) not in sim.live:
            sim.alloc(("part",), self.r.P * d.local)
        self.fill = 0

    def _flush_offloaded(self) -> None:
        """ZeRO-3 with the optimizer offloaded: one flush of the bucket, all on the reduce stream
        (stage3.py __reduce_and_partition_ipg_grads). reduce_scatter_coalesced concatenates the bucket's
        gradients (each padded to a multiple of the ranks) into a new tensor, unless the bucket holds one that
        needs no padding; its partitions are views of it. partition_grads then, per parameter, copies its
        partition into the pinned CPU gradient buffer and that buffer back to the GPU (`grad_buffer.to(device)`,
        freed when the loop moves on); at the accumulation boundary _offload_grad_partition_at_boundary takes
        its norm in fp64, NORM_CHUNK elements at a time (_constant_buffered_norm2, get_norm_dtype), and casts it
        to fp32 for the copy into the optimizer's fp32 gradient (allocator probe #309: the embedding's
        gradient made 1372 MiB = 8 bytes x its 180M elements there, its GPU copy 344 MiB). A parameter larger
        than the bucket (not copied into it, reduced alone) is not told apart.

        Skipped where provably without effect on what reserves: one parameter's requests (its copy, then the
        temporaries beside it, then its copy freed) that made no segment leave the reduce stream's blocks as
        they found them (the copy merges back into the free block it was cut from; a touch changes nothing
        but by a new segment), so the same requests from the same state make none either. `_clean` keeps
        each (flush size, parameter size, boundary) done without a new segment, with the allocator's
        segment count then; while that count stands, no request on the reduce stream has changed its blocks
        since (only these flushes use it, and each either restores them or makes a segment). A flush of
        llama-sized blocks repeats every block's sizes; the second step repeats the first's flushes."""
        sim, P, shard, parts = self.sim, self.r.P, self.r.shard, self.pending
        if not parts:
            return
        self.pending = []
        self.fill = 0
        padded = [-(-n // shard) for n in parts]
        whole = not (len(parts) == 1 and parts[0] % shard == 0)
        cat = P * shard * sum(padded) if whole else 0
        clean, boundary = self._clean, self.boundary
        if clean.get((cat, tuple(padded), boundary)) == sim.segments:
            return  # the whole flush, done from this state before without a new segment
        if whole:
            sim.alloc(("cat",), cat, REDUCE_STREAM)
        made = sim.segments
        for n in padded:
            key = (cat, n, boundary)
            if clean.get(key) == sim.segments:
                continue
            before = sim.segments
            sim.alloc(("gb",), P * n, REDUCE_STREAM)
            if boundary:  # (an fp32 gradient's .to(fp32) is the tensor itself: no cast)
                sim.touches([8 * c for c in _chunks(n, NORM_CHUNK)] + ([4 * n] if P < 4 else []), REDUCE_STREAM)
            sim.free(("gb",))
            if sim.segments == before:
                clean[key] = before
        if whole:
            sim.free(("cat",))
        if sim.segments == made:  # (the cat's own segment, if it made one, stays cached: the same state next time)
            clean[(cat, tuple(padded), boundary)] = sim.segments

    def _reduce(self, unit: int, key, first: bool) -> None:
        """Gradient hooks of one backward unit's parameters (stepsim calls this per unit)."""
        sim, d, P = self.sim, self.d, self.r.P
        if d.stage in ("zero1", "zero2") and ("bucket",) not in sim.live:
            sim.alloc(("bucket",), P * d.bucket)  # setup_buckets at the first hook
        alloc, free, touch, ks, order = sim.alloc, sim.free, sim.touch, self._unit_params(key), self.order
        if d.stage in ("ddp", "zero1"):
            if first:  # each parameter's .grad, in hook order
                sim.allocs(self.grads[ks.start:ks.stop], [P * n for n in order[ks.start:ks.stop]])
            else:  # accumulated in place: each new gradient is a temporary
                sim.touches([P * order[k] for k in ks])
            return
        if d.off_opt:  # ZeRO-3: each gradient copied into the bucket and dropped, a full bucket flushed
            sim.touches([P * order[k] for k in ks])
            for k in ks:
                n = order[k]
                if self.fill + n > d.bucket and self.fill:
                    self._flush_offloaded()
                self.fill += n
                self.pending.append(n)
            if self.fetch:  # the unit's backward is over: its fetched parameters released
                sim.frees(self.fetched[ks.start:ks.stop])
            return
        if d.stage == "zero3":  # each gradient copied into the bucket and dropped; a full bucket reduced on
            flushes, fill, shard = [], self.fill, self.r.shard  # its stream. Temporaries of two pools that
            for k in ks:  # share no block, with nothing else made between: each pool's in one touches()
                n = order[k]
                if fill + n > d.bucket:
                    flushes.append(P * -(-fill // shard))
                    fill = 0
                fill += n
            self.fill = fill
            sim.touches([P * order[k] for k in ks])
            sim.touches(flushes, REDUCE_STREAM)
            if self.fetch:
                sim.frees(self.fetched[ks.start:ks.stop])
            return
        for k in ks:
            n = order[k]
            flush = self.fill + n > d.bucket
            if ("part",) in sim.live or not flush:  # (ZeRO-3 returned above)
                touch(P * n)  # nothing else made on its stream while it lives (the flush's is another)
                if flush:
                    self._flush()
            else:  # ZeRO-2's first flush makes the partition buffer beside it
                alloc(("gt",), P * n)
                self._flush()
                free(("gt",))
            self.fill += n

    def _backward(self, mb, first: bool) -> None:
        self.boundary = boundary = mb == self.r.micro - 1
        super()._backward(mb, first)
        sim, d, P = self.sim, self.d, self.r.P
        if d.stage in ("zero2", "zero3"):  # the epilogue flushes the bucket; ZeRO-2 frees it, ZeRO-3 keeps it
            self._flush()
            if d.stage == "zero2":
                sim.free(("bucket",))
        elif boundary and d.stage == "zero1":  # reduce_gradients: .grad into the bucket, on into the partition
            cut = None  # the partition buffer is made after the gradient that fills the bucket (until then
            if ("part",) not in sim.live:  # only .grads are freed)
                done, need = 0, min(d.psi, d.bucket)
                for k, n in enumerate(self.order):
                    done += n
                    if done >= need:
                        cut = k + 1
                        break
            sim.frees(self.grads[:cut])
            if cut is not None:
                sim.alloc(("part",), P * d.local)
                sim.frees(self.grads[cut:])
            sim.free(("bucket",))
        elif boundary:  # without ZeRO: whole gradients flattened for the all-reduce until a chunk passes
            n = 0  # DS_ALLREDUCE_SIZE elements (engine.py allreduce_no_retain)
            for k, m in enumerate(self.order):
                n += m
                if n > DS_ALLREDUCE_SIZE or k == len(self.order) - 1:
                    sim.touch(P * n)
                    n = 0

    def _step(self) -> None:
        sim, d, P = self.sim, self.d, self.r.P
        if d.off_opt:  # DeepSpeedCPUAdam steps on the CPU; the updated 16-bit partitions are copied back in
            return  # place, converted on the CPU (a blocking copy_), so the step asks the GPU for nothing
        if d.stage == "ddp":
            if P < 4:  # FP16_Optimizer.step: fp32 casts of each .grad, flattened (all freed, as the .grads)
                sim.batch([4 * n for n in self.order] + [4 * d.psi])
                if not self.last:  # (_Step.last)
                    sim.frees(self.grads)
                return
            if not self.made_states:  # FusedAdam's states, per parameter, at the first step
                states = range(self.r.opt_states)
                sim.allocs([("os", st, k) for k in range(len(self.order)) for st in states],
                           [4 * n for n in self.order for _ in states])
                self.made_states = True
            if not self.last:
                sim.frees(self.grads)
            return
        if P < 4:  # get_grad_norm_direct: each gradient's partition cast to fp32 in turn
            shard = self.r.shard
            sim.touches([4 * -(-n // shard) for n in self.order])
        for i, n in enumerate(_chunks(d.local, DS_SUB_GROUP if d.stage == "zero3" else d.local)):
            sim.alloc(("fg",), P * n)
            if P < 4:
                sim.alloc(("g32", i), 4 * n)
                sim.free(("fg",))
            if d.stage != "zero3" and i == 0:
                sim.free(("part",))
            if not self.made_states:
                for st in range(self.r.opt_states):
                    sim.alloc(("os", st, i), 4 * n)
            sim.free(("g32", i))
            sim.free(("fg",))
        self.made_states = True


def _offload_replayed(s) -> bool:
    """Which offload plans the replay covers: ZeRO-3 with the optimizer and/or the parameters offloaded to the
    CPU (not NVMe: its swap buffers are not modelled), the parameters only on one rank (over several the
    coordinator all-gathers the copied-in partitions into buffers of their own: not modelled, no run recorded).
    ZeRO-1/2 with the optimizer offloaded keep allocator.py's factor."""
    if s.stage != "zero3" or "nvme" in (s.offload_opt, s.offload_params):
        return False
    return s.offload_params == "none" or s.shard == 1


@lru_cache(maxsize=512)
def _replay(r: Recipe, d: DSRecipe) -> int | None:
    """Peak reserved of the replayed step; None past the replay's address space (cachesim.AddressSpaceExceeded: no
    GPU holds such a step), cached like any other answer."""
    try:
        return DSStep(r, d).run()
    except AddressSpaceExceeded:
        return None


def ds_replayed_reserved(plan, s, workspace: int) -> int | None:
    """Peak reserved bytes of DeepSpeed's replayed step, or None where it is not covered."""
    off_opt, off_params = s.offload_opt != "none", s.offload_params != "none"
    if (not s.ds or s.stage not in REPLAYED or s.qw or s.qg or s.hpz > 1 or declined(plan, s)
            or ((off_opt or off_params) and not _offload_replayed(s))):
        return None
    base = recipe(plan, s, workspace, units=False)  # FSDP's units left out: root, head and blocks set below
    sh = s.shapes
    numel = lambda ts: tuple(a * b for a, b in ts)  # noqa: E731
    zero3_multi = s.stage == "zero3" and s.shard > 1
    # ZeRO-3 over several ranks gathers each block's parameters in forward and again in backward (stepsim's "reshard"
    # gathers), but the last blocks gathered at the loss (after the head) stay from their forward to their backward;
    # on one rank a partition is the parameter itself (no gather)
    kept = 0
    if zero3_multi:
        room = ds3_gathered_at_loss(s) - ds3_partitioned(sh.head, s.persistence)
        kept = min(sh.layers, max(0, room) // max(1, ds3_partitioned(sh.block, s.persistence)))
    base = base._replace(mode="reshard" if zero3_multi else None, root=sh.root_numel, head=sum(numel(sh.head)),
                         blocks=(sh.block_numel,) * sh.layers)
    local = s.spec.params if s.stage == "ddp" else shard_numel(s)
    listed = not (_hf_llama(s.spec) or _counted(s.spec))  # stepsim.block_tensors has the block's tensors
    d = DSRecipe(s.stage, s.spec.params, local, s.reduce_bucket, numel(sh.embed), numel(sh.block), sh.layers,
                 numel(sh.head), listed, off_opt, off_params, s.persistence, kept)
    return _replay(base, d)  # None past the address space: the fitted factor gives the figure


