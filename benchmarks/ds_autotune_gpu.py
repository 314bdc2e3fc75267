"""DeepSpeed's Autotuner on the lent GPU, in one device call, beside `shardlab tune` (issue 20).

    bash benchmarks/on_gpu.sh benchmarks/ds_autotune_gpu.py --case gpt125 --out $OUT/at
    # a CPU smoke run of the script (tabulate installed; ~3 min on 2 cores):
    .venv/bin/python benchmarks/ds_autotune_gpu.py --device cpu --model gpt-tiny --micro-batches 1,2 --stages 2 --out /tmp/at

1. Builds FusedAdam once (tune_gpu.py's prebuild; every launch then loads it from the cache).
2. Writes the Autotuner's starting config from shardlab's own DeepSpeed run config over the case's
   space (ds_autotune_train.py: micro-batch sizes as a list at the case's global batch, ZeRO stages
   0-3, fast mode), and runs `deepspeed --autotuning tune` on it from a scratch folder, under a
   timeout. Each of its experiments starts `deepspeed` by name: a wrapper that runs this Python's
   DeepSpeed launcher is put first on PATH (the carried wheels have no console script on PATH).
3. Reads what it found: `ds_config_optimal.json` (its pick), every experiment's metrics.json (its
   throughput, samples/s) and its own "Tuning completed in" time; if the timeout cut it short, the
   best experiment so far stands in and the JSON says so.
4. Runs its pick once through shardlab's runner with the same timed window as tune's trials
   (shardlab/tune/window.py), so its tokens/s is measured the way the grid's and tune's are.
Writes OUT/autotuner_CASE.json; the lead copies it to benchmarks/results/tune_h200_autotuner_CASE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]
STAGE_TO_SHARDING = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}


def wrapper_bin(scratch: Path) -> Path:
    """A `deepspeed` on PATH that runs this interpreter's DeepSpeed launcher (PYTHONPATH is inherited)."""
    b = scratch / "bin"
    b.mkdir(parents=True, exist_ok=True)
    w = b / "deepspeed"
    w.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import sys; sys.argv[0] = \'deepspeed\'; '
                 f'from deepspeed.launcher.runner import main; main()" "$@"\n')
    w.chmod(0o755)
    return b


def run_autotuner(scratch: Path, model: str, steps: int, timeout_s: float, device: str) -> dict:
    env = {**os.environ, "PATH": f"{wrapper_bin(scratch)}:{os.environ.get('PATH', '')}"}
    if device == "cpu":  # the CPU smoke run: DeepSpeed's CPU accelerator, one thread per process
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = ["deepspeed", "--autotuning", "tune", "--num_gpus", "1", "--master_port", "29700",
           str(REPO / "benchmarks" / "ds_autotune_train.py"), "--model", model, "--steps", str(steps), "--deepspeed_config", "ds.json"]
    t0 = time.time()
    with open(scratch / "autotuner.log", "wb") as log:
        p = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and every experiment it started
            rc = "timeout"
    text = (scratch / "autotuner.log").read_text(errors="replace")
    done = [ln for ln in text.splitlines() if "Tuning completed in" in ln]
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.time() - t0, 1),
            "tuning_completed": done[-1].split("Tuning completed in")[-1].strip() if done else None, "log_tail": text[-3000:]}


def experiments(scratch: Path) -> list[dict]:
    """Every experiment the Autotuner ran: its name, stage, micro-batch, accumulation, throughput."""
    out = []
    for exp in sorted((scratch / "autotuning_results").glob("*/exp.json")):
        d = exp.parent
        cfg = json.loads((d / "ds_config.json").read_text()) if (d / "ds_config.json").exists() else {}
        met = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else {}
        out.append({"name": d.name, "stage": (cfg.get("zero_optimization") or {}).get("stage"),
                    "micro_batch": cfg.get("train_micro_batch_size_per_gpu"), "grad_accum": cfg.get("gradient_accumulation_steps"),
                    "metrics": met})
    return out


def its_pick(scratch: Path, exps: list[dict]) -> dict | None:
    """ds_config_optimal.json's stage / micro-batch / accumulation, else the best experiment with a throughput."""
    opt = scratch / "autotuning_results" / "ds_config_optimal.json"
    if opt.exists():
        cfg = json.loads(opt.read_text())
        return {"from": "ds_config_optimal.json", "stage": (cfg.get("zero_optimization") or {}).get("stage"),
                "micro_batch": cfg.get("train_micro_batch_size_per_gpu"), "grad_accum": cfg.get("gradient_accumulation_steps")}
    ok = [e for e in exps if e["metrics"].get("throughput") and e["stage"] is not None]
    if not ok:
        return None
    e = max(ok, key=lambda e: e["metrics"]["throughput"])
    return {"from": f"best experiment so far ({e['name']}): the Autotuner did not finish", **{k: e[k] for k in ("stage", "micro_batch", "grad_accum")}}


def measure_pick(pick: dict, model, runs: Path, device: str) -> dict:
    """The Autotuner's pick as a shardlab plan, run once through the runner with tune's timed window."""
    from shardlab import Plan, launch
    from shardlab.estimate import get_gpu
    from shardlab.estimate.calibrate import CPU_DEVICE
    from shardlab.tune.search import predict
    from shardlab.tune.space import Candidate
    from shardlab.tune.trials import measure
    from shardlab.tune.window import trial_steps

    plan = Plan(framework="deepspeed", sharding=STAGE_TO_SHARDING[int(pick["stage"])], micro_batch_size=int(pick["micro_batch"]),
                grad_accum_steps=int(pick.get("grad_accum") or 1))
    c = Candidate("autotuner pick", plan)
    predict([c], model, get_gpu("h200") if device == "cuda" else CPU_DEVICE)
    steps = trial_steps(c.predicted.get("step_time_s"), 3, device=device)
    t0 = time.time()
    run = launch(plan, model=model, steps=steps, device=device, out=runs, timeout_s=400)
    status = run.wait()
    return {"plan": plan.model_dump(mode="json"), "steps": steps, "status": status, "run_id": run.id,
            "measured": measure(run, 3) if status == "completed" else {}, "wall_s": round(time.time() - t0, 1),
            "key": f"deepspeed {plan.sharding} mb{plan.micro_batch_size}x{plan.grad_accum_steps}"}


def main() -> int:
    import tune_gpu
    from ds_autotune_train import write_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("gpt125", "llama1b"), default="gpt125", help="a tune_gpu.py case (the Autotuner cannot see gpt350cap's cap)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch", default="/tmp/ds_autotune")
    ap.add_argument("--timeout-s", type=float, default=430, help="the Autotuner's time limit (the device call's is 600 s)")
    ap.add_argument("--steps", type=int, default=20, help="steps the user script may train (the engine stops it at end_profile_step)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", default=None, help="override the case's model (a preset name; the CPU smoke run: gpt-tiny)")
    ap.add_argument("--micro-batches", default=None, help="override: comma-separated sizes (default: the case's that divide its global batch)")
    ap.add_argument("--stages", default="0,1,2,3")
    a = ap.parse_args()
    case = tune_gpu.CASES[a.case]
    model, out, scratch = a.model or case["model"], Path(a.out), Path(a.scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, str):
        raise SystemExit("the Autotuner's user script takes a preset name: use --case gpt125 (or --model NAME)")
    import deepspeed
    import torch

    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    res: dict = {"case": a.case, "model": model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:],
                 "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "gpu": gpu}}
    if a.device == "cuda":
        res["prebuild_s"] = tune_gpu.prebuild({"frameworks": ["deepspeed"], "offloads": ["none"]})
    gb = case["global_batch"]
    mbs = [int(m) for m in a.micro_batches.split(",")] if a.micro_batches else [m for m in case["space"]["micro_batches"] if gb % m == 0]
    res["config"] = write_config(scratch / "ds.json", model, mbs, [int(x) for x in a.stages.split(",")], a.device)
    res["autotuner"] = run_autotuner(scratch, model, a.steps, a.timeout_s, a.device)
    res["experiments"] = experiments(scratch)
    res["pick"] = its_pick(scratch, res["experiments"])
    (out / f"autotuner_{a.case}.json").write_text(json.dumps(res, indent=1, default=str))
    if res["pick"]:
        res["pick_measured"] = measure_pick(res["pick"], model, scratch / "runs", a.device)
    (out / f"autotuner_{a.case}.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res[k] for k in ("autotuner", "pick")}, indent=1, default=str)[-4000:])
    m = (res.get("pick_measured") or {}).get("measured") or {}
    print(f"Autotuner: {res['autotuner']['tuning_completed'] or res['autotuner']['rc']}, {len(res['experiments'])} experiments, "
          f"pick {res['pick']}, measured through shardlab's runner: {m.get('tokens_per_s') or 0:,.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
