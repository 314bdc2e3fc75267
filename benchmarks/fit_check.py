"""The memory fit rule against every H200 row with a measurement (issue 20): pruned wrongly / kept wrongly.

Rows: benchmarks/results/fidelity_h200*.json (every run completed, the full 141 GiB H200) and
tune_h200_*.json (grid rows and tune's trials that ran; gpt350cap under an 18 GiB allocator cap set
with torch.cuda.set_per_process_memory_fraction). Each row is re-estimated with today's estimator and
judged by its own measurement, never by the estimate:

- at the limit it ran under: a rule that would have rejected a row that completed pruned it wrongly
  (a row that ran out of memory and was kept would be kept wrongly: no OOM has been recorded);
- at any other allocator cap, bounds the row's measurement gives: under a cap below its measured peak
  allocated it cannot run (OOM for certain); under a cap at or above the reserved it measured (the
  cap itself for capped rows whose reserved reached it) it runs for certain. A rule whose threshold
  (the smallest cap at which it keeps the row) lies above that second bound prunes wrongly somewhere;
  one below the first bound keeps wrongly somewhere. Between the bounds only a run can tell.

Rules: "tune before" (session 4's tune: predicted peak reserved x 1.10 + 1 GiB CUDA context <= the
cap), "estimate before" (Estimate.fits until now: peak allocated x 1.05 + 1 GiB <= the memory),
"fit: need" (allocator.fit's prune threshold: peak allocated + STRANDED) and "fit: safe" (its "fits"
threshold, with MEMORY_MARGIN). For the full GPU the 1 GiB context is outside the allocator in the
new rule, as in the old ones.

    .venv/bin/python benchmarks/fit_check.py [--rows]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30


def _bench(name: str):
    """benchmarks/NAME.py as a module (its row readers)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows() -> list[dict]:
    """{name, plan, model, cap (allocator cap in bytes or None), status, ma, mr} for every measured row."""
    from shardlab import Plan

    fid, tune_gpu, out = _bench("fidelity"), _bench("tune_gpu"), []
    for f in sorted(RESULTS.glob("fidelity_h200*.json")):
        for r in json.loads(f.read_text()):
            out.append({"name": f"{f.stem}#{r['id']}", "plan": fid.plan_for(r), "model": fid.model_for(r), "cap": None,
                        "status": r["status"], "ma": r.get("peak_allocated_bytes"), "mr": r.get("peak_reserved_bytes")})
    for f, d, kind, r in tune_gpu.recorded_files(RESULTS):
        cap = int(d["gpu_limit_gib"] * GIB) if d.get("gpu_limit_gib") else None
        if r["status"] in ("not-run", "error") or not f.name.startswith("tune_h200_"):
            continue
        key = r["key"] if kind == "grid" else f"{kind} {r.get('trial', '')} {r['key']}"
        m = r.get("measured") or {}
        out.append({"name": f"{f.stem}:{key}", "plan": Plan.model_validate(r["plan"]), "model": d["model"], "cap": cap,
                    "status": r["status"], "ma": m.get("peak_allocated_bytes"), "mr": m.get("peak_reserved_bytes")})
    return out


def thresholds(r: dict) -> dict:
    """The smallest allocator cap (bytes) at which each rule keeps the row."""
    from shardlab.estimate import estimate
    from shardlab.estimate.allocator import CUDA_CONTEXT_BYTES, fit

    e = estimate(r["plan"], r["model"], gpu="h200")
    pa, pr = e.per_gpu["peak_allocated"], e.per_gpu["peak_reserved"]
    probe = fit(pa, e.gpu)  # need / safe do not depend on the limit
    return {"tune before": int(pr * 1.10) + CUDA_CONTEXT_BYTES, "estimate before": int(pa * 1.05) + CUDA_CONTEXT_BYTES,
            "fit: need": probe["need_bytes"], "fit: safe": probe["safe_bytes"], "_pa": pa}


def judge(rs: list[dict]) -> dict:
    from shardlab.estimate import get_gpu
    from shardlab.estimate.allocator import CUDA_CONTEXT_BYTES

    h200 = get_gpu("h200").memory_bytes - CUDA_CONTEXT_BYTES  # the allocator's share of the full GPU
    rules = ("tune before", "estimate before", "fit: need", "fit: safe")
    res = {k: {"at its limit: pruned wrongly": [], "at its limit: kept wrongly": [], "any cap: pruned wrongly": [],
               "any cap: kept wrongly": []} for k in rules}
    for r in rs:
        t = thresholds(r)
        r["thresholds"] = t
        limit = r["cap"] or h200
        ran = r["status"] == "completed"
        # the old rules counted the context inside a capped GPU's memory (tune_gpu.py's target)
        lim = {k: (limit + CUDA_CONTEXT_BYTES if k.endswith("before") else limit) for k in rules}
        for k in rules:
            if ran and t[k] > lim[k]:
                res[k]["at its limit: pruned wrongly"].append(r["name"])
            if r["status"] == "oom" and t[k] <= lim[k]:
                res[k]["at its limit: kept wrongly"].append(r["name"])
        if not (ran and r["ma"] and r["mr"]):
            continue
        runs_at = r["cap"] if r["cap"] and r["mr"] >= r["cap"] - GIB // 10 else r["mr"]
        for k in rules:
            thr = t[k] - (CUDA_CONTEXT_BYTES if k.endswith("before") else 0)  # as an allocator cap
            if thr > runs_at:
                res[k]["any cap: pruned wrongly"].append(r["name"])
            if thr < r["ma"]:
                res[k]["any cap: kept wrongly"].append(r["name"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", action="store_true", help="list the rows each count holds")
    a = ap.parse_args()
    rs = rows()
    res = judge(rs)
    n = sum(1 for r in rs if r["status"] == "completed" and r["ma"])
    print(f"{len(rs)} rows with a measurement ({n} completed with peak allocated; "
          f"{sum(r['status'] == 'oom' for r in rs)} out of memory; {sum(bool(r['cap']) for r in rs)} under an allocator cap)")
    cols = list(next(iter(res.values())))
    print(f"{'rule':<16}" + "".join(f"{c:>32}" for c in cols))
    for k, v in res.items():
        print(f"{k:<16}" + "".join(f"{len(v[c]):>32}" for c in cols))
    if a.rows:
        for k, v in res.items():
            for c, names in v.items():
                if names:
                    print(f"\n{k} / {c}: " + ", ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
