"""The training worker as benchmarks/tune_gpu.py runs it: shardlab.run.worker behind a gate, and
optionally on a GPU limited to fewer bytes than it has.

`python -m benchmarks.tune_worker RUN_DIR` reads RUN_STORE/bench.json ({"gate": bool,
"gpu_limit_bytes": int | null}, written by tune_gpu.py beside the run folders) and then:
- imports torch (and deepspeed for a DeepSpeed plan) first, outside the gate, so several queued runs
  overlap their start-up while one trains;
- with "gate", holds an exclusive lock on RUN_STORE/.gate from before CUDA is touched until the
  process exits: one configuration at a time owns the GPU, so each is timed alone;
- with "gpu_limit_bytes", caps the caching allocator (torch.cuda.set_per_process_memory_fraction) so
  the run meets a real out-of-memory error where a GPU of that size would.
Everything else is the ordinary worker: the run folder it writes is like any other.
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

    if "framework: deepspeed" in (run_dir / "plan.yaml").read_text():
        import deepspeed  # noqa: F401  (seconds of import, outside the gate)
    gate = open(run_dir.parent / ".gate", "a+")  # closed (unlocked) when the process exits
    if cfg.get("gate"):
        fcntl.flock(gate, fcntl.LOCK_EX)
    limit = cfg.get("gpu_limit_bytes")
    if limit and torch.cuda.is_available():
        dev = int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device=dev)
    from shardlab.run.worker import main as worker_main

    return worker_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
