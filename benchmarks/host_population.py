"""Where the uncalibrated host speed should sit among the lent H200 machines: one host factor per machine,
then leave one machine out.

Every H200 row benchmarks/steptime_accuracy.py judges (timed alone) is put on the lent machine that ran it
(MACHINES below: docs/benchmarks.md and results/calibrations.json say which files and device calls shared a
machine; a tune grid's device call is one machine; when the records do not say, one file is one machine). For
each machine one multiplier of all host time (Rates.host_fit, the GPU's work held at 1) is fitted to its rows by
least squares in log space, as calibrate.fit_from_runs does. Then, for each machine m, the default is set to the
median of the OTHER machines' factors and m's rows are predicted with it, uncalibrated: the error a machine nobody
has measured would see. Prints a line per machine (rows, fitted factor, how much its rows' time follows the host,
median / largest |error| with today's default and with the left-out one), then the pooled figures.

    .venv/bin/python benchmarks/host_population.py [--json OUT] [--aggregate median|geomean]

The median, not the geometric mean, is the default aggregate: a machine is one draw from the lent population,
a few machines have only 1-5 rows or rows whose time barely depends on the host (their factor is poorly pinned),
and one host (machine B) sits far from the rest; the median does not follow such a draw.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from shardlab.estimate import estimate  # noqa: E402
from shardlab.estimate.steptime import Rates  # noqa: E402

# results file (steptime_accuracy's source, its first word) -> the machine that ran it, where a file shares a
# machine with another or holds several; every other file is a machine of its own.
SAME_MACHINE = {
    # session 6, calls 1 and 2 on one machine (docs/benchmarks.md "Session 6 on the lent H200"; calibrations.json: s6a)
    "fidelity_h200_hf": "s6a", "fidelity_h200_val_s6": "s6a", "tune_h200_gpt125_tune": "s6a",
    # session 5, 15:09 UTC: both cases' tune trials in one device call
    "tune_h200_gpt125": "s5 15:09", "tune_h200_gpt350cap": "s5 15:09",
    # session 11: machine A (#701-709), machine B (#710-717 and the res plans again), machine C (#801-810)
    "fidelity_h200_new": "A", "fidelity_h200_new2": "B", "fidelity_h200_res16": "B", "fidelity_h200_new3": "C",
    # session 9: one machine, three calls back to back (the machine stayed warm); session 10: five calls, one machine
    "tune_h200_llama1b_grid": "s9", "tune_h200_llama1b_live": "s10",
}


def machine_of(r: dict) -> str:
    src = r["source"].split(" ")[0]
    if src == "steptime_probe_h200":  # each probe on its own machine, calibrated there
        return "probe1" if r.get("calibration") == "calibration_h200_run1.json" else "probe2"
    if src == "tune_h200_gpt125_grid":  # session 5, two device calls (17:13-17:43 UTC): a call = one machine
        return f"s5 grid call {r.get('call')}"
    if src == "tune_h200_gpt350cap_grid":  # four sittings, told apart by the run ids' date and hour
        day_hour = (r.get("run_id") or "")[:11]
        return {"20261201-20": "s6b", "20261201-21": "s6 call 4", "20261201-23": "s7"}.get(day_hour, "s9")
    return SAME_MACHINE.get(src, src.replace("fidelity_h200_", ""))


# the machines that ran `shardlab calibrate` themselves -> that file (results/): for --index
CALIBRATED = {"probe1": "calibration_h200_run1.json", "probe2": "calibration_h200.json", "val": "calibration_h200_val.json",
              "held": "calibration_h200_held.json", "s6a": "calibration_h200_s6a.json", "s6b": "calibration_h200_s6b.json",
              "s10": "calibration_h200_s10.json", "A": "calibration_h200_new.json", "C": "calibration_h200_new3.json"}

GRID = [2 ** (i / 64) for i in range(-64, 129)]  # host factor 0.5x-4x, 1.1% apart


def h200_rows() -> list[dict]:
    import steptime_accuracy

    out = []
    for r in steptime_accuracy.rows():
        name = r["gpu"] if isinstance(r["gpu"], str) else r["gpu"].name
        if name.startswith("h200"):
            out.append({**r, "machine": machine_of(r)})
    return out


def curves(rows: list[dict]) -> None:
    """Each row's predicted tokens/s at every factor of GRID (the estimate caches the GPU side, so this is cheap)."""
    for r in rows:
        r["curve"] = [estimate(r["plan"], r["model"], r["gpu"], rates=Rates(host_fit=h), calibration=False).time["tokens_per_s"]
                      for h in GRID]


def pred_at(r: dict, h: float) -> float:
    """Predicted tokens/s at host factor h, interpolated in log-log between the grid's points."""
    x = 64 * math.log2(h) + 64
    i = min(max(int(math.floor(x)), 0), len(GRID) - 2)
    t = x - i
    return math.exp((1 - t) * math.log(r["curve"][i]) + t * math.log(r["curve"][i + 1]))


def fit(rows: list[dict]) -> float:
    """The grid's host factor with the least sum of squared log errors (calibrate.fit_from_runs, host only)."""
    return min(GRID, key=lambda h: (sum(math.log(pred_at(r, h) / r["measured"]) ** 2 for r in rows), abs(math.log(h))))


def errors(rows: list[dict], h: float) -> list[float]:
    return [pred_at(r, h) / r["measured"] - 1 for r in rows]


def aggregate(xs: list[float], how: str) -> float:
    return statistics.median(xs) if how == "median" else math.exp(statistics.fmean(math.log(x) for x in xs))


def index_check(machines: dict, fits: dict) -> None:
    """Does `shardlab calibrate`'s host step tell a machine's factor? Its two timings (kernel launch, FSDP2 unit) over
    the defaults, as one factor: their geometric mean (the defaults are themselves two machines' geometric means).
    Nothing fitted: each machine's rows predicted with its own index as the host factor (GPU rates left at the
    defaults, so only the host moves), against factor 1; then the same with the machine's whole calibration (its
    GPU rates too, as calibrate.rates_from would price them), host_fit 1 against host_fit = index."""
    from shardlab.estimate.hostcost import DEFAULT_LAUNCH_S, FSDP_UNIT_S

    print()
    xs, ys, e0, e1 = [], [], [], []
    for m, f in CALIBRATED.items():
        r = json.loads((Path(__file__).parent / "results" / f).read_text())["rates"]
        idx = math.sqrt(r["launch_s"] / DEFAULT_LAUNCH_S * r["fsdp_unit_s"] / FSDP_UNIT_S)
        a, b = [abs(x) for x in errors(machines[m], 1.0)], [abs(x) for x in errors(machines[m], idx)]
        xs.append(math.log(idx))
        ys.append(math.log(fits[m]))
        e0 += a
        e1 += b
        print(f"{m:8} {f:28} launch {r['launch_s'] * 1e6:5.1f} us unit {r['fsdp_unit_s'] * 1e3:5.2f} ms -> index {idx:.2f} (rows' fit "
              f"{fits[m]:.2f}) | factor 1: median {statistics.median(a):5.1%} max {max(a):5.1%} | index: median "
              f"{statistics.median(b):5.1%} max {max(b):5.1%}")
    print(f"correlation of log index and log fit over {len(xs)} machines: {statistics.correlation(xs, ys):.2f}")
    for label, es in (("factor 1", e0), ("calibrate's index", e1)):
        print(f"{label:18} rows {len(es)}: median {statistics.median(es):.1%} max {max(es):.1%} over 25%: {sum(x > 0.25 for x in es)}")
    # as it would land: each machine's own calibration (its GPU rates too), host_fit 1 (today) against host_fit = index
    print("\nwith each machine's own calibration (GPU rates applied): host_fit 1 -> index")
    c0, c1 = [], []
    for m, f in CALIBRATED.items():
        cal = json.loads((Path(__file__).parent / "results" / f).read_text())
        r = cal["rates"]
        idx = math.sqrt(r["launch_s"] / DEFAULT_LAUNCH_S * r["fsdp_unit_s"] / FSDP_UNIT_S)
        a, b = ([abs(estimate(x["plan"], x["model"], x["gpu"], calibration={**cal, "rates": {**r, "host_fit": h}}).time["tokens_per_s"]
                     / x["measured"] - 1) for x in machines[m]] for h in (1.0, idx))
        c0 += a
        c1 += b
        print(f"{m:8} rows {len(a):3} index {idx:.2f} | median {statistics.median(a):5.1%} -> {statistics.median(b):5.1%} "
              f"({(statistics.median(b) - statistics.median(a)) * 100:+.1f} points) | max {max(a):5.1%} -> {max(b):5.1%}")
    for label, es in (("calibrated, host 1", c0), ("calibrated, index", c1)):
        print(f"{label:18} rows {len(es)}: median {statistics.median(es):.1%} max {max(es):.1%} over 25%: {sum(x > 0.25 for x in es)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--aggregate", choices=["median", "geomean"], default="median")
    ap.add_argument("--index", action="store_true", help="also: calibrate's own host timings as one factor, on the machines that ran it")
    a = ap.parse_args(argv)
    rows = h200_rows()
    curves(rows)
    machines: dict[str, list[dict]] = {}
    for r in rows:
        machines.setdefault(r["machine"], []).append(r)
    fits = {m: fit(rs) for m, rs in machines.items()}
    print(f"{'machine':18} {'rows':>4} {'files':44} {'fit':>5} {'host share':>10} | {'today: median':>13} {'max':>6} | "
          f"{'left out: default':>17} {'median':>6} {'max':>6}")
    table, today_all, loo_all, own_all = [], [], [], []
    for m, rs in sorted(machines.items(), key=lambda kv: fits[kv[0]]):
        others = [f for k, f in fits.items() if k != m]
        d = aggregate(others, a.aggregate)
        e0, e1 = errors(rs, 1.0), errors(rs, d)
        # host share: d ln(step time) / d ln(host factor) at 1, the rows' median (0: GPU-bound, 1: all host)
        share = statistics.median(math.log(pred_at(r, 1 / 1.05) / pred_at(r, 1.05)) / math.log(1.05 ** 2) for r in rs)
        files = ",".join(sorted({r["source"].split(" ")[0].replace("fidelity_h200_", "f_").replace("tune_h200_", "t_") for r in rs}))
        print(f"{m:18} {len(rs):4} {files[:44]:44} {fits[m]:5.2f} {share:10.2f} | {statistics.median(map(abs, e0)):13.1%} "
              f"{max(map(abs, e0)):6.1%} | {d:17.3f} {statistics.median(map(abs, e1)):6.1%} {max(map(abs, e1)):6.1%}")
        table.append({"machine": m, "rows": len(rs), "files": files, "fit": fits[m], "host_share": share, "left_out_default": d,
                      "today": e0, "left_out": e1, "names": [r["name"] for r in rs]})
        today_all += e0
        loo_all += e1
        own_all += errors(rs, fits[m])  # in-sample: what a host factor fitted on the machine itself leaves
    everyone = aggregate(list(fits.values()), a.aggregate)
    print()
    for t in table:
        t["own"] = errors(machines[t["machine"]], t["fit"])
    for label, es, key in (("today (factor 1)", today_all, "today"), (f"left out ({a.aggregate} of the others)", loo_all, "left_out"),
                           ("own machine's factor (in-sample)", own_all, "own")):
        u = [abs(x) for x in es]
        within = sum(statistics.median(map(abs, t[key])) <= 0.15 for t in table)
        print(f"{label:34} rows {len(u)}: median {statistics.median(u):.1%} max {max(u):.1%} over 25%: {sum(x > 0.25 for x in u)}; "
              f"machines with median within 15%: {within} of {len(table)}")
    print(f"{a.aggregate} of all {len(fits)} machines' factors: {everyone:.3f} (sorted: "
          + ", ".join(f"{f:.2f}" for f in sorted(fits.values())) + ")")
    if a.index:
        index_check(machines, fits)
    if a.json:
        Path(a.json).write_text(json.dumps({"aggregate": a.aggregate, "population": everyone, "machines": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
