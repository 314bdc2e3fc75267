"""What shardlab's measurement costs: the same training step with and without instrumentation.

Starts the real worker through `shardlab.launch` (torchrun, as every run) with "instrument":
"alternate": odd steps measured (state bytes, collective counting, memory, CUDA phase events), even
steps bare (loss and timings only), in the same processes. It compares the median step time of the
two kinds over the steps after the warm-up (a step's period: its start to the next step's start;
the slowest rank sets each step's period). The target is
at most 2% slower. Comparing steps of one run, not separate runs, keeps the machine's drifting load
(and, on a GPU, run-to-run spread of several percent) out of the comparison.

    python benchmarks/overhead.py --model gpt-tiny --device cpu --nproc 2 --steps 30
    python benchmarks/overhead.py --model gpt-1b --device cuda --nproc 1 --precision bf16 --micro-batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from shardlab.plan import load_plan
from shardlab.run.launcher import launch


def run_once(plan, args, root: Path) -> dict[bool, list[float]]:
    """Step periods (s) after the warm-up of one alternating run through shardlab.launch:
    {measured?: periods}."""
    run = launch(plan, model=args.model, steps=args.steps, nproc=args.nproc, device=args.device, out=root,
                 instrument="alternate", timeout_s=600)
    if run.wait() != "completed":
        sys.exit(f"run {run.dir} ended {run.status}: {run.info.get('error')}")
    p = run.step_periods(args.warmup)
    return {kind: p.loc[p["instrumented"].astype(bool) == kind, "period_s"].tolist() for kind in (False, True)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--framework", default="fsdp2", choices=["fsdp1", "fsdp2", "deepspeed"])
    p.add_argument("--sharding", default="zero3")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process on CPU")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the launcher passes it on to every rank
    plan = load_plan({"framework": args.framework, "sharding": args.sharding, "precision": args.precision,
                      "micro_batch_size": args.micro_batch, "topology": {"nodes": 1, "gpus_per_node": args.nproc}})
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for kind, t in run_once(plan, args, Path(tmp)).items():
                times[kind] += t
    bare, inst = statistics.median(times[False]), statistics.median(times[True])
    result = {"model": args.model, "framework": args.framework, "sharding": args.sharding, "precision": args.precision,
              "device": args.device, "nproc": args.nproc, "steps_measured": len(times[True]),
              "bare_step_s": bare, "instrumented_step_s": inst, "ratio": inst / bare}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"bare loop       : {bare * 1e3:9.2f} ms/step (median of {len(times[False])})")
        print(f"instrumented    : {inst * 1e3:9.2f} ms/step (median of {len(times[True])})")
        print(f"ratio           : {inst / bare:9.4f}  (target <= 1.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
