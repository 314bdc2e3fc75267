"""`shardlab tune` against the exhaustive measured grid (issue 20), one named case per call.

For a case (a model, one GPU, a search space), every valid configuration of the space is run for real
through the ordinary runner (`shardlab.launch`: torchrun, one fresh process per configuration, a few
warm-up and timed steps): that is the grid, at least 30 configurations, those predicted not to fit
included (they show whether the memory pruning was right). Then `tune` searches the same space with a
budget of trial runs, and the JSON says whether its pick is within 5% of the grid's measured best
tokens/s, and how long tune took.

The grid's runs use benchmarks/tune_worker.py: the ordinary worker with everything after its imports
behind a lock, so queued runs import torch / DeepSpeed while one configuration at a time owns the GPU
(each is set up, timed and torn down alone on it), optionally on an allocator capped to fewer bytes than the GPU has (a case where the
memory limit binds without a model too big to run 30 times in a few minutes). Tune's trials use the
same worker (the same cap) without the lock, one at a time as tune always runs them.

    # on the GPU machine (benchmarks/on_gpu.sh installs the carried wheels first):
    bash benchmarks/on_gpu.sh benchmarks/tune_gpu.py --case gpt125 --out $OUT/t
    # a CPU smoke run of the script itself (tiny shapes):
    .venv/bin/python benchmarks/tune_gpu.py --case gpt125 --device cpu --tiny --grid 3 --budget 2 --out /tmp/t
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shardlab.tune.window import WINDOW_S  # noqa: E402 - shardlab from this checkout

GIB = 2**30
WORKER = "benchmarks.tune_worker"
LLAMA1B = {"name": "llama1b", "family": "llama", "layers": 16, "hidden": 2048, "heads": 16, "kv_heads": 8,
           "ffn_hidden": 5632, "vocab": 32000, "seq_len": 2048}
THREE = ("fsdp1", "fsdp2", "deepspeed")
# case -> model, global batch (sequences per optimizer step), the search space, an allocator cap
CASES = {
    "gpt125": {"model": "gpt-125m", "global_batch": 16, "gpu_limit_gib": None,
               "space": dict(frameworks=THREE, shardings=("ddp", "zero3"), offloads=("none",), checkpointing=(False, True),
                             micro_batches=(4, 8, 16), compile=(False,), knobs=False)},
    "llama1b": {"model": LLAMA1B, "global_batch": 4, "gpu_limit_gib": None,
                "space": dict(frameworks=THREE, shardings=("zero2", "zero3"), offloads=("none",), checkpointing=(False, True),
                              micro_batches=(1, 2, 4), compile=(False,), knobs=False)},
    # gpt-350m on the H200 capped to 18 GiB: micro-batch 4 fits only with checkpointing or offload
    "gpt350cap": {"model": "gpt-350m", "global_batch": 8, "gpu_limit_gib": 18,
                  "space": dict(frameworks=THREE, shardings=("zero2", "zero3"), offloads=("none", "optimizer"),
                                checkpointing=(False, True), micro_batches=(2, 4), compile=(False,), knobs=False)},
}


def case_model(case: dict, tiny: bool):
    if not tiny:
        return case["model"]
    return {"name": "tiny", "family": "gpt", "layers": 2, "hidden": 64, "heads": 4, "vocab": 512, "seq_len": 64}


def target(case: dict, device: str):
    """The GPU-table entry the case is priced and fitted against: the H200, or the H200 whose allocator
    is capped (tune_worker.py's set_per_process_memory_fraction; the CUDA context lies outside the cap)."""
    from shardlab.estimate import get_gpu
    from shardlab.estimate.calibrate import CPU_DEVICE
    from shardlab.estimate.gpus import capped

    if device == "cpu":
        return CPU_DEVICE
    g = get_gpu("h200")
    cap = case["gpu_limit_gib"]
    return capped(g, int(cap * GIB)) if cap else g


def write_bench(runs: Path, gate: bool, case: dict, device: str) -> None:
    runs.mkdir(parents=True, exist_ok=True)
    cap = case["gpu_limit_gib"] if device == "cuda" else None
    (runs / "bench.json").write_text(json.dumps({"gate": gate, "gpu_limit_bytes": int(cap * GIB) if cap else None}))


def prebuild(space: dict) -> dict:
    """Build DeepSpeed's JIT ops once, before anything is timed (the workers load them from the cache)."""
    import os

    from shardlab.export.launch import extensions_dir, sanitize_arch_list

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):  # '9.0a' broke FusedAdam's build here on 2026-12-01 (as the workers do)
        os.environ["TORCH_CUDA_ARCH_LIST"] = sanitize_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    out = {}
    if "deepspeed" not in space["frameworks"]:
        return out
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    builders = [FusedAdamBuilder] + ([CPUAdamBuilder] if set(space["offloads"]) - {"none"} else [])
    for b in builders:
        t0 = time.time()
        try:
            b().load()
            out[b.__name__] = round(time.time() - t0, 1)
        except Exception as e:  # noqa: BLE001 - the runs will say what fails
            out[b.__name__] = f"{type(e).__name__}: {e}"[:300]
    return out


def grid_rows(case: dict, model, device: str, limit: int | None):
    """Every valid configuration of the case's space, with its prediction (fit or not)."""
    from shardlab import Plan
    from shardlab.tune import Space, candidates
    from shardlab.tune.search import predict

    sp = Space(**case["space"], global_batch=case["global_batch"])
    cands = candidates(sp, Plan())
    predict(cands, model, target(case, device))
    grid = [c for c in cands if c.predicted]  # valid plans: the estimator priced them (fit or not)
    if limit and limit < len(grid):  # a smoke run: configurations spread over the grid (every framework)
        grid = [grid[round(i * (len(grid) - 1) / max(1, limit - 1))] for i in range(limit)]
    return grid


def earlier_rows(path: str | None) -> dict[str, dict]:
    """The grid rows a previous call already ran (--resume): a case's grid can take two device calls."""
    if not path:
        return {}
    rows = json.loads(Path(path).read_text())
    rows = rows["grid"] if isinstance(rows, dict) else rows
    return {r["key"]: {**r, "call": r.get("call", 1)} for r in rows if r["status"] != "not-run"}


def startup_seconds(run) -> dict:
    """Where a run's wall time went, from its own files: launcher -> torchrun agent -> rank 0 process
    (status.json's process create times, 10 ms resolution), the worker's start-up phase events, the steps (metrics.jsonl),
    and the end (the last step to status.json's ended_at: teardown, exit, the launcher noticing)."""
    from shardlab.run.files import read_jsonl

    st = run.info
    if not st:
        return {}
    procs = {p.get("role"): p.get("create_time") for p in st.get("processes") or []}
    marks = [("agent", procs.get("agent0")), ("rank0", procs.get("rank0"))]
    marks += [(e["phase"], e["t"]) for e in read_jsonl(run.files.events) if e.get("event") == "phase" and e.get("rank", 0) == 0]
    steps = [m for m in read_jsonl(run.files.metrics) if m.get("rank", 0) == 0]
    if steps:
        marks += [("steps_2_on", steps[0]["t_opt_end"]), ("end", steps[-1]["t_opt_end"])]
    marks.append(("exit", st.get("ended_at")))
    marks = [(k, t) for k, t in marks if t]
    return {f"{a}->{b}": round(tb - ta, 2) for (a, ta), (b, tb) in zip(marks, marks[1:])}


def run_one(plan, model, a, runs: Path, step_time_s: float | None = None) -> dict:
    """One configuration run through the ordinary runner: status, measured figures, where its time went.
    Steps: --steps when given, else --warmup + a window of --window-s at the predicted step time, as tune's
    trials (shardlab/tune/window.py)."""
    from shardlab import launch
    from shardlab.tune.trials import measure
    from shardlab.tune.window import trial_steps

    t0 = time.time()
    steps = a.steps or trial_steps(step_time_s, a.warmup, a.window_s, a.device)
    try:
        run = launch(plan, model=model, steps=steps, device=a.device, out=runs, timeout_s=400, worker_module=WORKER)
        status = run.wait()
        row = dict(status=status, run_id=run.id, measured=measure(run, a.warmup) if status == "completed" else {},
                   error=None if status == "completed" else str((run.info or {}).get("error"))[:500],
                   startup_s=startup_seconds(run))
    except Exception as e:  # noqa: BLE001 - a configuration that cannot start is a row, not the end
        row = dict(status="error", measured={}, error=f"{type(e).__name__}: {e}"[:500])
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def run_repeats(rows: list[dict], tuned: dict | None, model, a, runs: Path) -> list[dict]:
    """Time the grid's K best configurations (and tune's pick) once more each, alone: one 4-step timing
    per configuration cannot rank within 5% on hosts whose same plan differs by up to 22% between runs."""
    from shardlab import Plan

    ok = sorted((g for g in rows if g["status"] == "completed" and g["measured"].get("tokens_per_s")),
                key=lambda g: -g["measured"]["tokens_per_s"])
    keys = [g["key"] for g in ok[:a.repeat]]
    pick = ((tuned or {}).get("pick") or {}).get("key")
    if pick and pick not in keys:
        keys.append(pick)
    plans = {g["key"]: g["plan"] for g in rows}
    step_s = {g["key"]: (g.get("predicted") or {}).get("step_time_s") for g in rows}
    if pick:
        plans.setdefault(pick, tuned["pick"]["plan"])  # a smoke run's partial grid may not hold it
    out = []
    for k in keys:
        r = {"key": k, **run_one(Plan.model_validate(plans[k]), model, a, runs, step_s.get(k))}
        out.append(r)
        print(f"repeat {k:<40} {r['status']:<9} meas {r['measured'].get('tokens_per_s') or 0:>9,.0f} tok/s {r['wall_s']:5.1f} s", flush=True)
    return out


def run_grid(grid, model, a, runs: Path) -> list[dict]:
    done = earlier_rows(a.resume)
    rows: list[dict] = list(done.values())
    grid_keys = {c.key for c in grid}
    assert set(done) <= grid_keys, f"--resume rows not in this case's grid: {sorted(set(done) - grid_keys)}"
    todo = [c for c in grid if c.key not in done]
    if done:
        print(f"{len(done)} configurations from {a.resume}, {len(todo)} to run", flush=True)
    out = Path(a.out)

    deadline = time.time() + a.grid_deadline_s if a.grid_deadline_s else None

    def one(c):
        t0 = time.time()
        broken = len(rows) >= 3 and all(r["status"] in ("failed", "error") for r in rows)
        if broken or (deadline and t0 > deadline):  # the call's time is up: say so rather than overrun the device limit
            rows.append({"key": c.key, "plan": c.plan.model_dump(mode="json"), "predicted": c.predicted,
                         "predicted_fits": c.status != "rejected", "status": "not-run", "measured": {},
                         "error": "the first runs all failed" if broken else "grid deadline"})
            return rows[-1]
        row = {"key": c.key, "plan": c.plan.model_dump(mode="json"), "predicted": c.predicted,
               "predicted_fits": c.status != "rejected", "prune_reason": c.reason, "call": 2 if done else 1}
        row.update(run_one(c.plan, model, a, runs, c.predicted.get("step_time_s")))
        rows.append(row)
        (out / "grid_partial.json").write_text(json.dumps(rows, indent=1, default=str))
        m = row["measured"]
        print(f"grid {len(rows):>2}/{len(grid)} {row['status']:<9} {c.key:<40} pred {c.predicted['tokens_per_s']:>9,.0f} "
              f"meas {m.get('tokens_per_s') or 0:>9,.0f} tok/s  peak res {(m.get('peak_reserved_bytes') or 0) / GIB:6.2f} GiB "
              f"(pred {c.predicted['peak_reserved_bytes'] / GIB:6.2f}) {row['wall_s']:5.1f} s", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        list(ex.map(one, todo))
    order = {c.key: i for i, c in enumerate(grid)}
    return sorted(rows, key=lambda r: order[r["key"]])


def run_tune(case: dict, model, a, runs: Path) -> dict:
    from shardlab.tune import Space, tune

    t0 = time.time()
    r = tune(model, gpus=1, gpu=target(case, a.device), budget=a.budget, device=a.device, out=runs,
             space=Space(**case["space"]), global_batch=case["global_batch"], steps=a.steps, warmup=a.warmup,
             launch_kw={"worker_module": WORKER}, timeout_s=400, window_s=a.window_s)
    d = r.to_dict()
    d.pop("table")
    d["wall_s_outer"] = round(time.time() - t0, 1)
    d["summary"] = r.summary()
    print(r.summary(), flush=True)
    return d


def recorded_runs(d: dict) -> list[tuple[str, dict]]:
    """("grid", row) for each grid row, ("trial", row) for each of tune's trials and ("repeat", row)
    for each --repeat timing in a JSON this script wrote; every row carries key, plan, status and
    measured. The one reader of that layout."""
    plans = {g["key"]: g["plan"] for g in d.get("grid", [])}
    return ([("grid", g) for g in d.get("grid", [])] + [("trial", t) for t in (d.get("tune") or {}).get("trials", [])]
            + [("repeat", {"plan": plans.get(r["key"]), **r}) for r in d.get("repeats", [])])


def recorded_files(results: Path):
    """(file, its JSON, kind, row) over every tune_*.json in `results`, each run once: a call that
    resumed an earlier grid (--resume) carries that grid's rows again, told apart by their run ids."""
    seen = set()
    for f in sorted(results.glob("tune_*.json")):
        d = json.loads(f.read_text())
        for kind, r in recorded_runs(d):
            if r.get("run_id") and r["run_id"] in seen:
                continue
            seen.add(r.get("run_id"))
            yield f, d, kind, r


def repeated_best(grid: list[dict], tuned: dict | None, repeats: list[dict]) -> dict:
    """Each configuration's median tokens/s over every timing of it (grid row, tune's trial, repeats);
    the best of those medians, and tune's pick against it."""
    import statistics

    seen: dict[str, list[float]] = {}
    for _, r in recorded_runs({"grid": grid, "tune": tuned}) + [("repeat", r) for r in repeats]:
        if r.get("status") == "completed" and r["measured"].get("tokens_per_s"):
            seen.setdefault(r["key"], []).append(r["measured"]["tokens_per_s"])
    med = {k: statistics.median(v) for k, v in seen.items() if len(v) > 1}
    if not med:
        return {}
    best = max(med, key=med.get)
    res = {"medians_of_repeated": {k: [round(med[k]), len(seen[k])] for k in sorted(med, key=med.get, reverse=True)},
           "best": best, "best_tokens_per_s": med[best]}
    pick = ((tuned or {}).get("pick") or {}).get("key")
    if pick in med:
        res.update(pick=pick, pick_vs_best=med[pick] / med[best] - 1, within_5pct=med[pick] >= 0.95 * med[best])
    return res


def judge(grid: list[dict], tuned: dict | None, repeats: list[dict] | None = None) -> dict:
    ok = [g for g in grid if g["status"] == "completed" and g["measured"].get("tokens_per_s")]
    if not ok:
        return {"grid_best": None}
    top = max(ok, key=lambda g: g["measured"]["tokens_per_s"])
    res = {"grid_best": {"key": top["key"], "tokens_per_s": top["measured"]["tokens_per_s"]},
           "grid_completed": len(ok), "grid_size": len(grid),
           "grid_failed": {g["key"]: g["status"] for g in grid if g["status"] != "completed"},
           "pruned_but_ran": [g["key"] for g in ok if not g["predicted_fits"]],
           "kept_but_failed": [g["key"] for g in grid if g["predicted_fits"] and g["status"] == "oom"]}
    pick = (tuned or {}).get("pick")
    if pick:
        same = next((g for g in grid if g["key"] == pick["key"]), None)
        gt = same["measured"].get("tokens_per_s") if same else None
        res.update(pick=pick["key"], pick_grid_tokens_per_s=gt,
                   pick_vs_best=(gt / res["grid_best"]["tokens_per_s"] - 1) if gt else None,
                   within_5pct=bool(gt and gt >= 0.95 * res["grid_best"]["tokens_per_s"]))
        trial = next((t for t in tuned["trials"] if t["key"] == pick["key"]), None)
        if trial and trial["measured"].get("tokens_per_s"):
            res["pick_trial_tokens_per_s"] = trial["measured"]["tokens_per_s"]
    if repeats:
        res["repeated"] = repeated_best(grid, tuned, repeats)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default=None, help="run store (default OUT/../runs_CASE outside OUT: run folders do not come back)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized model (smoke test of the script)")
    ap.add_argument("--grid", type=int, default=None, help="run only N grid configurations, spread over the grid (smoke)")
    ap.add_argument("--budget", default="5")
    ap.add_argument("--steps", type=int, default=None, help="steps per run, fixed (sessions 4-7: 8); default: --warmup + a "
                    "window of --window-s seconds at the predicted step time (shardlab/tune/window.py)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--window-s", type=float, default=WINDOW_S, help=f"timed seconds per run when --steps is not given (default {WINDOW_S:g})")
    # --jobs 4 with a gate around the training loop only (2026-12-01) timed the grid's configurations 0.62-0.76x
    # of the same plans run alone by tune; the gate now covers everything after the imports (tune_worker.py)
    ap.add_argument("--jobs", type=int, default=1, help="grid runs started at once (one owns the GPU at a time: tune_worker's gate)")
    ap.add_argument("--grid-deadline-s", type=float, default=None, help="start no grid run after this many seconds")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--repeat", type=int, default=0, help="after tune, time the grid's N best and tune's pick once more each")
    ap.add_argument("--resume", default=None, help="a grid JSON of an earlier call: its run rows are kept, the rest run")
    a = ap.parse_args()
    case = CASES[a.case]
    model = case_model(case, a.tiny)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(a.runs or f"/tmp/tune_runs_{a.case}")
    t0 = time.time()
    info = {"case": a.case, "model": model, "global_batch": case["global_batch"], "gpu_limit_gib": case["gpu_limit_gib"],
            "space": {k: list(v) if isinstance(v, tuple) else v for k, v in case["space"].items()},
            "steps": a.steps, "warmup": a.warmup, "window_s": None if a.steps else a.window_s, "budget": a.budget, "device": a.device, "argv": sys.argv[1:],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import torch

    info["versions"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}
    if a.device == "cuda":
        import deepspeed

        info["versions"]["deepspeed"] = deepspeed.__version__
        info["prebuild_s"] = prebuild(case["space"])
    grid = grid_rows(case, model, a.device, a.grid)
    print(f"case {a.case}: {len(grid)} grid configurations", flush=True)
    write_bench(runs / "grid", True, case, a.device)
    t1 = time.time()
    rows = run_grid(grid, model, a, runs / "grid")
    info["grid_wall_s"] = round(time.time() - t1, 1)
    path = out / f"tune_{a.case}.json"
    path.write_text(json.dumps({**info, "judge": judge(rows, None), "tune": None, "grid": rows}, indent=1, default=str))
    tuned = None
    if not a.no_tune:
        write_bench(runs / "tune", False, case, a.device)
        tuned = run_tune(case, model, a, runs / "tune")
    if tuned:
        for t in tuned.get("trials", []):
            if t.get("run_id"):
                from shardlab.run.store import load_run

                t["startup_s"] = startup_seconds(load_run(runs / "tune" / t["run_id"]))
    path.write_text(json.dumps({**info, "judge": judge(rows, tuned), "tune": tuned, "grid": rows}, indent=1, default=str))
    repeats = run_repeats(rows, tuned, model, a, runs / "grid") if a.repeat else []
    res = {**info, "judge": judge(rows, tuned, repeats), "tune": tuned, "grid": rows, "repeats": repeats,
           "wall_s": round(time.time() - t0, 1)}
    path.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res["judge"], indent=1, default=str))
    print(f"wall {res['wall_s']} s (grid {info['grid_wall_s']} s, tune {tuned and tuned['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
