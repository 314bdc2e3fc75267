"""How long one full estimate takes (widgets call it on every change; the budget is 5 ms), and how
long `import shardlab` takes in a fresh interpreter (budget 0.5 s; tests/test_plan.py checks only that
it imports neither torch nor deepspeed, since a timing on a shared 2-core machine is no test).

A full estimate = load nothing, resolve the model, memory + communication + step time, and
`to_dict()`. Plans and models vary across the loop so no single cached shape flatters the figure.

`--trace` times the traced estimate instead (issue 13: gpt-1.3b and llama-8b, 8 GPUs, ZeRO-3, mb 1;
seconds to minutes on a CPU, the first trace of a process paying a one-time set-up).

    .venv/bin/python benchmarks/estimate_speed.py [--repeat 2000] [--trace]
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


TRACE_CASES = [("gpt-1.3b", "fsdp2"), ("llama-8b", "fsdp2"), ("llama-8b", "deepspeed")]


def trace_times() -> None:
    """Wall and CPU seconds of one traced estimate per TRACE_CASES entry, with its figures beside the
    analytical ones (GiB)."""
    gib = 2**30
    for model, fw in TRACE_CASES:
        plan = plan_from_dict({"framework": fw, "sharding": "zero3", "precision": "bf16", "micro_batch_size": 1,
                               "topology": {"gpus_per_node": 8}}, check=False)
        wall, cpu = time.perf_counter(), time.process_time()
        t = estimate(plan, model, "h200", method="trace").per_gpu
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        a = estimate(plan, model, "h200").per_gpu
        print(f"{model} {fw} zero3 x8 mb1: trace {wall:.1f} s wall ({cpu:.1f} s CPU), traced peak "
              f"{t['peak_allocated'] / gib:.2f} GiB reserved {t['peak_reserved'] / gib:.2f}, analytic "
              f"{a['peak_allocated'] / gib:.2f} GiB reserved {a['peak_reserved'] / gib:.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--trace", action="store_true", help="time the traced estimate (gpt-1.3b, llama-8b) instead")
    a = ap.parse_args(argv)
    if a.trace:
        trace_times()
        return 0
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
    fresh = []  # plans not estimated before on a warm shape: FSDP's reserved replay (stepsim.py) is not cached yet
    for mb in (3, 5, 6):
        p = plans[0][0].model_copy(update={"micro_batch_size": mb})
        t = time.perf_counter()
        estimate(p, plans[0][1], "h100-80gb").to_dict()
        fresh.append(time.perf_counter() - t)
    fresh_ds = []  # the same for DeepSpeed's replay (dsreplay.py), ZeRO-3 and ZeRO-1 on gpt-1.3b
    for stage, mb in (("zero3", 3), ("zero3", 5), ("zero1", 6)):
        p = plans[0][0].model_copy(update={"framework": "deepspeed", "sharding": stage, "micro_batch_size": mb})
        t = time.perf_counter()
        estimate(p, plans[0][1], "h100-80gb").to_dict()
        fresh_ds.append(time.perf_counter() - t)
    print(f"full estimate: median {med * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, uncached shape {cold * 1e3:.3f} ms, "
          f"new FSDP plan {statistics.median(fresh) * 1e3:.1f} ms, new DeepSpeed plan {statistics.median(fresh_ds) * 1e3:.1f} ms "
          f"({a.repeat} runs, {len(CASES)} plans; budget 5 ms)")
    imp = import_seconds()
    print(f"import shardlab: {imp:.3f} s (fastest of 5 fresh interpreters; budget 0.5 s)")
    return 0 if med < 0.005 and imp < 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
