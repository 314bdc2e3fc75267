"""GPU validation (issue 8): shardlab's runner against a bare loop, and the estimator against torch.

For a ~1B GPT (d=2048, 16 layers, 16 heads, T=2048, micro-batch 4, bf16, AdamW) and each configuration
(fsdp1/fsdp2 zero3, deepspeed zero1/zero2/zero3, deepspeed zero2 + CPU optimizer offload; each with and
without activation checkpointing) this runs, through `shardlab.launch`, the instrumented run and the
same worker with `instrument: false` (the bare loop: same model, data, wrapping and loop, nothing
measured but loss and step time). Bare and instrumented runs alternate so drift hits both alike.

Per configuration it writes one JSON object (keys: device, world_size, framework, sharding, offload,
activation_checkpointing, tokens_per_s, tflops, mfu, peak_allocated_bytes, peak_reserved_bytes,
predicted_peak_bytes, bare_tokens_per_s, overhead_ratio, memory_error) to OUT/gpu_validate.json and
prints a table. Throughput is the median, over the steps after `--warmup`, of tokens per step period
(one step's start to the next one's), so work the runner does between steps is counted.

    python benchmarks/gpu_validate.py --out DIR [--only deepspeed] [--steps 12] [--warmup 4]

Run on a GPU machine through benchmarks/gpu_validate.sh (installs the carried wheels first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardlab import Plan, launch  # noqa: E402
from shardlab.estimate import estimate  # noqa: E402

MODEL = "gpt-1b"
CONFIGS = [
    ("fsdp1", "zero3", "none"),
    ("fsdp2", "zero3", "none"),
    ("deepspeed", "zero1", "none"),
    ("deepspeed", "zero2", "none"),
    ("deepspeed", "zero3", "none"),
    ("deepspeed", "zero2", "cpu"),
]


def plan_for(framework: str, sharding: str, offload: str, ac: bool, extra: dict | None = None) -> Plan:
    data = {"framework": framework, "sharding": sharding, "precision": "bf16", "micro_batch_size": 4,
            "activation_checkpointing": ac, "optimizer": {"name": "adamw", "lr": 1e-4},
            "offload": {"optimizer": offload}, **(extra or {})}
    return Plan.model_validate(data)


def steady(metrics, key: str, warmup: int) -> float | None:
    """Median of `key` over rank 0's steps after the warm-up."""
    df = metrics[(metrics["rank"] == 0) & (metrics["step"] > warmup)]
    if key not in df or df[key].isna().all():
        return None
    return float(statistics.median(df[key].dropna()))


def period_tokens_per_s(metrics, warmup: int) -> tuple[float | None, list[int]]:
    """Tokens over the time from one step's start to the next one's: everything the loop does between
    steps (metrics, measurement, logging) counts, so instrumentation cannot hide outside the step."""
    df = metrics[metrics["rank"] == 0].sort_values("step")
    rates = (df["tokens"].iloc[:-1].to_numpy() / df["t_start"].diff().iloc[1:].to_numpy())
    steps = df["step"].iloc[:-1].to_numpy()
    kept = [r for s, r in zip(steps, rates) if s > warmup]
    return (float(statistics.median(kept)) if kept else None), [round(r) for r in rates]


def measure(plan: Plan, steps: int, warmup: int, out: Path, instrument: bool) -> dict:
    t0 = time.time()
    run = launch(plan, model=MODEL, steps=steps, device="cuda", out=out, instrument=instrument, timeout_s=600)
    status = run.wait()
    m = run.metrics
    res = {"status": status, "wall_s": round(time.time() - t0, 1), "dir": str(run.dir)}
    if status != "completed" or m is None or len(m) == 0:
        res["error"] = run.info.get("error")
        return res
    res["tokens_per_s"], res["series"] = period_tokens_per_s(m, warmup)
    if instrument:
        # the worker's per-step TFLOPS / MFU scaled from its step time to the step period
        scale = res["tokens_per_s"] / steady(m, "tokens_per_s", warmup)
        res["tflops"] = steady(m, "tflops", warmup) * scale
        mfu = steady(m, "mfu", warmup)
        res["mfu"] = mfu * scale if mfu is not None else None
        ranks0 = m[m["rank"] == 0]
        res["peak_allocated_bytes"] = int(ranks0["peak_allocated_bytes"].max())
        res["peak_reserved_bytes"] = int(ranks0["peak_reserved_bytes"].max())
        tl = run.timeline
        res["nvml_samples"] = int((tl["source"] == "nvml").sum()) if len(tl) else 0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma list of frameworks or framework:sharding[:offload]")
    ap.add_argument("--ac", default="both", choices=("both", "on", "off"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--extra", default=None, help='plan overrides as JSON, e.g. \'{"buckets": {"prefetch_bucket_size": 500000000}}\'')
    ap.add_argument("--no-bare", action="store_true", help="skip the bare runs (tuning experiments)")
    a = ap.parse_args()
    import torch

    device = torch.cuda.get_device_name()
    gpu = "h200" if "H200" in device else "h100-80gb"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = a.only.split(",") if a.only else None
    acs = {"both": (False, True), "on": (True,), "off": (False,)}[a.ac]
    results = []
    for fw, sh, off in CONFIGS:
        key = f"{fw}:{sh}:{off}"
        if wanted and not any(key.startswith(w) for w in wanted):
            continue
        for ac in acs:
            plan = plan_for(fw, sh, off, ac, json.loads(a.extra) if a.extra else None)
            est = estimate(plan, MODEL, gpu=gpu).to_dict()
            # comparable with torch.cuda.max_memory_allocated (no CUDA context, no allocator slack)
            predicted = est["per_gpu"]["peak_allocated"]
            # alternate which goes first: the first run of a pair meets a colder machine (seen on an
            # H100: the second run of a pair was up to 8% faster whichever kind it was)
            first_bare = len(results) % 2 == 0 and not a.no_bare
            bare = measure(plan, a.steps, a.warmup, out / "runs", instrument=False) if first_bare else None
            inst = measure(plan, a.steps, a.warmup, out / "runs", instrument=True)
            if not a.no_bare:
                bare = bare or measure(plan, a.steps, a.warmup, out / "runs", instrument=False)
            bare = bare or {"status": "skipped", "wall_s": 0}
            row = {"extra": a.extra, "device": device, "world_size": plan.world_size, "framework": fw, "sharding": sh,
                   "offload": off, "activation_checkpointing": ac, "model": MODEL,
                   "tokens_per_s": inst.get("tokens_per_s"), "tflops": inst.get("tflops"), "mfu": inst.get("mfu"),
                   "peak_allocated_bytes": inst.get("peak_allocated_bytes"),
                   "peak_reserved_bytes": inst.get("peak_reserved_bytes"),
                   "predicted_peak_bytes": predicted, "predicted_tokens_per_s": est["tokens_per_s"],
                   "bare_tokens_per_s": bare.get("tokens_per_s"),
                   "status": inst["status"], "bare_status": bare["status"],
                   "wall_s": inst["wall_s"] + bare["wall_s"], "error": inst.get("error") or bare.get("error"),
                   "series": inst.get("series"), "bare_series": bare.get("series"),
                   "nvml_samples": inst.get("nvml_samples"), "bare_first": first_bare}
            if row["tokens_per_s"] and row["bare_tokens_per_s"]:
                row["overhead_ratio"] = row["tokens_per_s"] / row["bare_tokens_per_s"]
            if row["peak_allocated_bytes"]:
                row["memory_error"] = predicted / row["peak_allocated_bytes"] - 1
            results.append(row)
            print(json.dumps(row), flush=True)
            (out / "gpu_validate.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'config':<28}{'ac':>4}{'tok/s':>9}{'bare':>9}{'ratio':>7}{'TFLOPS':>8}{'MFU':>6}{'peak GiB':>9}{'pred':>7}{'err':>7}")
    for r in results:
        f = lambda v, s="{:.0f}": "-" if v is None else s.format(v)  # noqa: E731
        print(f"{r['framework'] + ' ' + r['sharding'] + (' +cpu' if r['offload'] != 'none' else ''):<28}"
              f"{'on' if r['activation_checkpointing'] else 'off':>4}{f(r['tokens_per_s']):>9}{f(r['bare_tokens_per_s']):>9}"
              f"{f(r.get('overhead_ratio'), '{:.3f}'):>7}{f(r['tflops']):>8}{f(r['mfu'], '{:.2f}'):>6}"
              f"{f(r['peak_allocated_bytes'] and r['peak_allocated_bytes'] / 2**30, '{:.2f}'):>9}"
              f"{r['predicted_peak_bytes'] / 2**30:>7.2f}{f(r.get('memory_error'), '{:+.1%}'):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
