"""How long one full estimate takes (widgets call it on every change; the budget is 5 ms), and how
long `import shardlab` takes in a fresh interpreter (budget 0.5 s; tests/test_plan.py checks only that
it imports neither torch nor deepspeed, since a timing on a shared 2-core machine is no test).

A full estimate = load nothing, resolve the model, memory + communication + step time, and
`to_dict()`. Plans and models vary across the loop so no single cached shape flatters the figure.

    .venv/bin/python benchmarks/estimate_speed.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from shardlab.estimate import estimate
from shardlab.plan import plan_from_dict

CASES = [
    ({"framework": "fsdp2", "sharding": "zero3"}, "gpt-1.3b"),
    ({"framework": "fsdp1", "sharding": "hybrid", "topology": {"nodes": 4, "gpus_per_node": 8}}, "llama-70b"),
    ({"framework": "deepspeed", "sharding": "zero3", "topology": {"nodes": 4, "gpus_per_node": 8},
      "zeropp": {"quantized_weights": True, "quantized_gradients": True, "hpz_partition_size": 8}}, "llama-8b"),
    ({"framework": "deepspeed", "sharding": "zero2", "offload": {"optimizer": "cpu"}}, "gpt-13b"),
    ({"framework": "deepspeed", "sharding": "zero1", "activation_checkpointing": True}, 7e9),
]


def import_seconds(repeat: int = 5) -> float:
    """The fastest of `repeat` fresh-interpreter `import shardlab` times, in seconds."""
    code = "import time; t = time.perf_counter(); import shardlab; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
               for _ in range(repeat))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000)
    a = ap.parse_args(argv)
    plans = [(plan_from_dict(p, check=False), m) for p, m in CASES]
    for p, m in plans:  # warm the shape caches, as a running widget would have
        estimate(p, m).to_dict()
    times = []
    for i in range(a.repeat):
        p, m = plans[i % len(plans)]
        t = time.perf_counter()
        estimate(p, m, "h100-80gb").to_dict()
        times.append(time.perf_counter() - t)
    times.sort()
    med, p99 = statistics.median(times), times[int(0.99 * len(times))]
    cold = time.perf_counter()
    from shardlab.models import ModelSpec

    estimate(plans[0][0], ModelSpec("fresh", 30, 3072, 24, 50000, 4096)).to_dict()  # uncached shape
    cold = time.perf_counter() - cold
    print(f"full estimate: median {med * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, uncached shape {cold * 1e3:.3f} ms "
          f"({a.repeat} runs, {len(CASES)} plans; budget 5 ms)")
    imp = import_seconds()
    print(f"import shardlab: {imp:.3f} s (fastest of 5 fresh interpreters; budget 0.5 s)")
    return 0 if med < 0.005 and imp < 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
