"""The training worker as benchmarks/tune_gpu.py runs it: shardlab.run.worker with its training loop
behind a gate, and optionally on a GPU limited to fewer bytes than it has.

`python -m benchmarks.tune_worker RUN_DIR` reads RUN_STORE/bench.json ({"gate": bool,
"gpu_limit_bytes": int | null}, written by tune_gpu.py beside the run folders), then runs the ordinary
worker with two changes:
- with "gate", the training loop (Worker.run: every step, warm-up and timed) holds an exclusive lock
  on RUN_STORE/.gate: queued runs do their start-up (imports, CUDA and NCCL set-up, building and
  wrapping the model) while one configuration at a time trains, so each is timed alone on the GPU;
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


def main() -> int:
    run_dir = Path(sys.argv[1])
    cfg_path = run_dir.parent / "bench.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    import torch

    from shardlab.run import worker

    limit = cfg.get("gpu_limit_bytes")
    if limit and torch.cuda.is_available():
        dev = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(dev).total_memory), device=dev)
    if cfg.get("gate"):
        train = worker.Worker.run

        def gated(self) -> None:
            with open(run_dir.parent / ".gate", "a+") as gate:
                fcntl.flock(gate, fcntl.LOCK_EX)
                try:
                    train(self)
                    if self.device == "cuda":
                        torch.cuda.synchronize()
                finally:
                    fcntl.flock(gate, fcntl.LOCK_UN)

        worker.Worker.run = gated
    return worker.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
