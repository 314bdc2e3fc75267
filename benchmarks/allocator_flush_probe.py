"""What one flush of torch's CUDA caching allocator costs: cudaFree of the cached segments and cudaMalloc of them
again (issue 14, session 11).

Under an allocator cap (torch.cuda.set_per_process_memory_fraction) or at the GPU's memory, a request that no
cached block holds and that would pass the limit makes the allocator free its cached segments (cudaFree, which
synchronises the device) and retry; the next requests of those sizes then call cudaMalloc again. stepsim.py's
replay with the cap says how many bytes a step frees and makes again that way (steptime.capped_churn); this
probe prices them on the GPU, with no training step involved:

1. bare: N segments of one size made (torch.empty), freed into the cache, then torch.cuda.empty_cache() timed
   (cudaFree) and the same N requests timed again (cudaMalloc), for several sizes and counts;
2. capped: the allocator capped, a cache left holding freed segments, and one request that cannot fit beside
   them timed whole (the allocator's own free-and-retry path; memory_stats' num_alloc_retries counts it).

    python3 benchmarks/allocator_flush_probe.py [--json OUT] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

MIB = 2**20
GIB = 2**30
# (segment size, count): the capped gpt-350m replays free 5-15 GiB a step in 30-54 segments (~300 MiB each)
SETS = [(20 * MIB, 200), (64 * MIB, 100), (320 * MIB, 36), (1 * GIB, 12), (2900 * MIB, 4)]


def bare(torch, size: int, count: int, reps: int) -> dict:
    free_s, malloc_s = [], []
    for _ in range(reps + 1):
        torch.cuda.empty_cache()
        xs = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(count)]
        del xs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda.empty_cache()
        t1 = time.perf_counter()
        xs = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(count)]
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        del xs
        free_s.append(t1 - t0)
        malloc_s.append(t2 - t1)
    free_s, malloc_s = free_s[1:], malloc_s[1:]  # the first repetition warms the driver
    total = size * count
    f, m = statistics.median(free_s), statistics.median(malloc_s)
    return {"segment_mib": size / MIB, "count": count, "gib": total / GIB, "free_ms": 1e3 * f, "malloc_ms": 1e3 * m,
            "free_plus_malloc_ms_per_gib": 1e3 * (f + m) / (total / GIB), "free_s_all": free_s, "malloc_s_all": malloc_s}


def capped(torch, reps: int) -> dict:
    """A 24 GiB cap; 8 GiB live; 12 GiB of 300 MiB segments freed into the cache; then one 8 GiB request, which
    fits only after the cache is given back: timed whole (free-and-retry, then its own cudaMalloc)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(24 * GIB / total)
    out = []
    for _ in range(reps + 1):
        torch.cuda.empty_cache()
        live = torch.empty(8 * GIB, dtype=torch.uint8, device="cuda")
        xs = [torch.empty(300 * MIB, dtype=torch.uint8, device="cuda") for _ in range(40)]
        del xs
        torch.cuda.synchronize()
        r0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        t0 = time.perf_counter()
        big = torch.empty(8 * GIB, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        r1 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        # the reference: the same 8 GiB cudaMalloc with nothing to give back first
        del big
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        big = torch.empty(8 * GIB, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        del big, live
        out.append({"with_flush_ms": 1e3 * (t1 - t0), "plain_malloc_ms": 1e3 * (t3 - t2), "retries": r1 - r0})
    torch.cuda.set_per_process_memory_fraction(1.0)
    out = out[1:]
    return {"cap_gib": 24, "freed_gib": 40 * 300 / 1024, "runs": out,
            "with_flush_ms": statistics.median(o["with_flush_ms"] for o in out),
            "plain_malloc_ms": statistics.median(o["plain_malloc_ms"] for o in out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this probe needs a GPU")
        return 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "bare": [bare(torch, s, n, a.reps) for s, n in SETS], "capped": capped(torch, a.reps)}
    for b in res["bare"]:
        print(f"{b['count']:4d} x {b['segment_mib']:7.0f} MiB = {b['gib']:5.1f} GiB: cudaFree {b['free_ms']:7.2f} ms, "
              f"cudaMalloc {b['malloc_ms']:7.2f} ms, both {b['free_plus_malloc_ms_per_gib']:6.2f} ms/GiB")
    c = res["capped"]
    print(f"capped: an 8 GiB request that needs {c['freed_gib']:.1f} GiB of cache given back: {c['with_flush_ms']:.2f} ms "
          f"(the same request with nothing to give back {c['plain_malloc_ms']:.2f} ms); retries {[o['retries'] for o in c['runs']]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
