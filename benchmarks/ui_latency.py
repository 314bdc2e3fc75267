"""UI latency: how long the ConfigBuilder takes to bring everything up to date after a control changes.

Drives the Python-level controls (the same objects a browser session drives over its websocket) and
times each change until its callbacks return: new Plan, findings beside the controls, unavailable
options re-derived from the rules, the visible export preview, the memory estimate and step time.
The browser's own drawing is not included. Target: median under 100 ms.

    .venv/bin/python benchmarks/ui_latency.py [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

# (control, values it cycles through): the changes a person makes most, the heavy ones included
# (framework and sharding re-export and re-derive every unavailable option).
CHANGES = (
    ("framework", ["deepspeed", "fsdp1", "fsdp2"]),
    ("sharding", ["zero2", "ddp", "zero3"]),
    ("precision", ["fp16", "fp32", "bf16"]),
    ("offload.optimizer", ["cpu", "none"]),
    ("micro_batch_size", [2, 4, 1]),
    ("topology.gpus_per_node", [8, 4, 1]),
    ("activation_checkpointing", [True, False]),
    ("buckets.reduce_bucket_size", ["5e8", "auto"]),
)


def measure(repeat: int) -> dict:
    from shardlab_widgets.builder import ConfigBuilder

    t = time.perf_counter()
    b = ConfigBuilder(model="gpt-1.3b", gpu="h100-80gb")
    build_s = time.perf_counter() - t
    by_control: dict[str, list[float]] = {}
    for _ in range(repeat):
        for tab in range(len(b.previews.tabs)):  # each preview tab in turn is the visible one
            b.previews.tabs.active = tab
            for path, values in CHANGES:
                for v in values:
                    t = time.perf_counter()
                    b.control(path).value = v
                    by_control.setdefault(path, []).append(time.perf_counter() - t)
    every = [x for xs in by_control.values() for x in xs]
    ms = lambda xs, q=None: round(1000 * (statistics.median(xs) if q is None else statistics.quantiles(xs, n=100)[q - 1]), 2)
    return {
        "changes": len(every),
        "median_ms": ms(every),
        "p90_ms": ms(every, 90),
        "max_ms": round(1000 * max(every), 2),
        "median_ms_by_control": {k: ms(v) for k, v in by_control.items()},
        "builder_construction_ms": round(1000 * build_s, 1),
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = measure(a.repeat)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['changes']} control changes: median {r['median_ms']} ms, p90 {r['p90_ms']} ms, max {r['max_ms']} ms "
              f"(builder built in {r['builder_construction_ms']} ms)")
        for k, v in r["median_ms_by_control"].items():
            print(f"  {k:28s} median {v} ms")
    return 0 if r["median_ms"] < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
