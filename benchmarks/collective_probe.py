"""Time NCCL's collectives between the GPUs of one host, the ones FSDP and ZeRO call, at the sizes they call them.

Run with torchrun, one process per GPU (NVLink multicast off, as benchmarks/on_gpu.sh sets it):

    torchrun --nproc_per_node 2 benchmarks/collective_probe.py --out $OUT/coll.json

For each collective (all_gather_into_tensor, reduce_scatter_tensor, all_reduce) and payload size (the gathered
/ unreduced tensor's bytes, bf16) it prints the median time of 20 calls after 5 warm-up ones, and the "bus"
rate: wire bytes per rank over time, with the ring's wire bytes as shardlab.estimate.comm counts them ((n-1)/n
of the payload for the gather and the scatter, 2(n-1)/n for all_reduce). That rate is what steptime.py divides
the wire bytes by (gpus.py's intra_node_bw), so the figures say how far the datasheet link rate holds per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

SIZES_MIB = (1, 4, 16, 64, 256, 1024)


def _time(fn, reps: int = 20, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rows = []
    for mib in SIZES_MIB:
        numel = mib * 2**20 // 2  # bf16 payload
        full = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
        shard = torch.empty(numel // n, dtype=torch.bfloat16, device="cuda")
        cases = {"all_gather": (lambda full=full, shard=shard: dist.all_gather_into_tensor(full, shard), (n - 1) / n),
                 "reduce_scatter": (lambda full=full, shard=shard: dist.reduce_scatter_tensor(shard, full), (n - 1) / n),
                 "all_reduce": (lambda full=full: dist.all_reduce(full), 2 * (n - 1) / n)}
        for name, (fn, ring) in cases.items():
            t = _time(fn)
            rows.append({"collective": name, "payload_bytes": numel * 2, "time_s": t, "bus_bytes_per_s": ring * numel * 2 / t})
            if rank == 0:
                print(f"{name:15s} {mib:5d} MiB  {t * 1e6:9.1f} us  bus {ring * numel * 2 / t / 1e9:7.1f} GB/s", flush=True)
    if rank == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump({"world_size": n, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
