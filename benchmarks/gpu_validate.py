"""GPU validation (issue 8): shardlab's runner against a bare loop, and the estimator against torch.

For a ~1B GPT (d=2048, 16 layers, 16 heads, T=2048, micro-batch 4, bf16, AdamW) and each configuration
(fsdp1/fsdp2 zero3, deepspeed zero1/zero2/zero3, deepspeed zero2 + CPU optimizer offload; each with and
without activation checkpointing) this runs the worker through `shardlab.launch` and compares
instrumented steps with bare ones (the same model, data, wrapping and loop, nothing measured but
loss and step time). By default one run alternates them (instrument="alternate": odd steps measured,
even steps bare), so both kinds share the process, the GPU's state and the machine's load; with
`--pairs`, separate instrumented and bare runs (`instrument: true` / `false`) go in ABBA order.

Per configuration it writes one JSON object (keys: device, world_size, framework, sharding, offload,
activation_checkpointing, tokens_per_s, tflops, mfu, peak_allocated_bytes, peak_reserved_bytes,
predicted_peak_bytes, bare_tokens_per_s, overhead_ratio, unit_ratios, memory_error) to OUT/gpu_validate.json and
prints a table. Throughput is the median, over the steps after `--warmup`, of tokens per step period
(one step's start to the next one's), so work the runner does between steps is counted.

    python benchmarks/gpu_validate.py --out DIR [--only deepspeed] [--steps 24] [--warmup 4] [--repeats 1] [--pairs]

Run on a GPU machine through benchmarks/on_gpu.sh (installs the carried wheels first):

    bash benchmarks/on_gpu.sh benchmarks/gpu_validate.py --out $OUT/v --only fsdp1,fsdp2
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
DEVICE = "cuda"  # --device cpu --model gpt-tiny only checks the script on a machine without a GPU
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
    """Median of `key` over rank 0's measured steps after the warm-up."""
    df = metrics[(metrics["rank"] == 0) & (metrics["step"] > warmup)]
    if "instrumented" in df:  # an alternating run: the measured (odd) steps only
        df = df[df["instrumented"].astype(bool)]
    if key not in df or df[key].isna().all():
        return None
    return float(statistics.median(df[key].dropna()))


def periods(run, warmup: int) -> tuple[list[float], list[float]]:
    """Tokens per second over each step period after the warm-up (Run.step_periods: a step's start to
    the next one's, slowest rank), split into (measured steps, bare steps). Work the loop does
    between steps (metrics, measurement, logging) falls in the period of the step that did it, so
    instrumentation cannot hide outside the step."""
    p = run.step_periods(warmup)
    rates = p["tokens"] / p["period_s"]
    measured = p["instrumented"].astype(bool)
    return rates[measured].astype(float).tolist(), rates[~measured].astype(float).tolist()


def measure(plan: Plan, steps: int, warmup: int, out: Path, instrument: bool | str) -> dict:
    """One run through shardlab.launch: its step-period rates by kind of step, start-up time and
    (when it measures) the worker's own TFLOPS / MFU, peak memory and timeline sample count."""
    t0 = time.time()
    run = launch(plan, model=MODEL, steps=steps, device=DEVICE, out=out, instrument=instrument, timeout_s=600)
    status = run.wait()
    m = run.metrics
    res = {"status": status, "instrument": instrument, "wall_s": round(time.time() - t0, 1), "dir": str(run.dir)}
    if status != "completed" or m is None or len(m) == 0:
        res["error"] = run.info.get("error")
        return res
    res["periods"], res["bare_periods"] = periods(run, warmup)
    res["startup_s"] = round(float(m["t_start"].min()) - t0, 1)
    if instrument:
        res["worker_tokens_per_s"] = steady(m, "tokens_per_s", warmup)
        res["worker_tflops"] = steady(m, "tflops", warmup)
        res["worker_mfu"] = steady(m, "mfu", warmup)
        ranks0 = m[m["rank"] == 0]
        for key in ("peak_allocated_bytes", "peak_reserved_bytes"):  # CUDA runs only
            if key in ranks0:
                res[key] = int(ranks0[key].max())
        tl = run.timeline
        res["nvml_samples"] = int((tl["source"] == "nvml").sum()) if len(tl) else 0
    return res


def pooled(runs: list[dict], key: str = "periods") -> float | None:
    """Median step-period rate over every `key` period ("periods": measured steps, "bare_periods":
    bare steps) of these runs."""
    rates = [r for run in runs for r in run.get(key, [])]
    return float(statistics.median(rates)) if rates else None


def ratio_ci(measured: list[float], bare: list[float], n: int = 2000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of median(measured) / median(bare): how far the overhead ratio could
    move with other draws of the same step-to-step jitter."""
    import numpy as np

    if len(measured) < 3 or len(bare) < 3:
        return None
    rng = np.random.default_rng(seed)
    m, b = np.asarray(measured), np.asarray(bare)
    r = np.median(rng.choice(m, (n, m.size)), axis=1) / np.median(rng.choice(b, (n, b.size)), axis=1)
    return [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(vals)) if vals else None


def scaled(value: float | None, scale: float | None) -> float | None:
    return value * scale if value is not None and scale is not None else None


def measure_config(plan: Plan, args, out: Path, first: int) -> list[list[dict]]:
    """The runs of one configuration, grouped into units that each hold measured and bare steps.

    Default: `--repeats` runs with instrument="alternate", each its own unit (odd steps measured,
    even steps bare, in one process). With `--pairs`: `--repeats` pairs of separate (bare,
    instrumented) runs, alternating which goes first (pair i starts bare when i + first is even),
    each pair a unit. Separate processes differ more than the overhead in question (on an H100: a
    pair's second run up to 8% faster, identical DeepSpeed ZeRO-3 runs up to 34% apart), so the
    default compares steps within one run; --pairs also counts what happens outside the steps."""
    if not args.pairs:
        return [[measure(plan, args.steps, args.warmup, out, "alternate")] for _ in range(args.repeats)]
    units = []
    for i in range(args.repeats):
        order = (False, True) if (i + first) % 2 == 0 else (True, False)
        units.append([measure(plan, args.steps, args.warmup, out, kind) for kind in order
                      if kind or not args.no_bare])
    return units


def main() -> int:
    global MODEL, DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma list of frameworks or framework:sharding[:offload]")
    ap.add_argument("--ac", default="both", choices=("both", "on", "off"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--extra", default=None, help='plan overrides as JSON, e.g. \'{"buckets": {"prefetch_bucket_size": 500000000}}\'')
    ap.add_argument("--no-bare", action="store_true", help="skip the bare runs (tuning experiments)")
    ap.add_argument("--repeats", type=int, default=1, help="runs (with --pairs: pairs of runs) per configuration")
    ap.add_argument("--pairs", action="store_true", help="separate bare and instrumented runs in ABBA order instead of alternating steps in one run")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    a = ap.parse_args()
    MODEL, DEVICE = a.model, a.device
    import torch

    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
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
            units = measure_config(plan, a, out / "runs", first=len(results))
            runs = [r for u in units for r in u]
            tps, bare_tps = pooled(runs), pooled(runs, "bare_periods")
            ok = [r for r in runs if r["status"] == "completed" and r["instrument"]]
            # the worker's TFLOPS / MFU are per step time; scaled to the step period like tokens/s
            worker_tps = median_of(ok, "worker_tokens_per_s")
            scale = tps / worker_tps if tps and worker_tps else None
            ratios = [pooled(u) / pooled(u, "bare_periods") for u in units if pooled(u) and pooled(u, "bare_periods")]
            row = {"extra": a.extra, "device": device, "world_size": plan.world_size, "framework": fw, "sharding": sh,
                   "offload": off, "activation_checkpointing": ac, "model": MODEL,
                   "tokens_per_s": tps,
                   "tflops": scaled(median_of(ok, "worker_tflops"), scale),
                   "mfu": scaled(median_of(ok, "worker_mfu"), scale),
                   "peak_allocated_bytes": max((r["peak_allocated_bytes"] for r in ok if "peak_allocated_bytes" in r), default=None),
                   "peak_reserved_bytes": max((r["peak_reserved_bytes"] for r in ok if "peak_reserved_bytes" in r), default=None),
                   "predicted_peak_bytes": predicted, "predicted_tokens_per_s": est["tokens_per_s"],
                   "bare_tokens_per_s": bare_tps, "method": "pairs" if a.pairs else "alternating steps",
                   "repeats": a.repeats, "unit_ratios": ratios,
                   "overhead_ratio_ci95": ratio_ci([x for r in runs for x in r.get("periods", [])],
                                                   [x for r in runs for x in r.get("bare_periods", [])]),
                   "periods": [round(x) for r in runs for x in r.get("periods", [])],
                   "bare_periods": [round(x) for r in runs for x in r.get("bare_periods", [])],
                   "status": ",".join(sorted({r["status"] for r in runs})),
                   "wall_s": round(sum(r["wall_s"] for r in runs), 1),
                   "startup_s": [r.get("startup_s") for r in runs],
                   "error": next((r["error"] for r in runs if r.get("error")), None),
                   "nvml_samples": [r.get("nvml_samples") for r in ok]}
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
              f"{r['predicted_peak_bytes'] / 2**30:>7.2f}{f(r.get('memory_error'), '{:+.1%}'):>7}"
              f"  95% {f(r['overhead_ratio_ci95'] and r['overhead_ratio_ci95'][0], '{:.3f}')}-"
              f"{f(r['overhead_ratio_ci95'] and r['overhead_ratio_ci95'][1], '{:.3f}')}"
              f"  per unit {' '.join(f'{x:.3f}' for x in r['unit_ratios'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
