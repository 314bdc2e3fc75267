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
"""

from __future__ import annotations

import bisect

BLOCK = 512
SMALL = 1 << 20  # kSmallSize: requests up to 1 MiB use the small pool
SMALL_SEGMENT = 2 << 20  # kSmallBuffer
LARGE_SEGMENT = 20 << 20  # kLargeBuffer: for large requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge


def round_size(n: int) -> int:
    return BLOCK if n < BLOCK else -(-n // BLOCK) * BLOCK


def segment_size(n: int) -> int:
    """cudaMalloc size for a rounded request `n` that no cached block holds."""
    if n <= SMALL:
        return SMALL_SEGMENT
    if n < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-n // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("addr", "size", "free", "prev", "next", "pool")

    def __init__(self, addr, size, pool, prev=None, nxt=None):
        self.addr, self.size, self.pool, self.free, self.prev, self.next = addr, size, pool, True, prev, nxt


class CachingAllocator:
    """alloc(key, nbytes, stream=0) / free(key); `reserved`, `peak_reserved`, `allocated`, `peak_allocated`,
    `pool_reserved` (bytes of segments per (stream, small pool?))."""

    def __init__(self):
        self.pools: dict[tuple, list] = {}  # (stream, small?) -> sorted [(size, addr, block)] of free blocks
        self.live: dict = {}  # key -> block
        self.reserved = self.peak_reserved = self.allocated = self.peak_allocated = 0
        self.segments = 0
        self.pool_reserved: dict[tuple, int] = {}  # (stream, small?) -> bytes of its segments
        self._next_addr = 0

    def _insert(self, b: _Block) -> None:
        bisect.insort(self.pools.setdefault(b.pool, []), (b.size, b.addr, b))

    def _remove(self, b: _Block) -> None:
        lst = self.pools[b.pool]
        i = bisect.bisect_left(lst, (b.size, b.addr))
        del lst[i]

    def alloc(self, key, nbytes: int, stream: int = 0) -> None:
        if key in self.live:
            self.free(key)
        size = BLOCK if nbytes < BLOCK else -(-nbytes // BLOCK) * BLOCK
        small = size <= SMALL
        pool = (stream, small)
        lst = self.pools.get(pool)
        if lst is None:
            lst = self.pools[pool] = []
        i = bisect.bisect_left(lst, (size, -1))
        if i < len(lst):
            b = lst.pop(i)[2]
        else:  # no cached block holds it: a new segment
            seg = segment_size(size)
            b = _Block(self._next_addr, seg, pool)
            self._next_addr += seg
            self.reserved += seg
            self.pool_reserved[pool] = self.pool_reserved.get(pool, 0) + seg
            self.segments += 1
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        rest = b.size - size
        if rest >= BLOCK if small else rest > SMALL:
            tail = _Block(b.addr + size, rest, pool, b, b.next)
            if b.next is not None:
                b.next.prev = tail
            b.next, b.size = tail, size
            bisect.insort(lst, (rest, tail.addr, tail))
        b.free = False
        self.live[key] = b
        self.allocated += b.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated

    def free(self, key) -> None:
        b = self.live.pop(key, None)
        if b is None:
            return
        self.allocated -= b.size
        b.free = True
        prev, nxt = b.prev, b.next
        if prev is not None and prev.free:  # merge with free neighbours of the same segment
            self._remove(prev)
            prev.size += b.size
            prev.next = nxt
            if nxt is not None:
                nxt.prev = prev
            b = prev
        if nxt is not None and nxt.free:
            self._remove(nxt)
            b.size += nxt.size
            b.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = b
        self._insert(b)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): every cached segment that holds no live block is given back."""
        for pool, lst in self.pools.items():
            keep = []
            for size, addr, b in lst:
                if b.prev is None and b.next is None:  # a free block that is its whole segment
                    self.reserved -= size
                    self.pool_reserved[pool] -= size
                    self.segments -= 1
                else:
                    keep.append((size, addr, b))
            self.pools[pool] = keep
