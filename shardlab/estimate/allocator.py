"""What the CUDA caching allocator reserves for a peak allocation, and what must fit at the memory limit.

torch's caching allocator (c10/cuda/CUDACachingAllocator.cpp) rounds every request up to 512 bytes;
requests of at most 1 MiB are served from 2 MiB segments (the small pool), larger ones from segments
of their own rounded up to 2 MiB (up to 10 MiB requests share 20 MiB segments). A freed block stays
in its segment, cached, and is split for later requests of other sizes; a request no cached block
can hold makes a new segment. So reserved memory is the peak of live tensors plus what the
training step's changing mix of sizes (activations freed in backward, gradients, gathered units,
optimizer temporaries, the loss's [tokens, vocab] rows) leaves stranded in cached blocks.

reserved(): live bytes rounded to 2 MiB segments, times (1 + FRAGMENTATION): what
torch.cuda.max_memory_reserved reads when nothing limits the allocator. FRAGMENTATION is fitted, not
derived: the odd-numbered rows of the H200 fidelity matrix (benchmarks/results/fidelity_h200.json,
2026-12-01: reserved / allocated from 1.11 to 1.35, least squares 1.218) and checked on the
even-numbered rows and every other recorded file (tests/test_gpu_results.py). One factor cannot hold
everywhere: the measured ratio runs from 1.03 to 1.41 without offload, and what decides it is the
order and sizes of the requests (cachesim.py; the traced estimate replays them). Tried and not kept
(docs/benchmarks.md, session 8): a factor of its own for activation checkpointing (its backward
re-runs each block's forward beside the gradients: the matrix's 10 checkpointed rows fit 1.297, and
the other fidelity files' checkpointed rows went from 5.5% to 2.0% median error) over-predicted the
tune grids' gpt-125m checkpointed rows (16 of 18 within 10% -> 9 of 18: +18%), whose peak is the loss's
large fp32 rows reused whole step after step.

A second mechanism sets a floor (`again`): a large transient buffer freed at the end of one step and
split by the next requests cannot be reused whole by the next step, which makes it again in a new
segment. DeepSpeed ZeRO-1/2's reduce bucket (reduce_bucket_size elements, 954 MiB in bf16) is freed
when backward ends, FusedAdam makes its states at the first step inside it, and the second step's
bucket takes a segment of its own (allocator probe, benchmarks/results/allocator_probe_h200.json:
two 954 MiB segments made by setup_buckets in #202/#203). So reserved >= peak + that buffer: it
decides only where the bucket is large beside the peak (#202/#203, 1.25 GiB allocated: -28% -> +3%).

Where the plan allows (FSDP1/FSDP2 without CPU offload), memory.py takes reserved from stepsim.py
instead: the analytical model's own step, request by request, through cachesim.py, with no fitted
constant (session 9: those recorded fidelity rows median 1.5% off, against the factor's 5%); since
session 10 DeepSpeed without ZeRO, ZeRO-1 and ZeRO-3 without offload replay DeepSpeed's own order
(dsreplay.py: 39 of 42 fidelity rows within 10%, median 0.7%, against the factor's 32 and 5.2%; session
11, the cuBLAS workspaces made at each thread's first matmul: 50 of 51, median 0.35%). The
factor stays for ZeRO-2 (replayed, not used: dsreplay.REPLAYED says why) and for ZeRO-1/2's optimizer
offload; FSDP's offload is replayed since session 10 (stepsim.py: #38 -51% -> -18%, #109 -32% -> -20%,
#308 -13% -> +0.1%, #37 -7.7% -> -9.0%; session 12, FSDP1's start-up and flat gradients: #38 -9.7%,
#109 -17.4%), ZeRO-3's CPU offload since session 12 (dsreplay.py: #36 -31% -> -2.1%, #117 -18% ->
+1.3%, #309 -13% -> -1.6%).

What neither covers (docs/benchmarks.md, memory section): FSDP1's side streams without offload (each
with its own cache, reserved varying 5-14% run to run; with offload replayed), the frees FSDP1 defers
to other streams' work (record_stream: #109 reserved 14.49, 15.71 and 16.77 GiB in three runs, a
1.5 GiB loss block apart each). DeepSpeed ZeRO-3's empty_cache calls and sub-group-sized fp32 buffers
in segments of their own and its offload's transfer blocks are replayed (dsreplay.py). The traced estimate
replays a fake step's own requests through cachesim.py instead (FSDP1/FSDP2).

fit(): what decides whether a plan fits, for the estimate, `shardlab tune` and the widgets alike.
That cache is not what runs out. When a new segment would pass the limit (cudaMalloc fails, or the
reserved total would pass `torch.cuda.set_per_process_memory_fraction`'s cap), the allocator frees
a cached block of sufficient size, then every cached segment with no live block in it, and retries
before it raises OOM. Only free space inside segments that still hold a live block (split blocks)
cannot be given back. So what must fit under the allocator's limit is the peak allocated plus that
stranded share (STRANDED), and the CUDA context (outside the allocator) must fit beside it:

    need  = peak_allocated x (1 + STRANDED)              <= limit: fits by the estimate
    safe  = peak_allocated x (1 + MEMORY_MARGIN) x (1 + STRANDED) <= limit: fits even if the estimate
            is short by its measured error
    limit = GPU memory - CUDA_CONTEXT_BYTES, or the allocator's cap where one is set (gpus.capped)

Verdicts: "fits" (safe), "tight" (need fits, safe does not: a real run decides), "does not fit".
A peak reserved from an unconstrained run (1.1-1.35 x allocated, above) says nothing about the limit:
on the H200 capped at 18 GiB (benchmarks/results/tune_h200_gpt350cap.json) five gpt-350m plans
predicted at 20.4-21.3 GiB reserved trained, reserving 17.0-18.0 GiB around 16.8-17.5 GiB allocated.
So the reserved figure an estimate shows is the one its GPU would show (on_gpu, session 24): the figure without a
limit, or the limit where that is less and the plan fits (what a plan that does not fit would need, else).
"""

from __future__ import annotations

from shardlab.units import GIB

BLOCK = 512  # every allocation is rounded up to a multiple of 512 bytes
SEGMENT = 2 * 2**20  # large-pool segments are rounded up to 2 MiB
FRAGMENTATION = 0.218  # fitted: odd rows of benchmarks/results/fidelity_h200.json (see above)
CUDA_CONTEXT_BYTES = 1 * GIB  # context ~0.5 GiB on Hopper/Ampere + NCCL buffers: outside the allocator
# Share of the peak allocated stranded in split segments when the allocator frees its cache at the
# limit. Bounded above, not fitted: under the 18 GiB cap (tune_h200_gpt350cap.json, fsdp2 zero2
# mb4x2) 17.54 GiB allocated trained with reserved <= 18 GiB, so at most 0.46 GiB (2.6%) stayed
# stranded there; the other four capped rows allow up to 7%. No OOM recorded bounds it from below.
STRANDED = 0.02
# The estimate's measured error on peak allocated: issue 13's held-out bar. On every H200 row with a
# measurement (benchmarks/results/fidelity_h200*.json, tune_h200_*.json: 238 rows on 2026-12-01,
# analytic estimate, benchmarks/fit_check.py) the run allocated more than predicted by over 10% only
# in DeepSpeed ZeRO-1 with accumulation (#32, mb2 x 4: +14.4%) and ZeRO-3 with parameter offload (#36 +11.0%);
# next +7.8% (#42); median +0.1%.
MEMORY_MARGIN = 0.10
VERDICTS = ("fits", "tight", "does not fit")


def reserved(peak_allocated: int, again: int = 0) -> int:
    """Predicted torch.cuda.max_memory_reserved() for a step whose peak allocation is `peak_allocated`,
    with no allocator limit (under a limit the allocator frees its cache and retries: see fit()).
    again: bytes of a transient buffer each step makes again in a segment of its own (see above)."""
    if peak_allocated <= 0:
        return 0
    segments = -(-peak_allocated // SEGMENT) * SEGMENT
    floor = segments + (-(-again // SEGMENT) * SEGMENT if again > 0 else 0)
    return max(int(segments * (1 + FRAGMENTATION)), floor)


def stranded(peak_allocated: int) -> int:
    """Bytes the allocator cannot give back at the limit for a step peaking at `peak_allocated`."""
    return int(STRANDED * max(peak_allocated, 0))


def fits_under(peak_allocated: int, limit: int) -> bool:
    """Whether a step peaking at `peak_allocated` bytes fits under an allocator limit of `limit` bytes: the peak plus
    what stays stranded at the limit (fit's need) within it."""
    return peak_allocated + stranded(peak_allocated) <= limit


def on_gpu(reserved_bytes: int, peak_allocated: int, limit: int) -> int:
    """The peak reserved a GPU whose allocator may hold `limit` bytes shows for a step that would reserve
    `reserved_bytes` with no limit: at most the limit, where the step fits (fit's need within it), since at the limit
    torch gives its cache back and retries instead of reserving more (on the H200 capped at 18 GiB,
    tune_h200_gpt350cap_grid.json, the plans predicted at 18.4-20.4 GiB without the cap reserved 16.96-18.0 GiB);
    else `reserved_bytes`, what the step would need."""
    return min(reserved_bytes, limit) if fits_under(peak_allocated, limit) else reserved_bytes


def allocator_limit(gpu) -> int:
    """Bytes the caching allocator may hold on `gpu` (a GPU): its cap if one is set, else the memory
    less the CUDA context."""
    cap = getattr(gpu, "allocator_limit_bytes", None)
    return int(cap) if cap else int(gpu.memory_bytes) - CUDA_CONTEXT_BYTES


def fit(peak_allocated: int, gpu, margin: float = MEMORY_MARGIN) -> dict:
    """The verdict for a step peaking at `peak_allocated` bytes on `gpu`, with the figures behind it
    (bytes): {"verdict", "need_bytes", "safe_bytes", "limit_bytes", "headroom_bytes", "margin", "why"}."""
    limit = allocator_limit(gpu)
    need = peak_allocated + stranded(peak_allocated)
    safe = int(peak_allocated * (1 + margin)) + stranded(int(peak_allocated * (1 + margin)))
    verdict = "fits" if safe <= limit else "tight" if need <= limit else "does not fit"
    where = (f"the allocator's {limit / GIB:.2f} GiB cap" if getattr(gpu, "allocator_limit_bytes", None) else
             f"{limit / GIB:.2f} GiB ({gpu.memory_bytes / GIB:.1f} GiB less {CUDA_CONTEXT_BYTES / GIB:g} GiB CUDA context)")
    head = f"peak allocated {peak_allocated / GIB:.2f} GiB + {STRANDED:.0%} stranded = {need / GIB:.2f} GiB"
    why = {"fits": f"{head}; with the estimate's {margin:.0%} error {safe / GIB:.2f} GiB <= {where}",
           "tight": f"{head} <= {where}, but {safe / GIB:.2f} GiB with the estimate's {margin:.0%} error is not: a run decides",
           "does not fit": f"{head} > {where}"}[verdict]
    return {"verdict": verdict, "need_bytes": need, "safe_bytes": safe, "limit_bytes": limit,
            "headroom_bytes": limit - need, "margin": margin, "why": why}
