"""shardlab/estimate/cachesim.py against torch's real CUDA caching allocator.

Random sequences of allocations and frees (sizes log-uniform from 100 bytes to 600 MB, each seed
its own sequence) run on the GPU with torch.empty / del, one fresh process each so nothing is cached
before; the script records torch.cuda.max_memory_reserved() and the segment count after each
sequence. tests/test_cachesim.py replays the same seeds through the simulator and compares, so the
GPU judges the simulator in CI without a GPU.

    # on the GPU machine
    python3 benchmarks/cachesim_check.py --out $OUT/cachesim_h200.json --seeds 40
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys


def sequence(seed: int, ops: int = 600) -> list[tuple]:
    """[("a", key, nbytes) | ("f", key)]: a random mix, about 60% allocations, a working set that
    grows and shrinks as a training step's does."""
    rng = random.Random(seed)
    live, out, k = [], [], 0
    for _ in range(ops):
        if live and rng.random() < 0.42:
            key = live.pop(rng.randrange(len(live)))
            out.append(("f", key))
        else:
            n = int(10 ** rng.uniform(2, 8.78))  # 100 B .. 600 MB
            out.append(("a", k, n))
            live.append(k)
            k += 1
    return out


def run_on_gpu(seed: int) -> dict:
    import torch

    torch.cuda.init()
    held = {}
    for op in sequence(seed):
        if op[0] == "a":
            held[op[1]] = torch.empty(op[2], dtype=torch.uint8, device="cuda")
        else:
            del held[op[1]]
    torch.cuda.synchronize()
    snap = torch.cuda.memory_snapshot()
    return {"seed": seed, "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "segments": len(snap)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--one", type=int, help="(internal) run one seed in this process and print its JSON")
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(run_on_gpu(a.one)))
        return 0
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def one(s):  # a fresh process per seed: an empty cache (processes share the GPU, not its allocator)
        p = subprocess.run([sys.executable, __file__, "--one", str(s)], capture_output=True, text=True, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=8) as ex:
        rows = list(ex.map(one, range(a.seeds)))
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(a.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
