"""What shardlab's measurement costs: the same training step with and without instrumentation.

Starts the real worker (`python -m shardlab.run.worker`) through torchrun, alternately with
"instrument": true (state bytes, collective counting, memory, CUDA phase events) and false (the bare
loop, which still logs the loss per step), and compares the median step time over the steps after
the warm-up. The target is at most 2% slower. Alternating runs keeps drifting machine load from
favouring one side.

    python benchmarks/overhead.py --model gpt-tiny --device cpu --nproc 2 --steps 30
    python benchmarks/overhead.py --model gpt-1b --device cuda --nproc 1 --precision bf16 --micro-batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shardlab.export.launch import launch_command, sanitized_env
from shardlab.plan import load_plan
from shardlab.run.host import free_port


def run_once(plan, args, instrument: bool, root: Path, tag: str) -> list[float]:
    """Step times (s, rank 0) after the warm-up steps of one worker run."""
    d = root / tag
    d.mkdir()
    (d / "plan.yaml").write_text(plan.to_yaml())
    (d / "run.json").write_text(json.dumps({"model": args.model, "steps": args.steps, "device": args.device,
                                            "seed": 0, "instrument": instrument}))
    argv, env = launch_command(plan, ["-m", "shardlab.run.worker", str(d)], nproc_per_node=args.nproc,
                               torchrun=[sys.executable, "-m", "torch.distributed.run"], master_port=free_port())
    extra = dict(env)
    if args.device == "cpu":
        extra.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(argv, env=sanitized_env(extra), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run {tag} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    # the slowest rank sets the pace of a synchronous step
    steps = sorted({r["step"] for r in rows if r["step"] > args.warmup})
    return [max(r["step_time_s"] for r in rows if r["step"] == s) for s in steps]


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
    p.add_argument("--repeats", type=int, default=2, help="alternating pairs of runs")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process on CPU")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    plan = load_plan({"framework": args.framework, "sharding": args.sharding, "precision": args.precision,
                      "micro_batch_size": args.micro_batch, "topology": {"nodes": 1, "gpus_per_node": args.nproc}})
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for instrument in (False, True):
                times[instrument] += run_once(plan, args, instrument, Path(tmp), f"{rep}-{int(instrument)}")
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
