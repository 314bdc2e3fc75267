"""Collectives between the GPUs of this host, timed as FSDP and ZeRO call them, and fitted to the step model's price.

steptime prices a collective as a latency per call plus its ring wire bytes (comm.py) over a rate: by default
COLLECTIVE_LATENCY_S and NCCL_BUS_EFF x the GPU table's link rate, both measured between two H200s. `shardlab
calibrate` on a machine with two or more GPUs runs this (`measure`) and stores the fitted latency and rate in the
calibration, which replace the defaults for estimates on that machine.

How: one process per GPU under torchrun (this module's `main`, NVLink multicast off as in every run shardlab
starts); for all_gather_into_tensor, reduce_scatter_tensor and all_reduce at payloads of 1 MiB to 1 GiB (bf16), the
median of 20 calls after 5 warm-up ones. "Bus" rate = the ring's wire bytes per rank over the time: (n-1)/n of the
payload for the gather and the scatter, 2(n-1)/n for all_reduce. `fit` solves latency + bytes / rate over the
gathers and scatters (the collectives FSDP and ZeRO-3 run) by least squares in relative error.

    torchrun --nproc_per_node 2 -m shardlab.estimate.collbench --out coll.json        # what measure() runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .microbench import _seconds_per

SIZES_MIB = (1, 4, 16, 64, 256, 1024)
FITTED = ("all_gather", "reduce_scatter")


def main(argv=None) -> None:
    """The torchrun worker: time the collectives, rank 0 writes the rows to --out."""
    import torch
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--max-mib", type=int, default=SIZES_MIB[-1])
    a = ap.parse_args(argv)
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32  # gloo reduces no bf16
    rows = []
    for mib in (m for m in SIZES_MIB if m <= a.max_mib):
        numel = mib * 2**20 // dtype.itemsize // n * n
        full = torch.empty(numel, dtype=dtype, device=a.device)
        shard = torch.empty(numel // n, dtype=dtype, device=a.device)
        cases = {"all_gather": (lambda f=full, s=shard: dist.all_gather_into_tensor(f, s), (n - 1) / n),
                 "reduce_scatter": (lambda f=full, s=shard: dist.reduce_scatter_tensor(s, f), (n - 1) / n),
                 "all_reduce": (lambda f=full: dist.all_reduce(f), 2 * (n - 1) / n)}
        nbytes = numel * dtype.itemsize
        for name, (fn, ring) in cases.items():
            t = _seconds_per(lambda fn=fn: (fn(), sync()), 20, warm=5)  # each call timed alone, to its end
            rows.append({"collective": name, "payload_bytes": nbytes, "time_s": t, "bus_bytes_per_s": ring * nbytes / t})
    if rank == 0:
        info = {"world_size": n, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                "torch": torch.__version__, "backend": dist.get_backend(), "rows": rows}
        if a.device == "cuda":
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        Path(a.out).write_text(json.dumps(info, indent=1))
    dist.destroy_process_group()


def fit(rows: list[dict], world_size: int) -> dict:
    """{"latency_s", "bus_bytes_per_s"}: latency + wire bytes / rate fitted to the gathers' and scatters' times, each
    weighted by its own time (relative error), as steptime prices a collective."""
    import numpy as np

    sel = [r for r in rows if r["collective"] in FITTED]
    ring = (world_size - 1) / world_size
    wire = np.array([ring * r["payload_bytes"] for r in sel], dtype=float)
    t = np.array([r["time_s"] for r in sel], dtype=float)
    a = np.vstack([np.ones_like(wire), wire]).T / t[:, None]
    (lat, per_byte), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if per_byte <= 0 or lat < 0:
        raise ValueError(f"the timings do not fit latency + bytes / rate (latency {lat:.3g} s, {per_byte:.3g} s per byte)")
    return {"latency_s": float(lat), "bus_bytes_per_s": float(1 / per_byte)}


def run_workers(target: list[str], nproc: int, what: str, timeout_s: float, env: dict | None = None, tail: int = 400) -> dict:
    """Run `target` (["-m", module, args...] or [script, args...]) under torchrun on `nproc` local processes, with
    `--out FILE` added; return the JSON its rank 0 wrote there. torchrun runs in its own process group, so that a
    timeout ends its workers too (no process is left behind). Raises RuntimeError with the last `tail` characters of
    the output when the run fails or outlasts timeout_s. (benchmarks/ds3_gathered.py runs DeepSpeed through it.)"""
    from shardlab.export.launch import RUNNER_ENV

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, "--out", str(out)]
        full_env = {**os.environ, **RUNNER_ENV, "OMP_NUM_THREADS": "1", **(env or {})}
        p = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise RuntimeError(f"{what} on {nproc} processes took over {timeout_s:.0f} s; stopped") from None
        if p.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{what} on {nproc} processes failed (exit {p.returncode}): {log[-tail:]}")
        return json.loads(out.read_text())


def measure(nproc: int, device: str = "cuda", timeout_s: float = 120.0, max_mib: int = SIZES_MIB[-1]) -> dict:
    """Run the worker on `nproc` local devices; {"world_size", "rows", "fit", ...} (fit None, with fit_error, where
    the timings do not fit). Raises RuntimeError with the worker's last output when it fails or outlasts timeout_s."""
    info = run_workers(["-m", "shardlab.estimate.collbench", "--device", device, "--max-mib", str(max_mib)], nproc,
                       "collectives", timeout_s)
    try:
        info["fit"] = fit(info["rows"], info["world_size"])
    except ValueError as e:  # timings too noisy for the model (CPU processes): recorded, the defaults stay
        info["fit"], info["fit_error"] = None, str(e)
    return info

if __name__ == "__main__":
    main()
