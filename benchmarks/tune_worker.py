"""The training worker as benchmarks/tune_gpu.py runs it: shardlab.run.worker with its training loop
behind a gate, and optionally on a GPU limited to fewer bytes than it has.

`python -m benchmarks.tune_worker RUN_DIR` reads RUN_STORE/bench.json ({"gate": bool,
"gpu_limit_bytes": int | null}, written by tune_gpu.py beside the run folders), then runs the ordinary
worker with two changes:
- with "gate", everything after the imports (CUDA and NCCL set-up, building and wrapping the model,
  every step, the teardown) holds an exclusive lock on RUN_STORE/.gate until the process exits:
  queued runs only import torch / DeepSpeed (CPU work, on 16 cores) while one configuration at a time
  owns the GPU. (A gate around the training loop alone, tried first on 2026-12-01, let the others'
  CUDA set-up and model builds share the GPU with the timed steps: the grid measured 0.62-0.76x of the
  same plans run alone.)
- with "gpu_limit_bytes", the caching allocator is capped (torch.cuda.set_per_process_memory_fraction)
  so the run meets a real out-of-memory error where a GPU of that size would.
The run folder it writes is like any other.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

_HELD: list = []  # the gate's open file: referenced until exit


def main() -> int:
    run_dir = Path(sys.argv[1])
    cfg_path = run_dir.parent / "bench.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    import torch

    from shardlab.run import worker

    if cfg.get("gate"):
        try:  # importing DeepSpeed is start-up too (CPU only): done before taking the GPU
            import deepspeed  # noqa: F401
        except ImportError:
            pass
        gate = open(run_dir.parent / ".gate", "a+")  # noqa: SIM115 - held open until the process exits
        fcntl.flock(gate, fcntl.LOCK_EX)  # the kernel releases it when this process ends, teardown included
        _HELD.append(gate)
    limit = cfg.get("gpu_limit_bytes")
    if limit and torch.cuda.is_available():
        dev = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(dev).total_memory), device=dev)
    return worker.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
