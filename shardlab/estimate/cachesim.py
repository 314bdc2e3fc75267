"""A replay of torch's CUDA caching allocator: what a sequence of allocations and frees reserves.

The rules are those of c10/cuda/CUDACachingAllocator.cpp (torch 2.x, expandable segments off,
no max_split_size, no garbage-collection threshold: torch's defaults):

- every request is rounded up to a multiple of 512 bytes;
- requests of at most 1 MiB come from the small pool, larger ones from the large pool;
- a request is served by the smallest cached free block of its pool (and stream) that holds it
  (best fit); the block is split when what is left is at least 512 bytes (small pool) or more than
  1 MiB (large pool), the remainder staying cached and free;
- when no cached block holds it, a new segment is made (cudaMalloc): 2 MiB for small requests,
  20 MiB for large requests under 10 MiB, else the request rounded up to 2 MiB;
- a freed block merges with free neighbours of its own segment; segments are never given back
  (torch only does that on empty_cache() or when cudaMalloc fails at the memory limit);
- empty_cache() gives back every segment with no live block in it (DeepSpeed calls it while it
  builds its engine: dsreplay.py).

So reserved memory (what torch.cuda.max_memory_reserved reads) depends on the order and sizes of
the requests, not only on their peak: a long-lived tensor allocated inside a freed transient block
(optimizer states made lazily at the first step inside the first backward's freed activations or
reduce bucket) splits it, and the next step's transient tensor of that size needs a new segment.
The traced estimate (trace.py) replays every storage of its fake training step through this.

Speed: the analytical estimate replays its step through this for every plan a widget has not shown
before (stepsim.py, dsreplay.py), so the bookkeeping is lean: blocks are lists, a pool's free blocks
one sorted list of ints (size << 48 | address: best fit by bisect), `touch()` stands for an allocation
freed at once and `batch()` for allocations all freed afterwards (the optimizer's per-parameter
temporaries: the same state as the calls), `copy()` lets a replay resume from a cached state.
`allocs()`, `frees()` and `touches()` issue a run of requests (a block's saved tensors, a block's backward,
a unit's gradients) in one loop with their lookups made once; `unlink()` lets a finished replay's blocks
be freed without the cyclic garbage collector. Per request the cost is the interpreter's (~5-6 thousand
machine instructions for an alloc or a free on this machine's Python 3.11, valgrind --tool=cachegrind;
session 11): what the replays save comes from fewer calls and lookups, not from another model.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

BLOCK = 512
SMALL = 1 << 20  # kSmallSize: requests up to 1 MiB use the small pool
SMALL_SEGMENT = 2 << 20  # kSmallBuffer
LARGE_SEGMENT = 20 << 20  # kLargeBuffer: for large requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge


def segment_size(n: int) -> int:
    """cudaMalloc size for a rounded request `n` that no cached block holds."""
    if n <= SMALL:
        return SMALL_SEGMENT
    if n < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-n // ROUND_LARGE) * ROUND_LARGE


# A block is a list [address, size, free?, previous block, next block, pool] (lists are made and read
# faster than objects, and the replays make thousands per estimate); a pool is 2 x stream + small?.
# A cached free block's place in its pool's sorted list: size << _SHIFT | address, one int, so that
# bisect finds the best fit (smallest size, then lowest address, as the allocator's block set orders
# them) by comparing ints instead of tuples. alloc, touch and batch each round the request, pick its
# pool and test the split rule inline rather than through shared helpers: folded into two functions
# they made the cold estimate 7% slower (session 10: the sum of estimate_speed.cold_times' figures,
# median of 5 fresh processes, 80.4/81.5 ms inline vs 86.4/87.7 ms folded), and this loop is what the
# 5 ms budget waits on.
_SHIFT = 48
_ADDR = (1 << _SHIFT) - 1
_ROUND, _MASK = BLOCK - 1, -BLOCK  # round up to a multiple of BLOCK: (n + _ROUND) & _MASK
_ROUND2M, _MASK2M = ROUND_LARGE - 1, -ROUND_LARGE


class AddressSpaceExceeded(ValueError):
    """A replay made segments past the 2^48 bytes (256 TiB) its packed sort keys address: no GPU holds such a step,
    and the replay's figure is not wanted (stepsim / dsreplay then give none, and the estimate falls back to its
    fitted factor). Found as a KeyError traceback from `hf:llama vocab_size=100000000000` (session 20)."""


class DoesNotFit(Exception):
    """Raised at the allocator's limit when the peak allocated so far has reached `give_up_at`: the step does not
    fit under the limit whatever the cache gives back, so a replay under it has nothing more to say (stepsim._on_gpu
    then replays the step without the limit, for what it would need)."""


class CachingAllocator:
    """alloc(key, nbytes, stream=0) / free(key) / touch(nbytes, stream=0) / batch(sizes, stream=0, keep) /
    empty_cache(); `reserved`, `peak_reserved`, `allocated`, `peak_allocated`, `segments`, `pool_reserved`
    (bytes of segments per (stream, small pool?)), `live` (key -> block)."""

    def __init__(self):
        self.pools: dict[int, list] = {}  # 2 x stream + small? -> sorted sort keys of its cached free blocks
        self._cached: dict[int, list] = {}  # address -> cached free block
        self.live: dict = {}  # key -> block
        self.reserved = self.peak_reserved = self.allocated = self.peak_allocated = 0
        self.segments = 0
        self._pool_res: dict[int, int] = {}  # pool -> bytes of its segments (pool_reserved names them)
        self._next_addr = 0
        # an allocator cap (set_per_process_memory_fraction, or the memory itself): where a new segment would pass
        # it, torch frees every cached segment with no live block (release_cached_blocks: cudaFree, which
        # synchronises) and retries; flushes / flushed_bytes / flushed_segments count what was given back, to be
        # made again by cudaMalloc (steptime.py prices it). Not inside batch(), whose scratch lists hold the
        # cached blocks of the moment (reserved may pass the cap there; the next request flushes).
        self.limit: int | None = None
        self.flushes = self.flushed_bytes = self.flushed_segments = 0
        self._in_batch = False
        self.give_up_at: int | None = None  # with a limit: a peak allocated at which a flush raises DoesNotFit instead

    def _segment(self, size: int, pool: int) -> list:
        """cudaMalloc: a new segment for a rounded request no cached block holds, as one free block."""
        seg = SMALL_SEGMENT if size <= SMALL else LARGE_SEGMENT if size < MIN_LARGE_ALLOC else (size + _ROUND2M) & _MASK2M
        if self.limit is not None and not self._in_batch and self.reserved + seg > self.limit:
            if self.give_up_at is not None and self.peak_allocated >= self.give_up_at:
                raise DoesNotFit(self.peak_allocated)
            before, segments = self.reserved, self.segments
            self.empty_cache()
            self.flushes += 1
            self.flushed_bytes += before - self.reserved
            self.flushed_segments += segments - self.segments
        b = [self._next_addr, seg, True, None, None, pool]
        self._next_addr += seg
        if self._next_addr > _ADDR:
            raise AddressSpaceExceeded(self._next_addr)
        self.reserved += seg
        self._pool_res[pool] = self._pool_res.get(pool, 0) + seg
        self.segments += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        return b

    @property
    def pool_reserved(self) -> dict[tuple, int]:
        """Bytes of segments per (stream, small pool?)."""
        return {(pool >> 1, bool(pool & 1)): n for pool, n in self._pool_res.items()}

    def alloc(self, key, nbytes: int, stream: int = 0) -> None:
        live = self.live
        if key in live:
            self.free(key)
        size = BLOCK if nbytes < BLOCK else (nbytes + _ROUND) & _MASK
        small = size <= SMALL
        pool = 2 * stream + small
        lst = self.pools.get(pool)
        if lst is None:
            lst = self.pools[pool] = []
        i = bisect_left(lst, size << _SHIFT)
        if i < len(lst):
            b = self._cached.pop(lst.pop(i) & _ADDR)
            rest = b[1] - size
        else:  # cudaMalloc (_segment, inline: this is the hot path)
            seg = SMALL_SEGMENT if small else LARGE_SEGMENT if size < MIN_LARGE_ALLOC else (size + _ROUND2M) & _MASK2M
            if self.limit is not None:  # a cap: _segment gives the cache back first where it would pass it
                b = self._segment(size, pool)
            else:
                addr = self._next_addr
                b = [addr, seg, True, None, None, pool]
                self._next_addr = addr + seg
                if addr + seg > _ADDR:
                    raise AddressSpaceExceeded(addr + seg)
                self.reserved += seg
                self._pool_res[pool] = self._pool_res.get(pool, 0) + seg
                self.segments += 1
                if self.reserved > self.peak_reserved:
                    self.peak_reserved = self.reserved
            rest = seg - size
        if rest >= BLOCK if small else rest > SMALL:  # split: the remainder stays cached, free
            addr, nxt = b[0] + size, b[4]
            tail = [addr, rest, True, b, nxt, pool]
            if nxt is not None:
                nxt[3] = tail
            b[4] = tail
            b[1] = size
            insort(lst, rest << _SHIFT | addr)
            self._cached[addr] = tail
        b[2] = False
        live[key] = b
        a = self.allocated = self.allocated + b[1]
        if a > self.peak_allocated:
            self.peak_allocated = a

    def allocs(self, keys, sizes, stream: int = 0) -> None:
        """alloc(key, nbytes, stream) for each pair of `keys` and `sizes`, in order, or free(key) where the
        size is None: the same state as those calls. alloc's and free's bodies in one loop, their lookups
        made once: a replay's runs of requests (a block's saved tensors, a unit's gradients, a block's
        backward) issued at a fraction of their cost per call."""
        live, pools, cached, pool_res = self.live, self.pools, self._cached, self._pool_res
        allocated, peak = self.allocated, self.peak_allocated
        ps, pl = 2 * stream + 1, 2 * stream
        small_lst, large_lst = pools.setdefault(ps, []), pools.setdefault(pl, [])
        for key, nbytes in zip(keys, sizes):
            if nbytes is None:  # free's body
                b = live.pop(key, None)
                if b is None:
                    continue
                allocated -= b[1]
                b[2] = True
                lst = pools[b[5]]
                prev, nxt = b[3], b[4]
                if prev is not None and prev[2]:
                    del lst[bisect_left(lst, prev[1] << _SHIFT | prev[0])]
                    del cached[prev[0]]
                    prev[1] += b[1]
                    prev[4] = nxt
                    if nxt is not None:
                        nxt[3] = prev
                    b = prev
                if nxt is not None and nxt[2]:
                    del lst[bisect_left(lst, nxt[1] << _SHIFT | nxt[0])]
                    del cached[nxt[0]]
                    b[1] += nxt[1]
                    after = b[4] = nxt[4]
                    if after is not None:
                        after[3] = b
                insort(lst, b[1] << _SHIFT | b[0])
                cached[b[0]] = b
                continue
            if key in live:
                self.allocated = allocated
                self.free(key)
                allocated = self.allocated
            size = BLOCK if nbytes < BLOCK else (nbytes + _ROUND) & _MASK
            small = size <= SMALL
            if small:
                lst, pool = small_lst, ps
            else:
                lst, pool = large_lst, pl
            i = bisect_left(lst, size << _SHIFT)
            if i < len(lst):
                b = cached.pop(lst.pop(i) & _ADDR)
                rest = b[1] - size
            else:  # cudaMalloc, as in alloc
                seg = SMALL_SEGMENT if small else LARGE_SEGMENT if size < MIN_LARGE_ALLOC else (size + _ROUND2M) & _MASK2M
                if self.limit is not None:  # a cap: _segment gives the cache back first where it would pass it
                    b = self._segment(size, pool)
                else:
                    addr = self._next_addr
                    b = [addr, seg, True, None, None, pool]
                    self._next_addr = addr + seg
                    if addr + seg > _ADDR:
                        raise AddressSpaceExceeded(addr + seg)
                    self.reserved += seg
                    pool_res[pool] = pool_res.get(pool, 0) + seg
                    self.segments += 1
                    if self.reserved > self.peak_reserved:
                        self.peak_reserved = self.reserved
                rest = seg - size
            if rest >= BLOCK if small else rest > SMALL:
                addr, nxt = b[0] + size, b[4]
                tail = [addr, rest, True, b, nxt, pool]
                if nxt is not None:
                    nxt[3] = tail
                b[4] = tail
                b[1] = size
                insort(lst, rest << _SHIFT | addr)
                cached[addr] = tail
            b[2] = False
            live[key] = b
            allocated += b[1]
            if allocated > peak:
                peak = allocated
        self.allocated, self.peak_allocated = allocated, peak

    def touch(self, nbytes: int, stream: int = 0) -> None:
        """alloc then free at once (a temporary with no other request beside it): the same state as the
        two calls. A cached block that holds it is split and merged back whole, so only a new segment
        (where none holds it) and the peak allocated change."""
        size = BLOCK if nbytes < BLOCK else (nbytes + BLOCK - 1) & -BLOCK
        small = size <= SMALL
        pool = 2 * stream + small
        lst = self.pools.get(pool)
        if lst is None:
            lst = self.pools[pool] = []
        i = bisect_left(lst, size << _SHIFT)
        if i < len(lst):
            have = lst[i] >> _SHIFT
        else:
            b = self._segment(size, pool)
            have = b[1]
            insort(lst, have << _SHIFT | b[0])
            self._cached[b[0]] = b
        rest = have - size
        held = size if (rest >= BLOCK if small else rest > SMALL) else have
        if self.allocated + held > self.peak_allocated:
            self.peak_allocated = self.allocated + held

    def touches(self, sizes, stream: int = 0) -> None:
        """touch(nbytes, stream) for each of `sizes`, in order (temporaries made and freed one after the
        other): the same state as those calls, in one loop."""
        pools, cached = self.pools, self._cached
        ps, pl = 2 * stream + 1, 2 * stream
        small_lst, large_lst = pools.setdefault(ps, []), pools.setdefault(pl, [])
        top = self.peak_allocated - self.allocated  # the largest block held so far that set no new peak
        for nbytes in sizes:
            size = BLOCK if nbytes < BLOCK else (nbytes + _ROUND) & _MASK
            small = size <= SMALL
            lst = small_lst if small else large_lst
            i = bisect_left(lst, size << _SHIFT)
            if i < len(lst):
                have = lst[i] >> _SHIFT
            else:
                b = self._segment(size, ps if small else pl)
                have = b[1]
                insort(lst, have << _SHIFT | b[0])
                cached[b[0]] = b
            rest = have - size
            held = size if (rest >= BLOCK if small else rest > SMALL) else have
            if held > top:
                top = held
        if self.allocated + top > self.peak_allocated:
            self.peak_allocated = self.allocated + top

    def batch(self, sizes, stream: int = 0, keep: dict | None = None, runs=()) -> None:
        """Allocate tensors of `sizes` one after the other, then free all but the kept ones (other frees
        may follow or come between those frees): the same state as those calls, at a fraction of their
        cost. keep: {index in sizes: key}, the tensors that stay, live under `key` (not live before).

        While they are allocated nothing is freed, so each takes the best-fitting cached block by size
        and address alone (adjacency only matters to a free): the best fits are found on a scratch copy
        of each pool's sorted list. Once the others are freed, every cached block they were carved from
        (whole before: its neighbours were live, or it would have been merged with them) and every
        segment they made is free again except where a kept tensor sits: that block is cut around the
        kept tensors, in address order, into free and live pieces. The peak allocated is that of the
        moment all are allocated.

        runs: [(start, length, count)], in order, where sizes[start:start + length * count] is `count` copies of
        one block's sizes (a model's layers); a run that is not is ignored. A copy whose allocations provably
        repeat the previous copy's is not replayed (_repeats): the same state, fewer requests."""
        self._in_batch = True  # (no cap's flush inside: the limit's comment in __init__)
        try:
            self._batch(sizes, stream, keep, runs)
        finally:
            self._in_batch = False

    def _batch(self, sizes, stream: int, keep: dict | None, runs) -> None:
        places = self._batch_fits(sizes, stream, keep, runs)
        if not places:
            return
        cached = self._cached
        starts = sorted(cached)  # each kept tensor lies in one cached block: one there before, or a new segment
        kept: dict[int, list] = {}  # id(real block) -> [real block, (address, block size, key), ...]
        for addr, have, key in places:
            if key in self.live:
                raise ValueError(f"batch: {key!r} is live already")
            real = cached[starts[bisect_right(starts, addr) - 1]]
            kept.setdefault(id(real), [real]).append((addr, have, key))
        for real, *places in kept.values():
            self._cut(real, places)

    def _batch_fits(self, sizes, stream: int, keep, runs=()) -> list:
        """batch()'s allocations: the best fits on scratch copies of the stream's two pools, the new
        segments made (cached, whole once all are freed) and the peak allocated. Returns the kept
        tensors' places [(address, block size, key)]."""
        pools, cached = self.pools, self._cached
        ps, pl = 2 * stream + 1, 2 * stream
        small_lst, large_lst = list(pools.get(ps, ())), list(pools.get(pl, ()))
        held, places, made = 0, [], []

        def fit(lo: int, hi: int) -> int:  # sizes[lo:hi], one after the other: the bytes they hold
            held = 0
            for idx, nbytes in enumerate(sizes[lo:hi] if lo or hi < len(sizes) else sizes, lo):
                size = BLOCK if nbytes < BLOCK else (nbytes + _ROUND) & _MASK
                small = size <= SMALL
                lst = small_lst if small else large_lst
                i = bisect_left(lst, size << _SHIFT)
                if i < len(lst):
                    k = lst.pop(i)
                    have, addr = k >> _SHIFT, k & _ADDR
                else:  # a new segment: cached and whole once the batch is freed, but for what is kept
                    pool = ps if small else pl
                    real = self._segment(size, pool)
                    made.append((size, pool))
                    have, addr = real[1], real[0]
                    insort(pools.setdefault(pool, []), have << _SHIFT | addr)
                    cached[addr] = real
                rest = have - size
                if rest >= BLOCK if small else rest > SMALL:
                    insort(lst, rest << _SHIFT | (addr + size))
                    have = size
                held += have
                if keep and idx in keep:
                    places.append((addr, have, keep[idx]))
            return held

        pos = 0
        for start, length, count in runs:
            end = start + length * count
            if start < pos or length < 1 or sizes[start:start + length] * count != sizes[start:end] or (
                    keep and any(start <= i < end for i in keep)):
                continue  # not copies of one block (or a kept tensor inside): replayed request by request
            held += fit(pos, start)
            block = sizes[start:start + length]
            b = misses = 0
            while b < count:
                if misses == 3:  # three copies in a row that did not repeat (a width whose weights leave tails in
                    held += fit(start + b * length, end)  # their segments): the rest without the check's copies
                    break
                small0, large0, held0 = small_lst[:], large_lst[:], held
                del made[:]
                lo = start + b * length
                held += fit(lo, lo + length)
                b += 1
                skip = self._repeats(block, small0, small_lst, large0, large_lst, count - b)
                misses = 0 if skip else misses + 1
                if skip:
                    seg = self._segment
                    for _ in range(skip[0]):
                        for size, pool in made:
                            real = seg(size, pool)
                            insort(pools[pool], real[1] << _SHIFT | real[0])
                            cached[real[0]] = real
                    held += skip[0] * (held - held0)
                    if skip[1] is not None:
                        small_lst.remove(skip[1])
                        insort(small_lst, skip[2])
                    b += skip[0]
            pos = end
        held += fit(pos, len(sizes))
        if self.allocated + held > self.peak_allocated:
            self.peak_allocated = self.allocated + held
        return places

    @staticmethod
    def _repeats(block, small0, small1, large0, large1, most: int):
        """How many further copies of `block` repeat the one just fitted, and the small pool's scratch entry
        they move: (copies, old entry, new entry), or None. The large pool's list came back unchanged (a copy's
        picks there depend only on the list it starts from, its new segments' addresses lying above every
        entry, so the next copy makes the same ones) and the small pool's differs in one free block, shrunk by
        exactly the copy's small requests and moved by as much (each of them split off its front); every other
        small entry is smaller than the smallest small request, so no request has another choice. The next
        copy sees the same large list and that block smaller by the same amount: the same picks and splits,
        the same segments (in the same order: at the same addresses) and held bytes, while what is left of the
        block after a copy stays at least 512 bytes (the small pool's split rule)."""
        if most < 1 or large0 != large1:
            return None
        smalls = [BLOCK if n < BLOCK else (n + _ROUND) & _MASK for n in block if n <= SMALL]
        if small0 == small1:
            return (most, None, None) if not smalls else None
        if not smalls or len(small0) != len(small1):
            return None
        gone, new = set(small0).difference(small1), set(small1).difference(small0)
        if len(gone) != 1 or len(new) != 1:
            return None
        old, new = gone.pop(), new.pop()
        delta, left = sum(smalls), (new >> _SHIFT)
        if new != ((old >> _SHIFT) - delta) << _SHIFT | ((old & _ADDR) + delta):
            return None
        low = min(smalls)
        if any((k >> _SHIFT) >= low for k in small1 if k != new):
            return None
        copies = min(most, (left - BLOCK) // delta) if left >= BLOCK else 0
        if copies < 1:
            return None
        left -= copies * delta
        return copies, new, left << _SHIFT | ((new & _ADDR) + copies * delta)
    def _cut(self, real: list, places: list) -> None:
        """Cut the cached free block `real` into live blocks at `places` [(address, size, key)] and free
        pieces between them."""
        lst, pool = self.pools[real[5]], real[5]
        del lst[bisect_left(lst, real[1] << _SHIFT | real[0])]
        del self._cached[real[0]]
        end, prev, at = real[0] + real[1], real[3], real[0]
        pieces = []
        for addr, size, key in sorted(places, key=lambda p: p[0]):
            if addr > at:
                pieces.append([at, addr - at, True, None, None, pool])
            pieces.append([addr, size, False, None, None, pool, key])
            at = addr + size
        if at < end:
            pieces.append([at, end - at, True, None, None, pool])
        after = real[4]
        for b in pieces:
            b[3] = prev
            if prev is not None:
                prev[4] = b
            prev = b
            if b[2]:
                insort(lst, b[1] << _SHIFT | b[0])
                self._cached[b[0]] = b
            else:
                self.live[b.pop()] = b
                self.allocated += b[1]
        prev[4] = after
        if after is not None:
            after[3] = prev

    def free(self, key) -> None:
        b = self.live.pop(key, None)
        if b is None:
            return
        self.allocated -= b[1]
        b[2] = True
        lst, cached = self.pools[b[5]], self._cached
        prev, nxt = b[3], b[4]
        if prev is not None and prev[2]:  # merge with free neighbours of the same segment
            del lst[bisect_left(lst, prev[1] << _SHIFT | prev[0])]
            del cached[prev[0]]
            prev[1] += b[1]
            prev[4] = nxt
            if nxt is not None:
                nxt[3] = prev
            b = prev
        if nxt is not None and nxt[2]:
            del lst[bisect_left(lst, nxt[1] << _SHIFT | nxt[0])]
            del cached[nxt[0]]
            b[1] += nxt[1]
            after = b[4] = nxt[4]
            if after is not None:
                after[3] = b
        insort(lst, b[1] << _SHIFT | b[0])
        cached[b[0]] = b

    def frees(self, keys) -> None:
        """free(key) for each of `keys`, in order: the same state as those calls, in one loop (allocs)."""
        live, pools, cached = self.live, self.pools, self._cached
        allocated = self.allocated
        for key in keys:
            b = live.pop(key, None)
            if b is None:
                continue
            allocated -= b[1]
            b[2] = True
            lst = pools[b[5]]
            prev, nxt = b[3], b[4]
            if prev is not None and prev[2]:
                del lst[bisect_left(lst, prev[1] << _SHIFT | prev[0])]
                del cached[prev[0]]
                prev[1] += b[1]
                prev[4] = nxt
                if nxt is not None:
                    nxt[3] = prev
                b = prev
            if nxt is not None and nxt[2]:
                del lst[bisect_left(lst, nxt[1] << _SHIFT | nxt[0])]
                del cached[nxt[0]]
                b[1] += nxt[1]
                after = b[4] = nxt[4]
                if after is not None:
                    after[3] = b
            insort(lst, b[1] << _SHIFT | b[0])
            cached[b[0]] = b
        self.allocated = allocated

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): every cached segment that holds no live block is given back."""
        for pool, lst in self.pools.items():
            keep = []
            for k in lst:
                b = self._cached[k & _ADDR]
                if b[3] is None and b[4] is None:  # a free block that is its whole segment
                    del self._cached[b[0]]
                    self.reserved -= b[1]
                    self._pool_res[pool] -= b[1]
                    self.segments -= 1
                else:
                    keep.append(k)
            lst[:] = keep  # in place: alloc and touch hold this list while a cap's flush runs

    def unlink(self) -> None:
        """Drop the links between neighbouring blocks (the allocator is not used again): its blocks are
        then freed by reference counting, without waiting for the cyclic garbage collector."""
        for b in self.live.values():
            b[3] = b[4] = None
        for b in self._cached.values():
            b[3] = b[4] = None

    def copy(self) -> "CachingAllocator":
        """An independent allocator in the same state (the replays resume from a cached state)."""
        new = CachingAllocator.__new__(CachingAllocator)
        new.__dict__.update(self.__dict__)
        twin = {b[0]: b[:] for b in self._cached.values()}  # address -> its copy (every block has its own)
        twin.update([(b[0], b[:]) for b in self.live.values()])
        for c in twin.values():
            if c[3] is not None:
                c[3] = twin[c[3][0]]
            if c[4] is not None:
                c[4] = twin[c[4][0]]
        new.live = {k: twin[b[0]] for k, b in self.live.items()}
        new._cached = {a: twin[a] for a in self._cached}
        new.pools = {p: lst[:] for p, lst in self.pools.items()}
        new._pool_res = dict(self._pool_res)
        return new
