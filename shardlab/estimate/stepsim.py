"""Reserved memory from a replay: the analytical model's own training step, request by request,
through torch's caching allocator rules (cachesim.py), instead of a fitted fragmentation factor.

The analytical model (memory.py, activations.py) already knows every tensor a step makes, its size
and when it lives: the parameters at start, each block's saved tensors in forward order, the loss's
[tokens, vocab] fp32 rows, each block's gradients in backward (its saved tensors freed as they are
used), the gathered units and reduce buffers of FSDP, the optimizer's lazily made states and its
foreach temporaries, zero_grad. `replayed_reserved(plan, s, workspace)` issues those requests for two
optimizer steps (the second is the steady state: the first step's optimizer states were carved out
of freed activation and loss blocks, so the second step's large requests may need new segments) and
returns the simulator's peak reserved bytes: what torch.cuda.max_memory_reserved reads when nothing
limits the allocator; told the GPU's allocator limit, the same replay runs under it and gives what that GPU
reads, with what the allocator gives back there each step (_on_gpu). No constant is fitted. A replay issues thousands of requests (gpt-1.3b: 3-6
thousand, 3-7 ms on a quiet 2-core CPU, 2026-12-02), so it is cached by its inputs (`Recipe`), and its
start-up by what the start-up depends on (`_Step._start`: a new micro-batch or checkpointing setting
resumes from a copy of the allocator after start-up); a temporary freed as soon as it is made is one
`touch()` of the allocator, a run of requests freed together (but for those kept) one `batch()`.

Covered: FSDP1 and FSDP2 without CPU offload (recorded H200 rows: docs/benchmarks.md, session 9).
CPU offload (session 10): no parameters or optimizer states on the GPU after start-up. FSDP1 copies
each unit in as fp32 on the unshard stream and casts it there, and holds every unit's fp32 gradient
on the reduce stream until the step (allocator probe #38 and #109: those two streams' reserved bytes
replayed within 2%; the whole run's reserved varies 18% between two runs of #38, 3.51 and 4.15 GiB).
Session 12: FSDP1's start-up with offload (each unit's fp32 parameters moved to the GPU, broadcast,
flattened, moved out: their segments stay cached) and each unit's flat 16-bit gradient made on its
unshard stream (VIEW_STREAM; #38/#109's probe: 0.145/0.426 GiB there, replayed exactly).
FSDP2 moves its shards to the CPU after start-up, copies each reduced gradient out and frees it, and
reduces its root group once at the end of backward (probe #308: both streams within 1%). DeepSpeed replays the same
forward, loss and backward with its own parameters, gradients and optimizer step (dsreplay.py's DSStep,
a subclass). Not covered (None: allocator.reserved's factor applies): without activation
checkpointing, a micro-batch of 16k tokens or more whose fp32 loss rows exceed 2 GiB (UNVERIFIED_ROWS:
the H200 held a segment more than the replay, not explained yet), bare parameter counts (no shape).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple

from .activations import _counted, _hf_llama, math_attention_elements, rope_tables, sdpa_math
from .allocator import fits_under
from .basis import fsdp_stage
from .cachesim import BLOCK, SMALL, SMALL_SEGMENT, AddressSpaceExceeded, CachingAllocator, DoesNotFit

UNSHARD_STREAM = 2  # FSDP1 copies offloaded parameters in on a stream of its own (its pre-unshard stream)
REDUCE_STREAM = 1  # FSDP reduces gradients on a stream of its own: its blocks are cached apart
# FSDP1's unshard stream: the unit's parameter views are made there (_unshard: handle.unshard() under
# `stream(unshard_stream)`), so autograd runs their backward, the flat gradient's concatenation, there too
# (allocator probe #38 / #109: one segment of a block's and one of the root's flat 16-bit gradient on a
# stream of their own, 0.145 / 0.426 GiB, no Python frame). Replayed only with CPU offload (below).
VIEW_STREAM = 3
# torch/distributed/fsdp/_init_utils.py PARAM_BROADCAST_BUCKET_SIZE: sync_module_states broadcasts a unit's
# tensors flattened into buckets closed once they reach this many bytes (c10d broadcast_coalesced)
BROADCAST_BUCKET = 250 * 1024 * 1024
# Without activation checkpointing, a micro-batch of at least UNVERIFIED_TOKENS tokens whose fp32
# [tokens, vocab] loss rows exceed UNVERIFIED_ROWS is not replayed: no recorded run that the replay
# matched had both (the most tokens matched without checkpointing: #45, 16384 tokens, 2.0 GiB rows,
# -0.7%; the largest rows: #115, 10240 tokens, 5.8 GiB, -0.5%). The only H200 rows there
# (tune_h200_gpt125*.json: gpt-125m, micro-batch 16 x 1 and 8 x 2, 32768 / 16384 tokens, rows 6.1 /
# 3.1 GiB) hold one more fp32-rows segment than the replay: -15..-17% on 7 of 9 configurations (FSDP1
# and FSDP2 at 16 x 1, FSDP2 at 8 x 2; FSDP1 at 8 x 2: -4..-6%), where the fitted factor is -2..-8%.
# The traced estimate, which replays the real program's own request sequence, misses it the same
# way (gpt-125m FSDP2 16 x 1: -15.8%, 8 x 2: -14.7%, session 9), so the missing segment comes from
# what a CUDA step does beyond its Python-visible tensors: not found yet (docs/benchmarks.md).
UNVERIFIED_TOKENS, UNVERIFIED_ROWS = 16384, 2 << 30


def block_tensors(spec, P: int, tokens: int, compiled: bool = False) -> list[int]:
    """The tensors (bytes) one block saves for backward in forward order (activations.py's layout)."""
    from .activations import block_bytes

    d, f, kv = spec.hidden, spec.ffn, spec.kv_dim
    math = sdpa_math(spec, P, compiled)  # SDPA's math path: its tensors, no log-sum-exp
    stats = tokens * ((0 if math else 4 * spec.heads) + (8 if spec.family == "llama" else 16))
    attn = math_attention_elements(spec)[0] if math else None
    if spec.family == "llama" and not _hf_llama(spec) and not _counted(spec):
        # norm1 in/out, [qkv, rotated q, rotated k, SDPA out | the math path's], out-proj input, norm2 in/out
        elems = [d, d] + (attn or [d + 2 * kv, d, kv, d]) + [d, d, d] + [f] * (3 if compiled else 4)
    elif spec.family != "llama" and not _counted(spec):
        # LN1 in/out, [qkv, SDPA out (the out projection's input) | the math path's + that copy], LN2 in/out
        elems = [d, d] + (attn + [d] if attn else [d + 2 * kv, d]) + [d, d, f, f]
    else:  # a layout without a tensor list: the block's bytes in hidden-sized pieces
        total = tokens * block_bytes(spec, P, compiled)
        piece = tokens * d * P
        n, rest = divmod(total, piece)
        return [piece] * n + ([rest] if rest else [])
    out = [tokens * e * P for e in elems] + [stats]
    tables = rope_tables(spec, P, compiled)
    return out + ([tables] if tables else [])


class Recipe(NamedTuple):
    """Everything the replayed requests depend on (hashable: replays are cached by it). Bytes."""

    framework: str
    mode: str | None  # a unit's compute-dtype copy: "reshard" (made in forward and again in backward), "keep", None
    P: int
    shard: int
    opt_states: int  # optimizer state tensors per parameter (Adam 2, SGD 1, none 0)
    micro: int  # micro-batches replayed per step (the third of an accumulation repeats the second)
    checkpointing: bool
    tokens: int
    hidden: int
    vocab: int
    saved: tuple  # one block's saved tensors after its input, forward order
    root: int  # root unit elements (embedding + final norm + LM head)
    head: int  # final norm + LM head elements
    blocks: tuple  # the other units' elements, wrap order
    params: tuple  # bytes of the fp32 parameter tensors the rank holds (FSDP2: each shard; FSDP1: per unit), over 1 MiB
    small: int  # bytes of those of at most 1 MiB (norms, biases): the small pool, see _small_pool
    workspace: int  # one cuBLAS workspace
    init: tuple  # FSDP2's start-up, in wrap order (blocks, then the root): (full fp32 bytes, shard bytes) per tensor
    offload: bool = False  # FSDP1's CPU offload: each unit copied to the GPU in fp32 on the unshard stream, then cast


def recipe(plan, s, workspace: int, units: bool = True) -> Recipe:
    """The replay's inputs for `plan` on the resolved setup `s` (basis.Setup). units=False: without the
    FSDP units and what is derived from them (root, blocks, params, small, init left empty: DeepSpeed's
    replay sets its own; the wrap units of a new shape are a third of its estimate outside the replay)."""
    from shardlab.models import wrap_units

    spec, sh = s.spec, s.shapes
    tokens = plan.micro_batch_size * spec.seq_len
    compiled = bool(plan.compile) and s.framework == "fsdp2"
    stage = fsdp_stage(s)
    mode = ("reshard" if stage == "zero3" else "keep" if stage == "zero2" or s.framework == "fsdp2" else
            "reshard" if s.P < 4 else None)
    saved = tuple(block_tensors(spec, s.P, tokens, compiled)[1:])
    common = (s.P, max(s.shard, 1), s.opt_bytes // 4, min(s.micro_steps, 2), bool(plan.activation_checkpointing),
              tokens, spec.hidden, spec.vocab, saved)
    if not units:
        return Recipe(s.framework, mode, *common, 0, 0, (), (), 0, workspace // 2, ())
    units = wrap_units(spec, plan.wrap.policy, plan.wrap.min_num_params)
    shard, init = max(s.shard, 1), ()
    if s.framework == "fsdp2":  # per tensor (fp32 bytes, shard bytes): one block's worked out once, then repeated
        def pairs(ts):
            return [(4 * a * b, 4 * -(-(a * b) // shard)) for a, b in ts]

        emb, blk, head = pairs(sh.embed), pairs(sh.block), pairs(sh.head)
        parts = [[h for _, h in emb], [h for _, h in blk], [h for _, h in head]]
        init = tuple(blk * sh.layers + emb + head)  # the root unit's tensors (embedding, final norm, head) are sharded last
    else:
        parts = [[4 * -(-n // shard) for _, n in units], [], []]
    params = tuple([n for n in parts[0] if n > SMALL] + [n for n in parts[1] if n > SMALL] * sh.layers +
                   [n for n in parts[2] if n > SMALL])
    small = sum(sum(-(-n // BLOCK) * BLOCK for n in part if n <= SMALL) * times
                for part, times in zip(parts, (1, sh.layers, 1)))
    return Recipe(s.framework, mode, *common, units[0][1], sum(a * b for a, b in sh.head), tuple(n for _, n in units[1:]),
                  params, small, workspace // 2, init)


_STARTS: dict = {}  # _Step._start's cache: start key -> (allocator after start-up, made_states)


class _Step:
    """Issues one recipe's requests into a CachingAllocator; keys are tuples naming the tensor."""

    # cuBLAS workspaces made where torch makes them, at each thread's first matmul (the forward's at the
    # first forward, autograd's at the head's backward in _loss), not at start-up: dsreplay.DSStep
    LAZY_WORKSPACES = False

    def __init__(self, r: Recipe):
        self.sim, self.r = CachingAllocator(), r
        self.d_bytes = r.tokens * r.hidden * r.P
        self.made_states = False
        # FSDP1's NO_SHARD (one rank) frees every unit's compute-dtype copy when its forward ends, the
        # root's too (_flat_param.py post_reshard frees _mp_shard), and casts the root again when the
        # gradient reaches its output, the logits (H200 #609: kept to the end of backward, +12.1%)
        self.root_out = r.framework == "fsdp1" and r.mode == "reshard" and r.shard == 1
        # FSDP2 reduces its root group (embedding, final norm, head) once, when backward ends (allocator
        # probe #308, CPU offload: its reduce stream held the root's 688 MiB reduce-scatter buffer and
        # its 1374 MiB fp32 cast, 2.2 GiB in all, replayed exactly). Only with offload: without it the
        # recorded rows fit the head's reduce at backward's start better (docs/benchmarks.md, session 10)
        self._root_at_end = r.framework == "fsdp2" and r.offload
        # FSDP1 with offload: each unit's flat 16-bit gradient made on its unshard stream (VIEW_STREAM); the
        # root's (embedding, final norm, head: one flat parameter) once every part of it has its gradient,
        # at the end of backward
        self._views = r.framework == "fsdp1" and r.offload
        # the last step's frees after its last request change no reserved byte (what run returns) and
        # feed no later request: _step skips them there (zero_grad's, a few hundred per DeepSpeed ddp step)
        self.last = False
        self._block_keys: dict = {}  # micro-batch index -> per block, its keys (_keys)
        # blocks from this index on stay gathered from their forward to their backward ("reshard" mode only;
        # none for FSDP, which reshards every block after forward; DeepSpeed ZeRO-3's prefetch keeps the tail:
        # dsreplay.DSStep)
        self.kept_from = len(r.blocks)

    def _gather(self, unit: int, key, backward: bool = False) -> None:
        if self.r.mode == "reshard" or (self.r.mode == "keep" and not backward):
            self._copy_in(key, unit)

    def _copy_in(self, key, unit: int) -> None:
        """A unit's compute-dtype copy; with CPU offload its fp32 parameters are first copied to the GPU
        on the unshard stream and cast there (H200 allocator probe #109: per unit a 4-byte block made and
        freed beside the 2-byte one that stays, on a stream of their own)."""
        if self.r.offload and self.r.framework == "fsdp1":
            self.sim.alloc(("h2d",), 4 * -(-unit // self.r.shard), UNSHARD_STREAM)
            self.sim.alloc(key, self.r.P * unit, UNSHARD_STREAM)
            self.sim.free(("h2d",))
        else:
            self.sim.alloc(key, self.r.P * unit)

    def _release(self, key, backward: bool = False) -> None:
        if self.r.mode == "reshard" or (self.r.mode == "keep" and backward):
            self.sim.free(key)

    def _keys(self, mb) -> list:
        """Per block, the keys of its saved tensors and its output (forward order): made once per
        micro-batch index and reused by every step (a replay's requests are mostly these)."""
        keys = self._block_keys.get(mb)
        if keys is None:
            ns = len(self.r.saved)
            keys = self._block_keys[mb] = [[("a", mb, i, j) for j in range(ns)] + [("x", mb, i)]
                                            for i in range(len(self.r.blocks))]
        return keys

    def _forward(self, mb) -> None:
        sim, r = self.sim, self.r
        if r.mode is not None:
            self._copy_in(("g", "root"), r.root)
        sim.alloc(("x", mb, -1), self.d_bytes)  # the embedding's output: block 0's input
        if r.checkpointing and not (r.offload and r.framework == "fsdp1"):
            self._forward_checkpointed(mb)
            return
        allocs, frees, sizes = sim.allocs, sim.frees, r.saved + (self.d_bytes,)
        gather = r.mode is not None  # _gather and _release in forward: "reshard" and "keep" gather, "reshard" frees
        for i, keys in enumerate(self._keys(mb)):
            if gather:
                self._copy_in(("g", i), r.blocks[i])
            allocs(keys, sizes)  # the saved tensors, then the block output (the next block's input)
            if r.checkpointing:  # only the block input is kept
                frees(keys[:-1])
            if r.mode == "reshard" and i < self.kept_from:
                sim.free(("g", i))

    def _forward_checkpointed(self, mb) -> None:
        """_forward's blocks under checkpointing, one cachesim.batch per block: the gathered unit (kept
        unless it is resharded) and the saved tensors are freed before the next block's requests, only
        the block output stays (the same requests, issued at a fraction of their cost)."""
        r, batch, d_bytes = self.r, self.sim.batch, self.d_bytes
        gathered = [r.P * unit for unit in r.blocks] if r.mode is not None else None
        sizes = list(r.saved) + [d_bytes]
        for i in range(len(r.blocks)):
            if gathered is None:
                batch(sizes, keep={len(sizes) - 1: ("x", mb, i)})
            else:  # the unit first; resharded (freed) at the block's end, or kept
                keep = {len(sizes): ("x", mb, i)}
                if r.mode == "keep" or i >= self.kept_from:
                    keep[0] = ("g", i)
                batch([gathered[i]] + sizes, keep=keep)

    def _loss(self, mb) -> None:
        """Final norm, LM head, the fp32 loss (activations.py: log_softmax keeps its fp32 output; at
        the start of backward nll_loss's and log_softmax's gradients are made beside it), and the
        gradient back to the 16-bit logits and the head's input."""
        sim, r = self.sim, self.r
        rows = 4 * r.tokens * r.vocab
        sim.alloc(("norm", mb), self.d_bytes)
        sim.alloc(("logits", mb), r.P * r.tokens * r.vocab)
        if self.root_out:
            sim.free(("g", "root"))
        if r.P < 4:
            sim.alloc(("f32", mb), rows)
        sim.alloc(("lsm", mb), rows)
        sim.free(("f32", mb))
        sim.free(("logits", mb))
        for k in ("dnll", "dlsm"):
            sim.alloc((k, mb), rows)
        sim.free(("dnll", mb))
        sim.free(("lsm", mb))
        if r.P < 4:
            sim.alloc(("dlogits", mb), r.P * r.tokens * r.vocab)
            if self.root_out:
                self._copy_in(("g", "root"), r.root)
            sim.free(("dlsm", mb))
        sim.alloc(("dx", mb), self.d_bytes)
        if self.LAZY_WORKSPACES and ("ws", 1) not in sim.live:  # the head's backward: autograd's first matmul
            sim.alloc(("ws", 1), r.workspace)
        sim.free(("dlogits", mb))
        sim.free(("dlsm", mb))
        sim.free(("norm", mb))

    def _reduce(self, unit: int, key, first: bool) -> None:
        """A unit's gradient: made unsharded in the compute dtype by autograd; FSDP2 copies it into a
        flat buffer on its reduce stream (FSDP1's flat parameter's gradient is flat already); over more
        than one rank the reduce-scatter writes a new shard there; then the shard is cast there to the
        fp32 sharded gradient, which lives until zero_grad (allocator probe #1, FSDP2: 16 x 44 MiB
        segments of the reduce stream's own for the blocks' fp32 gradients; FSDP1's
        _cast_grad_to_param_dtype likewise, #109). From the second micro-batch on the fp32 shard is a
        temporary added into that gradient."""
        sim, r = self.sim, self.r
        shard = -(-unit // r.shard)
        # The pools of the two streams never share a block, so each stream's requests are issued on
        # their own: on the compute stream the unsharded gradient is made and freed with nothing made
        # there between (a touch); on the reduce stream the flat copy (FSDP2), the reduce-scatter
        # output (several ranks) and the fp32 shard are made, then the first two freed
        sim.touch(r.P * unit)
        if self._views and key[0] != "head":  # FSDP1 + offload: the flat gradient made on the unshard stream
            sim.touch(r.P * (r.root if key[0] == "embed" else unit), VIEW_STREAM)  # (VIEW_STREAM), the root's whole
        alloc, free = sim.alloc, sim.free
        fsdp2, out = r.framework == "fsdp2", r.shard > 1
        if r.framework == "fsdp1" and r.shard == 1 and not first and not r.offload:
            self._accumulate_no_shard(unit, key)
            return
        if fsdp2:
            alloc(("rs",) + key, r.P * unit, REDUCE_STREAM)
        if out:
            alloc(("out",) + key, r.P * shard, REDUCE_STREAM)
        alloc((("grad",) if first else ("rf",)) + key, 4 * shard, REDUCE_STREAM)
        if fsdp2:
            free(("rs",) + key)
        if out:
            free(("out",) + key)
        if not first:
            free(("rf",) + key)
        if r.offload and fsdp2:  # the gradient lives on the CPU: copied out, freed
            free(("grad",) + key)  # (probe #308: the blocks' fp32 gradients share two segments)

    def _accumulate_no_shard(self, unit: int, key) -> None:
        """FSDP1's NO_SHARD (every one-rank FSDP1 run) from the second micro-batch on, outside no_sync (the runner's
        accumulation). prepare_gradient_for_backward keeps the fp32 gradient of the step before in .grad (its size is
        the unsharded size), so autograd adds the new 16-bit flat gradient into it in place (the compute stream's
        touch in _reduce); then _post_backward_hook, on the post-backward stream (REDUCE_STREAM), finds .grad's fp32
        unlike the reduce dtype and casts it down (`flat_param.grad.to(reduce_dtype)`, a 16-bit copy), all-reduces
        that, and _cast_grad_to_param_dtype casts it up again into a new fp32 tensor; the 16-bit copy is freed when
        that returns and the old fp32 gradient (autograd_computed_grad) when the hook returns (torch 2.11
        fsdp/_runtime_utils.py). So the old and the new fp32 gradient and the copy are live together, and the new
        one takes the old one's place. Without mixed precision (fp32) nothing is cast: the in-place add alone. With CPU
        offload .grad is on the CPU and is cleared before each backward: the first micro-batch's path.
        Judged on H200 #912 (llamaT8k fp16, accumulation 2: -15.2% -> -13.4%), #31, #809 and the gpt-125m /
        llama1b grids' FSDP1 accumulation rows (session 13, helper rz; docs/benchmarks.md)."""
        sim, r = self.sim, self.r
        if r.P >= 4:
            return
        g, new = ("grad",) + key, ("rf",) + key
        sim.alloc(("lp",) + key, r.P * unit, REDUCE_STREAM)
        sim.alloc(new, 4 * unit, REDUCE_STREAM)
        sim.free(("lp",) + key)
        sim.free(g)
        sim.live[g] = sim.live.pop(new)  # the new fp32 gradient is .grad now (zero_grad frees it)

    def _backward(self, mb, first: bool) -> None:
        """Blocks in reverse: (gathered again,) recomputed under checkpointing, each saved tensor's
        gradient made as the tensor is freed, the block's gradient reduced."""
        sim, r = self.sim, self.r
        if not self._root_at_end:
            self._reduce(r.head, ("head",), first)
        allocs, keys, saved = sim.allocs, self._keys(mb), r.saved
        # per block: its input freed, the largest saved tensor's gradient made, the saved tensors freed
        # (last first), the gradient of its input made in place of the one from above, then the first freed
        sizes = [None, max(saved)] + [None] * len(saved) + [None, self.d_bytes, None]
        for i in reversed(range(len(r.blocks))):
            if r.mode is not None and i < self.kept_from:  # _gather in backward: "reshard" gathers again
                self._gather(r.blocks[i], ("g", i), backward=True)
            k = keys[i]
            if r.checkpointing:  # the block's forward again
                allocs(k[:-1], saved)
            allocs([k[-1], ("da",)] + k[-2::-1] + [("dx", mb), ("dx", mb), ("da",)], sizes)
            self._reduce(r.blocks[i], ("b", i), first)
            if r.mode is not None:
                self._release(("g", i), backward=True)
        sim.free(("x", mb, -1))
        sim.free(("dx", mb))
        if self._root_at_end:  # FSDP2's root group (embedding, final norm, head) reduces once, at the end
            self._reduce(r.root, ("root",), first)
        else:
            self._reduce(r.root - r.head, ("embed",), first)
        if r.mode is not None:  # the root unit is not resharded after forward (FSDP1 and FSDP2 keep it for backward)
            sim.free(("g", "root"))

    def _step(self) -> None:
        """foreach AdamW: its states made at the first step (zeros_like each parameter, one after
        the other), one fp32 temporary per parameter; then zero_grad(set_to_none=True)."""
        sim, r = self.sim, self.r
        params = r.params
        if not self.made_states:
            sim.allocs([("os", st, k) for k in range(len(params)) for st in range(r.opt_states)],
                       [n for n in params for _ in range(r.opt_states)])
            self.made_states = True
        if r.opt_states:  # the temporaries, made one after the other and all freed
            sim.batch(params)
        if self.last:
            return
        sim.frees([k for k in sim.live if k[0] == "grad"])

    def _init(self) -> None:
        """Start-up. FSDP2 as the runner wraps (frameworks/fsdp2.py): the full fp32 model is moved to
        the GPU (model.to(device)), then fully_shard makes each parameter's shard (a copy), blocks
        first, and frees the full tensor. Their segments stay cached: over several ranks a shard is a
        fraction of what was freed (the traced estimate, which runs the same wrap, showed it: gpt-350m
        FSDP2 ZeRO-3 on 8 ranks with checkpointing, 4.89 GiB traced against 3.94 replayed without it,
        4.84 with it; on one rank the recorded H200 rows move by 0.1%). FSDP1 (its flat parameters
        made unit by unit as its wrappers are built): the held tensors only; its start-up as FSDP1
        does it, tried, took #312 (llamawide6, one rank) from -5.8% to -11.0% and did not close
        8 ranks' gap to the trace, whose peak allocated is itself 3-6% above the analytical one."""
        sim, r = self.sim, self.r
        if r.framework != "fsdp2":
            if r.offload and r.init:
                self._init_fsdp1_offload()
                return
            sim.allocs([("p", k) for k in range(len(r.params))], r.params)
            return
        # The small pool's full tensors (norms, biases: at most 1 MiB each; their shards are counted apart, _small_pool)
        # are all made before any is freed, and the two pools never share a block: they are one batch (cachesim.batch),
        # which leaves each pool's segments and blocks as the calls did (in the same order, at other addresses), at
        # half the start-up's cost. Its peak allocated reads up to their bytes lower (they were live beside the large
        # tensors until each was freed): KiB to a few MiB, which would matter only where the start-up is itself the
        # replay's peak and that close to the allocator's limit (_on_gpu's DoesNotFit)
        sim.batch([full for full, _ in r.init if full <= SMALL])
        big = [k for k, (full, _) in enumerate(r.init) if full > SMALL]
        sim.allocs([("full", k) for k in big], [r.init[k][0] for k in big])
        keys, sizes = [], []  # each shard made (parameters over 1 MiB), then its full tensor freed
        for k in big:
            if r.init[k][1] > SMALL:
                keys.append(("p", k))
                sizes.append(r.init[k][1])
            keys.append(("full", k))
            sizes.append(None)
        sim.allocs(keys, sizes)
        if r.offload:  # CPUOffloadPolicy: the shards move to the CPU, their segments stay cached
            sim.frees([("p", k) for k in range(len(r.init))])

    def _init_fsdp1_offload(self) -> None:
        """FSDP1 with CPU offload, as the runner wraps (device_id set, sync_module_states): each unit, the
        blocks first and the root last (the auto-wrap policy wraps children before their parent), moves its
        fp32 parameters to the GPU one by one (_init_utils.py _move_states_to_device), broadcasts them
        flattened in buckets (_sync_module_params_and_buffers), flattens them into its flat parameter
        (FlatParamHandle, flatten_tensors: the originals become views of it and their storages are freed),
        then moves that to the CPU (_init_param_handle_from_params: flat_param_to(cpu)). Nothing of it stays
        allocated; its segments stay cached on the default stream for the step's activations (allocator
        probe #109: 384 + 384 MiB moved, 386 MiB broadcast, 770 MiB flattened for the root, 98 MiB per
        block's broadcast; #38 the same at its sizes). Over several ranks shard() copies the shard out of the
        flat parameter before it is freed."""
        sim, r = self.sim, self.r
        for u, sizes in enumerate(r.init):
            keys = [("full", u, k) for k in range(len(sizes))]
            sim.allocs(keys, sizes)
            buckets, size = [], 0
            for n in sizes:
                size += n
                if size >= BROADCAST_BUCKET:
                    buckets.append(size)
                    size = 0
            sim.touches(buckets + ([size] if size else []))
            flat = sum(sizes)
            sim.alloc(("flat", u), flat)
            sim.frees(keys)
            if r.shard > 1:
                sim.touch(-(-flat // r.shard))
            sim.free(("flat", u))

    def _start_key(self) -> tuple:
        """What the start-up (_init and the workspaces) depends on: neither the batch nor checkpointing."""
        r = self.r
        return r.framework, r.params, r.init, r.offload, r.workspace

    def _start(self) -> None:
        """Start-up, resumed from a copy where one with the same inputs was replayed before: a widget
        changing the micro-batch, accumulation or checkpointing replays the same start-up (for FSDP2
        every parameter's full tensor and shard, a quarter of the requests)."""
        key = (type(self),) + self._start_key()
        done = _STARTS.get(key)
        if done is not None:
            self.sim, self.made_states = done[0].copy(), done[1]
            return
        self._init()
        for k in () if self.LAZY_WORKSPACES else range(2):  # forward's and autograd's cuBLAS handles
            self.sim.alloc(("ws", k), self.r.workspace)  # (memory.cublas_workspaces)
        if len(_STARTS) >= 64:
            del _STARTS[next(iter(_STARTS))]
        _STARTS[key] = (self.sim.copy(), self.made_states)

    def one_step(self, last: bool = False) -> None:
        """One optimizer step: every micro-batch's forward, loss and backward, then the step. last: the
        replay's final step (its trailing frees are skipped: _step)."""
        for mb in range(self.r.micro):
            self._forward(mb)
            self._loss(mb)
            self._backward(mb, first=mb == 0)
        self.last = last
        self._step()

    def run(self, steps: int = 2) -> int:
        """Replays `steps` optimizer steps from the start-up and returns the peak reserved bytes."""
        with _collector_paused():
            try:
                self._start()
                for step in range(steps):
                    self.one_step(last=step == steps - 1)
                return self.sim.peak_reserved
            finally:
                self.sim.unlink()


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector paused while a replay runs: its thousands of linked blocks (none
    garbage until it ends) would be scanned again and again, and promoted to the older generations whose
    collections scan the whole process; the replay unlinks them at its end (cachesim.unlink), so they are
    freed at once."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _small_pool(r: Recipe) -> int:
    """Segments of the small pool (requests of at most 1 MiB, cached apart from the large pool: the two
    add up) for the small parameters, their optimizer states and their foreach temporaries, all alive at
    the optimizer step, packed into 2 MiB segments. Counted, not replayed: on an FSDP2 model they are
    up to 40% of the requests and a few MiB."""
    return -(-r.small * (2 + r.opt_states) // SMALL_SEGMENT) * SMALL_SEGMENT if r.small else 0


_UNLIMITED: dict = {}  # _replay_both's answers by recipe (a dict, not an lru_cache: _on_gpu looks in it first)


def _replay_both(r: Recipe) -> tuple[int, int] | tuple[None, None]:
    """(peak reserved, peak allocated) of the replayed step with no allocator limit. (None, None) for a step past the
    replay's address space (cachesim.AddressSpaceExceeded: no GPU holds it), cached like any other answer."""
    done = _UNLIMITED.get(r)
    if done is None:
        st = _Step(r)
        try:
            done = st.run() + _small_pool(r), st.sim.peak_allocated + _small_pool(r)
        except AddressSpaceExceeded:
            done = None, None
        if len(_UNLIMITED) >= 512:
            del _UNLIMITED[next(iter(_UNLIMITED))]
        _UNLIMITED[r] = done
    return done


def _replay(r: Recipe) -> int | None:
    return _replay_both(r)[0]


def declined(plan, s) -> bool:
    """What both replays (this one and dsreplay.py's) decline whatever the framework: a bare parameter
    count (no shape), units that could not be resolved, and the regime no replay has matched
    (UNVERIFIED_TOKENS / UNVERIFIED_ROWS above)."""
    if s.spec.is_bare or s.unknown_units:
        return True
    tokens = plan.micro_batch_size * s.spec.seq_len
    return not plan.activation_checkpointing and tokens >= UNVERIFIED_TOKENS and 4 * tokens * s.spec.vocab > UNVERIFIED_ROWS


def covered_recipe(plan, s, workspace: int) -> Recipe | None:
    """The replay's recipe for `plan`, or None where the replay does not cover it (module docstring)."""
    offload = s.offload_opt != "none" or s.offload_params != "none"
    if s.ds or declined(plan, s):
        return None
    r = recipe(plan, s, workspace)
    if offload:  # FSDP1 offloads parameters, gradients and optimizer together: none of them stay on the GPU
        r = r._replace(params=(), small=0, opt_states=0, offload=True)
        if s.framework == "fsdp1":  # its start-up on the GPU, unit by unit (_Step._init_fsdp1_offload)
            sh = s.shapes
            block = tuple(4 * a * b for a, b in sh.block)
            r = r._replace(init=(block,) * sh.layers + (tuple(4 * a * b for a, b in sh.embed + sh.head),))
    return r if len(r.blocks) == s.spec.layers else None  # units not one per block (size / none policies): not replayed


def replayed_reserved(plan, s, workspace: int, limit: int | None = None) -> int | None:
    """Peak reserved bytes of the replayed step, or None where the replay does not cover the plan (see the module
    docstring; None past the address space too: the fitted factor gives it). workspace: bytes of the step's cuBLAS
    workspaces; limit: the GPU's allocator limit, where known: the figure is then the one that GPU shows (_on_gpu)."""
    r = covered_recipe(plan, s, workspace)
    if r is None:
        return None
    return _replay(r) if limit is None else _on_gpu(r, int(limit))[0]


CHURN_STEPS = 4  # replayed steps under a cap; the first two (start-up, first optimizer states) are not counted
NO_CHURN = (0.0, 0.0, 0.0)


def _misfit(limit: int) -> int:
    """The least peak allocated that does not fit under `limit` (allocator.fit's need: the peak + what stays stranded)."""
    lo, hi = 0, limit + 1  # fits_under(x, limit) holds up to some x and not beyond: the least x where it does not
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if fits_under(mid, limit) else (lo, mid)
    return lo


@lru_cache(maxsize=256)
def _on_gpu(r: Recipe, limit: int) -> tuple[int | None, tuple[float, float, float]]:
    """The step on a GPU whose caching allocator may hold `limit` bytes: (the peak reserved that GPU shows, and per
    counted step the flushes, bytes and segments the allocator gives back at the limit: capped_churn).

    One replay with the limit from the start-up on (cachesim.CachingAllocator.limit: where a new segment would pass
    it, the cache is given back first). Up to the first request that passes the limit it makes the requests of the
    replay without one, with the same results. So where steps 0 and 1 never pass it, their peak is the unlimited
    replay's, and no steady step gives anything back. Where they pass it, the unlimited peak lies above the limit
    and that GPU shows the limit (allocator.on_gpu: torch's allocator never holds more; on the H200 capped at
    18 GiB the FSDP rows that reached the cap reserved 17.98-18.0 GiB, tune_h200_gpt350cap_grid.json), and steps
    2 and 3 are replayed to count what each gives back (a step 3 that would repeat step 2 is not: below). Where the
    peak allocated itself does not fit (allocator.fit's need past the limit: cachesim.DoesNotFit, raised at the
    first flush past it), nothing is given back in a run that cannot happen, and the figure is what the step
    would need: the unlimited replay's. (None, NO_CHURN) past the replay's address space.

    Two shortcuts, exact. Where the replay without a limit was made already (memory.py asks for it where the plan
    does not fit by the analytical peak), its figures settle a step that stays under the limit or does not fit
    without replaying it again (one at the limit is still replayed under it, for what it gives back). And where step 2 made no cudaMalloc (so gave nothing back: the limit only flushes before one) and left every
    free block and every live tensor where step 1 left them, the allocator is in the state step 2 started from,
    so step 3 repeats step 2."""
    small = _small_pool(r)
    known = _UNLIMITED.get(r)
    if known is not None:
        reserved, allocated = known
        if reserved is None or reserved <= limit or not fits_under(allocated, limit):
            return reserved, NO_CHURN
    st = _Step(r)
    seen = []
    with _collector_paused():
        try:
            st._start()
            sim = st.sim
            sim.limit, sim.give_up_at = limit - small, _misfit(limit) - small
            st.one_step()
            st.one_step()
            if not sim.flushes and sim.peak_reserved <= sim.limit:  # never at the limit: the unlimited replay's peak
                return sim.peak_reserved + small, NO_CHURN
            if sim.peak_allocated >= sim.give_up_at:
                raise DoesNotFit(sim.peak_allocated)
            sim.give_up_at = None
            left = (sim._next_addr, {p: lst[:] for p, lst in sim.pools.items()}, [(k, b[0], b[1]) for k, b in sim.live.items()])
            for step in range(2, CHURN_STEPS):
                before = (sim.flushes, sim.flushed_bytes, sim.flushed_segments)
                st.one_step()
                seen.append((sim.flushes - before[0], sim.flushed_bytes - before[1], sim.flushed_segments - before[2]))
                if step == 2 and step < CHURN_STEPS - 1 and (
                        sim._next_addr == left[0] and sim.pools == left[1] and
                        [(k, b[0], b[1]) for k, b in sim.live.items()] == left[2]):
                    seen += [seen[-1]] * (CHURN_STEPS - 1 - step)
                    break
        except DoesNotFit:
            seen = None
        except AddressSpaceExceeded:
            return None, NO_CHURN
        finally:
            st.sim.unlink()
    if seen is None:
        return _replay(r), NO_CHURN
    return limit, tuple(sum(x[i] for x in seen) / len(seen) for i in range(3))


def capped_churn(plan, s, workspace: int, limit: int) -> tuple[float, float, float] | None:
    """Under an allocator limit of `limit` bytes: per steady step, (flushes, bytes given back, segments given
    back) - the caching allocator's free-and-retry at the cap (cachesim.CachingAllocator.limit), each byte
    of which cudaMalloc makes again. None where the replay does not cover the plan; nothing where the
    replayed step never reaches the limit, or where its live bytes pass it (the plan does not fit:
    allocator.fit). The replay's start-up and first two steps are not counted (they run before the timed steps).
    The replay is the one memory's figure for that GPU came from (_on_gpu): it costs nothing more here."""
    r = covered_recipe(plan, s, workspace)
    return None if r is None else _on_gpu(r, int(limit))[1]
