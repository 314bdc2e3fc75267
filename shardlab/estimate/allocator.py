"""What the CUDA caching allocator reserves (what nvidia-smi shows, what runs out) for a peak allocation.

torch's caching allocator (c10/cuda/CUDACachingAllocator.cpp) rounds every request up to 512 bytes;
requests of at most 1 MiB are served from 2 MiB segments (the small pool), larger ones from segments
of their own rounded up to 2 MiB (up to 10 MiB requests share 20 MiB segments). A freed block stays
in its segment, cached, and is split for later requests of other sizes; a request no cached block
can hold makes a new segment. So reserved memory is the peak of live tensors plus what the
training step's changing mix of sizes (activations freed in backward, gradients, gathered units,
optimizer temporaries, the loss's [tokens, vocab] rows) leaves stranded in cached blocks.

The model here: reserved = live bytes rounded to 2 MiB segments, times (1 + FRAGMENTATION).
FRAGMENTATION is fitted, not derived: the odd-numbered rows of the H200 fidelity matrix
(benchmarks/results/fidelity_h200.json, 2026-12-01: reserved / allocated from 1.11 to 1.35, least
squares 1.218) and checked on the even-numbered rows (median error 6%; tests/test_gpu_results.py).
It is weakest where little is allocated and much is staged: with CPU offload of parameters the
allocator keeps ~2.5 GiB of transfer blocks that a 2-8 GiB peak does not explain (rows 36, 38).

At the device's limit the cache gives way: when a request cannot be met (cudaMalloc fails, or the
per-process memory fraction would be passed) the allocator frees its cached, unused segments and
retries (CUDACachingAllocator.cpp, release_cached_blocks), so reserved memory never exceeds the
limit while the live bytes fit under it. Measured: tune's gpt-350m grid on an H200 capped to 18 GiB
(benchmarks/results/tune_h200_gpt350cap.json) reserved 16.96-18.00 GiB in every run whose uncapped
prediction was 19.1-21.3 GiB.
"""

from __future__ import annotations

BLOCK = 512  # every allocation is rounded up to a multiple of 512 bytes
SEGMENT = 2 * 2**20  # large-pool segments are rounded up to 2 MiB
FRAGMENTATION = 0.218  # fitted: odd rows of benchmarks/results/fidelity_h200.json (see above)


def reserved(peak_allocated: int, limit: int | None = None) -> int:
    """Predicted torch.cuda.max_memory_reserved() for a step whose peak allocation is `peak_allocated`,
    on a device whose allocator may hold at most `limit` bytes (None: no limit)."""
    if peak_allocated <= 0:
        return 0
    segments = -(-peak_allocated // SEGMENT) * SEGMENT
    out = int(segments * (1 + FRAGMENTATION))
    return max(peak_allocated, min(out, limit)) if limit else out
