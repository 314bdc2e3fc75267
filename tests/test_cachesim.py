"""cachesim.py (torch's caching allocator rules) judged by the H200's own allocator.

benchmarks/cachesim_check.py ran 40 random allocation/free sequences on an H200 (torch 2.11.0+cu130,
2026-12-01, benchmarks/results/cachesim_h200.json), and benchmarks/allocator_probe.py recorded the
requests of five real training runs through the runner (torch.cuda.memory._record_memory_history:
FSDP2 ZeRO-3, FSDP1 with CPU offload, DeepSpeed without ZeRO, ZeRO-1, ZeRO-3; allocator_events_h200.json.gz).
Replaying the same requests must give the reserved bytes torch reported.
"""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from shardlab.estimate.cachesim import CachingAllocator, segment_size

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _check_script():
    spec = importlib.util.spec_from_file_location("cachesim_check", RESULTS.parent / "cachesim_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_sequences_reserve_what_the_h200_reserved():
    doc = json.loads((RESULTS / "cachesim_h200.json").read_text())
    seq = _check_script().sequence
    assert len(doc["rows"]) == 40
    for row in doc["rows"]:
        sim = CachingAllocator()
        for op in seq(row["seed"]):
            sim.alloc(op[1], op[2]) if op[0] == "a" else sim.free(op[1])
        assert (sim.peak_reserved, sim.segments) == (row["peak_reserved_bytes"], row["segments"]), row["seed"]
        assert sim.peak_allocated == row["peak_allocated_bytes"]


PROBE = {r["id"]: r for r in json.loads((RESULTS / "allocator_probe_h200.json").read_text())["rows"]}
with gzip.open(RESULTS / "allocator_events_h200.json.gz", "rt") as _fh:
    EVENTS = json.load(_fh)


@pytest.mark.parametrize("rid", sorted(EVENTS, key=int))
def test_real_training_requests_replay_to_the_measured_reserved(rid):
    """Each request on its own stream's pool, frees when torch completed them. DeepSpeed ZeRO-3 (#10)
    calls empty_cache while it builds its engine (zero/utils.py defragment): where the H200 gave
    segments back, the replay calls empty_cache() and must give back the same bytes."""
    sim, given_back, prev = CachingAllocator(), 0, None
    for act, addr, size, stream in EVENTS[rid]:
        if act == "aa":
            sim.alloc(addr, size, stream)
        elif act == "fc":
            sim.free(addr)
        elif act == "sf":
            given_back += size
            if prev != "sf":  # the first segment free of an empty_cache() call
                before = sim.reserved
                sim.empty_cache()
                freed = before - sim.reserved
        prev = act
    if given_back:
        assert freed == given_back
    assert sim.peak_reserved == PROBE[int(rid)]["peak_reserved_bytes"]


def test_segment_sizes_follow_torchs_rules():
    assert segment_size(512) == 2 << 20 and segment_size(1 << 20) == 2 << 20
    assert segment_size((1 << 20) + 512) == 20 << 20 and segment_size((10 << 20) - 512) == 20 << 20
    assert segment_size(10 << 20) == 10 << 20 and segment_size((10 << 20) + 512) == 12 << 20


def _batchable(ops, k):
    """The allocations from op k on, and batch()'s keep: those the frees that follow them (before the
    next allocation) do not free."""
    j = k
    while j < len(ops) and ops[j][0] == "a":
        j += 1
    freed, t = set(), j
    while t < len(ops) and ops[t][0] == "f":
        freed.add(ops[t][1])
        t += 1
    return ops[k:j], {i: op[1] for i, op in enumerate(ops[k:j]) if op[1] not in freed}


def _replay_fast(ops, sim, copy_at=None):
    """The same requests through the replays' shortcuts: each run of allocations as one batch() (the
    frees of those not kept are then of nothing live: no-ops), and, at op `copy_at`, the rest issued
    into a copy() (the start-up cache of stepsim.py). Returns the allocator and how many batches."""
    k = batches = 0
    while k < len(ops):
        if k == copy_at:
            sim = sim.copy()
        run, keep = _batchable(ops, k) if copy_at is None or k >= copy_at else ([], {})
        if run and not any(op[1] in sim.live for op in run):
            sim.batch([op[2] for op in run], keep=keep)
            batches += 1
            k += len(run)
            continue
        op = ops[k]
        sim.alloc(op[1], op[2]) if op[0] == "a" else sim.free(op[1])
        k += 1
    return sim, batches


def test_batch_and_copy_reserve_what_the_h200_reserved():
    """batch() (a run of allocations, those freed afterwards not replayed one by one; touch() is a
    batch of one freed) and copy() (resume from a copied state) are what the replays use to issue fewer
    requests: the H200's random sequences through them still give its figures."""
    doc = json.loads((RESULTS / "cachesim_h200.json").read_text())
    seq = _check_script().sequence
    batches = 0
    for row in doc["rows"]:
        ops = list(seq(row["seed"]))
        sim, n = _replay_fast(ops, CachingAllocator())  # batches everywhere they apply
        batches += n
        assert (sim.peak_reserved, sim.segments) == (row["peak_reserved_bytes"], row["segments"]), row["seed"]
        assert sim.peak_allocated == row["peak_allocated_bytes"]
        sim, _ = _replay_fast(ops, CachingAllocator(), copy_at=len(ops) // 2)  # plain up to a copy, then batches
        assert (sim.peak_reserved, sim.segments) == (row["peak_reserved_bytes"], row["segments"]), row["seed"]
    assert batches > 200  # the shortcut was exercised
    one = CachingAllocator()
    one.touch(3 << 20)
    assert (one.segments, one.reserved, one.peak_allocated) == (1, 20 << 20, 3 << 20)


def _blocks(a: CachingAllocator) -> tuple:
    """Every block of the allocator (address, size, free?, neighbours' addresses, pool), its pools and figures."""
    def one(b):
        return b[0], b[1], b[2], b[3] and b[3][0], b[4] and b[4][0], b[5]
    return (a.reserved, a.peak_reserved, a.allocated, a.peak_allocated, a.segments, a._next_addr,
            {p: list(lst) for p, lst in a.pools.items()}, sorted(map(one, a._cached.values())),
            sorted((repr(k), one(b)) for k, b in a.live.items()))


def test_a_batchs_repeated_layers_skipped_only_where_they_repeat():
    """batch(runs=...) leaves out a layer's copy where it provably repeats the one before (cachesim._repeats):
    DeepSpeed's start-up (each parameter moved, then its clone, then the flat buffer) and random blocks, on a
    fresh allocator and on one with cached blocks, give the same blocks, addresses and figures with the runs
    as without them; and the shortcut is taken (a 3072-wide GPT: after the first layers, every one)."""
    import random
    rng = random.Random(13)
    orig, seen = CachingAllocator._repeats, []

    def spy(*args):
        seen.append(orig(*args))
        return seen[-1]

    for case in range(300):
        d, P = rng.choice([96, 512, 1024, 2048, 3072, 5120]), rng.choice([2, 4])
        block = [P * n for n in (d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d)]
        if case % 3 == 0:
            block = [rng.choice([P * d, rng.randrange(1, 1 << 22)]) for _ in range(rng.randrange(1, 10))]
        embed, head, layers = [P * 50000 * d, P * 2048 * d], [P * d, P * d], rng.randrange(1, 33)
        order = embed + block * layers + head
        n, twice = len(order), case % 2 == 0
        sizes = order + order * twice + [rng.choice([sum(order), rng.randrange(1, 1 << 24)])]
        runs = [(2, len(block), layers)] + [(n + 2, len(block), layers)] * twice
        prefill = [rng.randrange(1, 1 << 25) for _ in range(rng.randrange(12))]
        got = []
        for r in ((), runs):
            a = CachingAllocator()
            for i, s in enumerate(prefill):
                a.alloc(("pre", i), s)
            a.frees([("pre", i) for i in range(0, len(prefill), 2)])
            a.batch(sizes, keep={len(sizes) - 1: ("flat",)}, runs=r)
            got.append(_blocks(a))
        assert got[0] == got[1], case
    block = [2 * n for n in (3072, 3072, 3 * 3072 ** 2, 3 * 3072, 3072 ** 2, 3072, 3072, 3072, 4 * 3072 ** 2,
                              4 * 3072, 4 * 3072 ** 2, 3072)]  # a 30-layer, 3072-wide GPT in bf16, as DeepSpeed moves it
    order = [2 * 50000 * 3072, 2 * 2048 * 3072] + block * 30 + [6144, 6144]
    CachingAllocator._repeats = staticmethod(spy)
    try:
        CachingAllocator().batch(order + order + [sum(order)], runs=[(2, 12, 30), (len(order) + 2, 12, 30)])
    finally:
        CachingAllocator._repeats = staticmethod(orig)
    assert sum(s[0] for s in seen if s) >= 50  # of 58 copies after each run's first
    bad = CachingAllocator()  # a run that is not copies of one block is replayed request by request
    bad.batch([3 << 20, 5 << 20, 7 << 20], runs=[(0, 1, 3)])
    good = CachingAllocator()
    good.batch([3 << 20, 5 << 20, 7 << 20])
    assert _blocks(bad) == _blocks(good)


def test_a_limit_gives_the_cache_back_and_counts_it():
    """Under a limit, a request no cached block holds and that would pass it frees every cached segment with no
    live block first (torch's release_cached_blocks before its retry); the flushes and the bytes given back are
    counted for the step time (steptime.FLUSH_S_PER_BYTE)."""
    mib = 2**20
    a = CachingAllocator()
    a.limit = 100 * mib
    a.alloc("live", 40 * mib)
    a.alloc("x", 30 * mib)
    a.alloc("y", 20 * mib)
    a.free("x")
    a.free("y")  # 90 MiB reserved, 40 live; 50 cached in two segments of their own
    a.alloc("z", 32 * mib)  # no cached block holds 32 MiB and a new segment would pass 100 MiB
    assert (a.flushes, a.flushed_bytes, a.flushed_segments) == (1, 50 * mib, 2)
    assert a.reserved == 72 * mib
    a.free("z")
    a.alloc("w", 30 * mib)  # the 32 MiB segment holds it: no flush
    assert a.flushes == 1
    b = CachingAllocator()  # no limit: nothing is given back
    for k, n in (("live", 40), ("x", 30), ("y", 20)):
        b.alloc(k, n * mib)
    b.free("x")
    b.free("y")
    b.alloc("z", 32 * mib)
    assert b.flushes == 0 and b.reserved == 122 * mib
