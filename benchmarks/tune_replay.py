"""Replay `shardlab tune`'s search over a recorded grid (benchmarks/tune_gpu.py's JSON), without a GPU.

The candidates are re-enumerated and re-estimated with today's code (space, fit rule, step model,
twins); a trial "runs" by reading the grid's measurement of that configuration (tokens/s, peak
memory; "oom"/"failed" as recorded). Configurations the grid did not run (its deadline) are left out
of the search, so the replay searches what the grid measured.
It shows which trials today's search would spend, where it stops, and how its pick compares with the
grid's measured best. The grid's own timing conditions apply (`--jobs` > 1 grids are contended:
docs/benchmarks.md), so this judges the search's choices, not the machine.

    .venv/bin/python benchmarks/tune_replay.py benchmarks/results/tune_h200_gpt350cap.json [--budget 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GIB = 2**30


def replay(path: Path, budget: str = "5") -> dict:
    from shardlab import Plan
    from shardlab.estimate import get_gpu
    from shardlab.estimate.gpus import capped
    from shardlab.tune import Budget, Space, candidates
    from shardlab.tune.search import best, predict, search

    d = json.loads(path.read_text())
    gpu = capped("h200", int(d["gpu_limit_gib"] * GIB)) if d.get("gpu_limit_gib") else get_gpu("h200")
    cands = candidates(Space(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["space"].items()},
                             global_batch=d["global_batch"]), Plan())
    predict(cands, d["model"], gpu)
    grid = {g["key"]: g for g in d["grid"] if g["status"] in ("completed", "oom", "failed")}
    for c in cands:
        if c.status == "unrun" and c.key not in grid:
            c.status, c.reason = "rejected", "not measured by the grid"

    def run(c):
        g = grid[c.key]
        if g["status"] != "completed":
            c.status, c.reason = g["status"], f"grid: {g.get('error')}"
            return
        c.status, c.measured = "completed", dict(g["measured"])

    stop = search(cands, "fastest", Budget.parse(budget), run)
    ok = [g for g in d["grid"] if g["status"] == "completed"]
    top = max(ok, key=lambda g: g["measured"]["tokens_per_s"])
    pick = best(cands, "fastest")
    trials = sorted((c for c in cands if c.trial), key=lambda c: c.trial)
    return {"grid": path.name, "stop": stop, "gpu": gpu.name,
            "pruned": sum(c.status == "rejected" and c.reason.startswith("does not fit") for c in cands),
            "unmeasured": sum(c.reason == "not measured by the grid" for c in cands),
            "tight": sum(c.predicted.get("fit") == "tight" for c in cands),
            "trials": [(c.trial, c.key, c.group, c.status, round(c.measured.get("tokens_per_s") or 0)) for c in trials],
            "pick": pick.key if pick else None, "pick_tokens_per_s": pick.measured["tokens_per_s"] if pick else None,
            "grid_best": top["key"], "grid_best_tokens_per_s": top["measured"]["tokens_per_s"],
            "pick_vs_best": (pick.measured["tokens_per_s"] / top["measured"]["tokens_per_s"] - 1) if pick else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grids", nargs="+", type=Path)
    ap.add_argument("--budget", default="5")
    a = ap.parse_args()
    for p in a.grids:
        r = replay(p, a.budget)
        print(f"{r['grid']} on {r['gpu']}: {r['pruned']} pruned by memory, {r['tight']} tight, {r['unmeasured']} left out "
              f"(not run by the grid); stop: {r['stop']}")
        for t in r["trials"]:
            print(f"  trial {t[0]} (group {t[2]}) {t[3]:<9} {t[1]:<40} {t[4]:>9,} tok/s")
        vs = f"{r['pick_vs_best']:+.1%}" if r["pick_vs_best"] is not None else "-"
        print(f"  pick {r['pick']} vs the grid's best {r['grid_best']} ({r['grid_best_tokens_per_s']:,.0f} tok/s): {vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
