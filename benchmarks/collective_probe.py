"""Time NCCL's collectives between the GPUs of one host (shardlab/estimate/collbench.py, which `shardlab calibrate` runs
on a machine with two or more GPUs), and print each size's time and bus rate and the fitted latency and rate.

    bash benchmarks/on_gpu.sh benchmarks/collective_probe.py --nproc 2 --out $OUT/coll.json

results/collectives_h200x2.json was recorded by the torchrun worker alone (session 21) before this wrapper existed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from shardlab.estimate.collbench import measure

    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--max-mib", type=int, default=1024, help="largest payload (a CPU run: 16 or less)")
    ap.add_argument("--out")
    a = ap.parse_args()
    info = measure(a.nproc, a.device, max_mib=a.max_mib)
    for r in info["rows"]:
        print(f"{r['collective']:15s} {r['payload_bytes'] / 2**20:6.0f} MiB {r['time_s'] * 1e6:9.1f} us  bus {r['bus_bytes_per_s'] / 1e9:7.1f} GB/s")
    f = info["fit"]
    if f is None:
        print(f"not fitted: {info['fit_error']}")
    else:
        print(f"fitted (all_gather, reduce_scatter): {f['latency_s'] * 1e6:.1f} us + wire bytes at {f['bus_bytes_per_s'] / 1e9:.0f} GB/s")
    if a.out:
        Path(a.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
