"""Replay `shardlab tune`'s search over a recorded grid (benchmarks/tune_gpu.py's JSON), without a GPU.

This is a replay, not a measurement: the candidates are re-enumerated and re-estimated with today's
code (space, fit rule, step model, twins, window.py's spread and overlap rule); a trial "runs" by
reading the grid's measurement of that configuration (tokens/s and its interquartile interval from
the recorded step periods, peak memory; "oom"/"failed" as recorded). A re-measure (the search's
top-two rule) reads the configuration's next recorded timing, in order: tune's own trials and the
--repeat timings in the same JSON (and in --timings files; `--first trials` reads the live tune's
trial of a configuration first, the grid's row after); where none was recorded it says so and the
first figure stands. Configurations the grid did not run (its deadline) are left out of the search.

It answers: would tune's pick, with at most `--budget` trials, be within 5% of the grid's measured
best (its single timing, and the median of its recorded timings where there are several)? How many
trials, and how long would they take: the recorded wall time of those runs, and that time with the
timed window sized by window.py (each run's recorded median period x the extra timed steps). The
recorded runs timed 4 periods each (8 steps, 3 warm-up), so their intervals are rough.

    .venv/bin/python benchmarks/tune_replay.py benchmarks/results/tune_h200_gpt125_tune.json \\
        benchmarks/results/tune_h200_gpt350cap_grid.json [--budget 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GIB = 2**30


def with_spread(measured: dict) -> dict:
    """A recorded measurement with window.spread's interval recomputed from its step periods."""
    from shardlab.tune.window import spread

    m, p = dict(measured), measured.get("step_times_s")
    if p and m.get("tokens_per_s") and m.get("step_time_s"):
        m.update(spread(p, m["tokens_per_s"] * m["step_time_s"]))
    return m


def run_seconds(row: dict) -> float | None:
    """A recorded run's wall time: the grid's wall_s, else launcher-to-exit from its startup_s."""
    return row.get("wall_s") or (round(sum((row.get("startup_s") or {}).values()), 1) or None)


def windowed_seconds(row: dict, predicted_step_s: float | None) -> float | None:
    """That run's wall time had it timed window.timed_steps periods at its predicted step time."""
    from shardlab.tune.window import timed_steps

    wall, m = run_seconds(row), row.get("measured") or {}
    if wall is None or not m.get("step_time_s"):
        return wall
    return wall + (timed_steps(predicted_step_s) - len(m.get("step_times_s") or [])) * m["step_time_s"]


def timings(d: dict, extra: list[Path]) -> dict[str, list[dict]]:
    """key -> recorded runs after the grid's own (tune's trials, then --repeat rows), every file."""
    out: dict[str, list[dict]] = {}
    for src in [d] + [json.loads(p.read_text()) for p in extra]:
        for r in ((src.get("tune") or {}).get("trials") or []) + (src.get("repeats") or []):
            if r.get("status") == "completed" and (r.get("measured") or {}).get("tokens_per_s"):
                out.setdefault(r["key"], []).append(r)
    return out


def replay(path: Path, budget: str = "5", extra: list[Path] | None = None, first: str = "grid") -> dict:
    """The search replayed over `path`'s recorded runs. first="trials": a configuration's first timing is
    tune's recorded trial of it where there is one (the live tune's figures), else the grid's."""
    from shardlab import Plan
    from shardlab.estimate import get_gpu
    from shardlab.estimate.gpus import capped
    from shardlab.tune import Budget, Space, candidates
    from shardlab.tune.search import best, not_told_apart, predict, search
    from shardlab.tune.window import interval, overlap

    d = json.loads(path.read_text())
    gpu = capped("h200", int(d["gpu_limit_gib"] * GIB)) if d.get("gpu_limit_gib") else get_gpu("h200")
    cands = candidates(Space(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["space"].items()},
                             global_batch=d["global_batch"]), Plan())
    predict(cands, d["model"], gpu)
    grid = {g["key"]: g for g in d["grid"] if g["status"] in ("completed", "oom", "failed")}
    more = timings(d, extra or [])
    queue = {k: ([*more.get(k, []), g] if first == "trials" else [g, *more.get(k, [])]) for k, g in grid.items()}
    for c in cands:
        if c.status == "unrun" and c.key not in grid:
            c.status, c.reason = "rejected", "not measured by the grid"
    used: list[tuple[dict, float | None]] = []  # (recorded run, predicted step time) per trial run

    def run(c):
        if not queue[c.key]:
            c.status, c.reason = "failed", "replay: no further recorded timing of this configuration"
            return
        r = queue[c.key].pop(0)
        used.append((r, c.predicted.get("step_time_s")))
        if r["status"] != "completed":
            c.status, c.reason = r["status"], f"grid: {r.get('error')}"
            return
        c.status, c.measured = "completed", with_spread(r["measured"])

    stop = search(cands, "fastest", Budget.parse(budget), run)
    ok = [g for g in d["grid"] if g["status"] == "completed"]
    top = max(ok, key=lambda g: g["measured"]["tokens_per_s"])
    pick = best(cands, "fastest")
    medians = {k: statistics.median([grid[k]["measured"]["tokens_per_s"]] + [r["measured"]["tokens_per_s"] for r in v])
               for k, v in timings(d, extra or []).items() if k in grid and grid[k]["status"] == "completed"}
    m_best = max(medians, key=medians.get) if medians else None
    trials = sorted((c for c in cands if c.trial), key=lambda c: c.trial)
    top_m = with_spread(top["measured"])
    pt = pick.measured["tokens_per_s"] if pick else None
    grid_pick = grid[pick.key]["measured"]["tokens_per_s"] if pick else None
    return {"grid": path.name, "stop": stop, "gpu": gpu.name,
            "pruned": sum(c.status == "rejected" and c.reason.startswith("does not fit") for c in cands),
            "unmeasured": sum(c.reason == "not measured by the grid" for c in cands),
            "tight": sum(c.predicted.get("fit") == "tight" for c in cands),
            "trials": [(c.trial, c.key, c.group, c.status, round(c.measured.get("tokens_per_s") or 0),
                        [round(x) for x in interval(c.measured) or (0, 0)], c.measured.get("retrials", []), c.reason) for c in trials],
            "trial_runs": len(used), "recorded_s": round(sum(run_seconds(r) or 0 for r, _ in used), 1),
            "windowed_s": round(sum(windowed_seconds(r, s) or 0 for r, s in used), 1),
            "pick": pick.key if pick else None, "pick_tokens_per_s": pt, "pick_interval": interval(pick.measured) if pick else None,
            "pick_grid_tokens_per_s": grid_pick,
            "not_told_apart": [c.key for c in not_told_apart(cands, "fastest")],
            "grid_best": top["key"], "grid_best_tokens_per_s": top["measured"]["tokens_per_s"], "grid_best_interval": interval(top_m),
            "pick_vs_best": (grid_pick / top["measured"]["tokens_per_s"] - 1) if pick else None,
            "pick_overlaps_best": bool(pick) and overlap(with_spread(grid[pick.key]["measured"]), top_m),
            "median_best": m_best, "median_best_tokens_per_s": medians.get(m_best),
            "pick_median_vs_median_best": (medians[pick.key] / medians[m_best] - 1) if pick and pick.key in medians else None,
            "medians": {k: [round(v), 1 + len(timings(d, extra or []).get(k, []))] for k, v in sorted(medians.items(), key=lambda kv: -kv[1])}}


def show(r: dict) -> None:
    print(f"{r['grid']} on {r['gpu']}: {r['pruned']} pruned by memory, {r['tight']} tight, {r['unmeasured']} left out "
          f"(not run by the grid); stop: {r['stop']}; {r['trial_runs']} trial runs, recorded {r['recorded_s']} s, "
          f"{r['windowed_s']} s with window.py's timed window")
    for t in r["trials"]:
        again = f" re-measured in trial {','.join(map(str, t[6]))}" if t[6] else ""
        print(f"  trial {t[0]} (group {t[2]}) {t[3]:<9} {t[1]:<40} {t[4]:>9,} tok/s [{t[5][0]:,}-{t[5][1]:,}]{again}"
              + (f"  ({t[7]})" if t[7] and (t[3] != "completed" or "re-measure" in t[7]) else ""))
    lo, hi = r["grid_best_interval"]
    print(f"  grid's best (one timing): {r['grid_best']} {r['grid_best_tokens_per_s']:,.0f} tok/s [{lo:,.0f}-{hi:,.0f}]")
    if r["pick"] is None:
        print("  no pick")
        return
    print(f"  pick {r['pick']}: the grid's timing of it {r['pick_grid_tokens_per_s']:,.0f} tok/s, {r['pick_vs_best']:+.1%} vs the grid's best "
          f"({'within' if r['pick_vs_best'] >= -0.05 else 'NOT within'} 5%); intervals {'overlap' if r['pick_overlaps_best'] else 'apart'}")
    if r["not_told_apart"]:
        print(f"  the search's own verdict: not told apart from {', '.join(r['not_told_apart'])} (intervals overlap)")
    if r["median_best"]:
        vs = r["pick_median_vs_median_best"]
        print(f"  medians over every recorded timing (key: [median, timings]): {r['medians']}")
        print(f"  best median {r['median_best']} {r['median_best_tokens_per_s']:,.0f} tok/s; pick's median "
              + (f"{vs:+.1%} ({'within' if vs >= -0.05 else 'NOT within'} 5%)" if vs is not None else "not recorded more than once"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grids", nargs="+", type=Path)
    ap.add_argument("--budget", default="5")
    ap.add_argument("--timings", nargs="*", type=Path, default=[], help="more tune_gpu.py JSONs whose trials / repeats of the same case count as re-measures")
    ap.add_argument("--first", choices=("grid", "trials"), default="grid", help="a configuration's first timing: the grid's row "
                    "(default) or the recorded tune's trial of it where there is one (replays the live tune's figures)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for p in a.grids:
        r = replay(p, a.budget, a.timings, a.first)
        print(json.dumps(r, default=str)) if a.json else show(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
