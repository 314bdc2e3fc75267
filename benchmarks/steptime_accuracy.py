"""Predicted vs measured tokens/s on every recorded GPU row, without and with a calibration.

Rows: the H100 matrix (gpu_validate_h100*.json, zero3_gap_h100.json: gpt-1b, micro-batch 4 or 8),
the H200 probes (steptime_probe_h200.json; each probe on its own lent machine, calibrated there) and the runner matrices of issue 13 when present
(fidelity_*.json). Uncalibrated = the GPU table and steptime.py's defaults; calibrated = the
calibration made on the machine that ran the row (results/calibrations.json, or the file of the same
device call); rows whose machine was not calibrated have no calibrated figure. Prints one line per row,
then the median and largest absolute error per source.

    .venv/bin/python benchmarks/steptime_accuracy.py [--json OUT] [--zero3] [--twins]

--zero3 prints, for every DeepSpeed ZeRO-3 row without offload, the share of the time its host/GPU
timeline overlaps that its measurement leaves exposed (hostcost.py's SERIAL["deepspeed_zero3"] solved per row), next to the
shape-side quantities it might depend on (GPU/host ratio, host seconds per module hook), and the
plans measured more than once: the question of what decides ZeRO-3's overlap (issue 14).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from shardlab.estimate import estimate

RESULTS = Path(__file__).parent / "results"
MIN_TIMED_STEPS = 4  # the median of at least this many steady steps (steps 3.., after warm-up)
GPU_OF = {"H100": "h100-80gb", "H200": "h200"}


def _gpu(device: str) -> str:
    from shardlab.run.worker import gpu_table_name

    return gpu_table_name(device) or "h100-80gb"


def rows(include_shared: bool = False) -> list[dict]:
    out = []
    for f in sorted(RESULTS.glob("gpu_validate_h100*.json")):
        if "pairs" in f.name:
            continue  # the same configurations as the matrix, run as separate pairs
        for r in json.load(open(f)):
            if r.get("tokens_per_s"):
                plan = {"framework": r["framework"], "sharding": r["sharding"], "micro_batch_size": r.get("micro_batch", 4),
                        "activation_checkpointing": r["activation_checkpointing"],
                        "offload": {"optimizer": r["offload"]} if r["offload"] != "none" else {}}
                out.append({"source": f.stem, "name": f"{r['framework']} {r['sharding']} off={r['offload']} ac={int(r['activation_checkpointing'])}",
                            "plan": plan, "model": r["model"], "gpu": _gpu(r["device"]), "measured": r["tokens_per_s"]})
    z = json.load(open(RESULTS / "zero3_gap_h100.json"))
    for r in z["results"]:
        if r.get("tokens_per_s") and not r.get("overrides") and r["framework"] != "torch":
            out.append({"source": "zero3_gap_h100", "name": f"{r['variant']} mb={r['micro_batch']}", "model": "gpt-1b", "gpu": "h100-80gb",
                        "plan": {"framework": r["framework"], "sharding": r["sharding"], "micro_batch_size": r["micro_batch"]},
                        "measured": r["tokens_per_s"]})
    for f in sorted(RESULTS.glob("steptime_probe_*.json")):
        for r in json.load(open(f)):
            if r.get("tokens_per_s") and r["model"]["name"] != "tiny":
                out.append({"source": f.stem, "name": r["name"], "plan": r["plan"], "model": r["model"], "gpu": _gpu(r["device"]),
                            "measured": r["tokens_per_s"],
                            # each probe ran on its own machine, calibrated there: probe 1 with run 1's file
                            "calibration": "calibration_h200_run1.json" if r.get("probe", 1) == 1 else "calibration_h200.json"})
    out += fidelity_rows(include_shared)
    out += tune_rows()
    return out


def tune_rows() -> list[dict]:
    """Issue 20's measured grids (benchmarks/tune_gpu.py) whose configurations ran one at a time
    (`--jobs 1`: nothing else on the GPU or starting beside them), and tune's own trials (always
    alone). Grids run several at once (tune_h200_gpt125.json, _gated.json) time the sharing: left out."""
    import tune_gpu  # benchmarks/tune_gpu.py wrote these files

    from shardlab.estimate.gpus import capped

    out = []
    for f, d, kind, r in tune_gpu.recorded_files(RESULTS):
        # the grid's allocator cap (tune_worker.py's set_per_process_memory_fraction): the estimate prices its flushes
        gpu = capped("h200", int(d["gpu_limit_gib"] * 2**30)) if d.get("gpu_limit_gib") else "h200"
        argv = d.get("argv", [])
        alone = "--jobs" not in argv or argv[argv.index("--jobs") + 1] == "1"
        if kind == "grid" and not alone:
            continue
        m = r.get("measured") or {}
        if r.get("status") == "completed" and len(m.get("step_times_s") or []) >= MIN_TIMED_STEPS and m.get("tokens_per_s"):
            out.append({"source": f.stem + ("" if kind == "grid" else f" {kind}s"), "name": r["key"], "plan": r["plan"],
                        "model": d["model"], "gpu": gpu, "measured": m["tokens_per_s"], "calibration": _calibration_of(f),
                        "run_id": r.get("run_id"), "call": r.get("call")})  # which device call (machine) ran it
    return out


def _calibration_of(results: Path) -> str | None:
    """The calibration made on the machine that ran these rows: as results/calibrations.json lists it,
    else by name (fidelity_h200_X.json -> calibration_h200_X.json, same device call), else None: a
    calibration made on another lent machine is not this machine's (its host timings differ by up to
    1.9x between machines: launch 34-50 us, FSDP unit 1.9-3.8 ms), so those rows have no calibrated figure."""
    listed = json.loads((RESULTS / "calibrations.json").read_text())
    own = listed.get(results.name) or (results.name.replace("fidelity_", "calibration_") if results.name.startswith("fidelity_") else None)
    return own if own and (RESULTS / own).is_file() else None


def fidelity_rows(include_shared: bool = False) -> list[dict]:
    """Issue 13's runner matrix (benchmarks/fidelity.py's rows: plan and model rebuilt by its own
    plan_for / model_for). A row times its configuration only if it ran alone on the GPU
    (fidelity.py's "concurrent" counts the runs beside it: 0) with at least MIN_TIMED_STEPS steps after the first two; the others time the
    sharing or too few steps, and are left out unless include_shared."""
    files = sorted(RESULTS.glob("fidelity_*.json"))
    if not files:
        return []
    try:
        import fidelity  # benchmarks/fidelity.py (issue 13)
    except ImportError:
        return []
    out = []
    for f in files:
        for r in json.load(open(f)):
            if r.get("status") != "completed" or not r.get("tokens_per_s"):
                continue
            timed = len([x for x in r.get("steps", []) if x.get("step", 0) > 2])
            alone = r.get("concurrent", 1) == 0 and timed >= MIN_TIMED_STEPS
            if not alone and not include_shared:
                continue
            name = f"#{r['id']} {r['model']} {r['framework']} {r['sharding']} {r['precision']} mb{r['micro_batch_size']}"
            out.append({"source": f.stem + ("" if alone else " (shared/short)"), "name": name,
                        "plan": fidelity.plan_for(r), "model": fidelity.model_for(r), "gpu": _gpu(r.get("device", "H200")),
                        "measured": r["tokens_per_s"], "calibration": _calibration_of(f)})
    return out


def zero3_regimes(rows_: list[dict]) -> None:
    """The exposed share each ZeRO-3 row implies (of the time the step's host/GPU timeline overlaps), and
    the plans measured more than once (--zero3)."""
    from shardlab.estimate.hostcost import SERIAL
    from shardlab.estimate.stepwork import work

    seen: dict[str, list[float]] = {}
    # implied: the exposed share that reproduces the row; host alone: predicted host + the rest over the
    # measured step (above 1: the host cost alone is over-predicted, whatever the overlap)
    print(f"{'source':28} {'row':34} {'meas s':>7} {'gpu s':>6} {'host s':>6} {'gpu/host':>8} {'ms/module':>9} {'implied':>7} {'host alone':>10}")
    for r in rows_:
        plan = r["plan"] if isinstance(r["plan"], dict) else r["plan"].model_dump(mode="json")
        off = plan.get("offload") or {}
        if plan.get("framework") != "deepspeed" or plan.get("sharding") != "zero3" or any(v not in (None, "none") for v in off.values()):
            continue
        e = estimate(r["plan"], r["model"], r["gpu"], calibration=False)
        t = e.time
        g, h, ov = t["compute_s"], t["detail"]["host_s"], t["detail"]["overlapped_s"]
        rest = t["exposed_comm_s"] + t["offload_s"]
        timeline = t["step_time_s"] - rest - SERIAL["deepspeed_zero3"] * ov
        meas = t["tokens_per_step"] / r["measured"]
        implied = (meas - rest - timeline) / ov
        spec = e.model
        modules = 0 if spec.is_bare else work(spec, e.plan.micro_batch_size, spec.seq_len, 2, e.plan.activation_checkpointing).modules
        per_mod = 1e3 * h / modules if modules else float("nan")  # host ms per module hook, whole step
        print(f"{r['source']:28} {r['name'][:34]:34} {meas:7.3f} {g:6.3f} {h:6.3f} {g / h:8.2f} {per_mod:9.2f} {implied:+7.2f} {(h + rest) / meas:10.2f}")
        same = {k: v for k, v in e.plan.model_dump(mode="json").items() if k != "low_memory_init"}  # not the step's
        key = json.dumps([r["gpu"], same, r["model"]], sort_keys=True, default=str)
        seen.setdefault(key, []).append(round(implied, 2))
    print("plans measured more than once (implied exposed share each time):")
    for k, v in seen.items():
        if len(v) > 1:
            print(" ", json.loads(k)[2] if isinstance(json.loads(k)[2], str) else json.loads(k)[2].get("name"), v)


def twins(table: list[dict]) -> None:
    """The same program timed more than once in one results file (one machine, one sitting): FSDP1 on one rank
    runs NO_SHARD whatever the plan's sharding (basis.fsdp_stage), so its ddp / zero2 / zero3 rows of a grid are
    one program, and a few plans were repeated. The spread between such rows is the timing's own noise, which no
    model can follow: a row over the bars whose twin is within them says so (--twins)."""
    groups: dict[str, list[dict]] = {}
    for t in table:
        plan = t["plan"] if isinstance(t["plan"], dict) else t["plan"].model_dump(mode="json")
        plan = {k: v for k, v in plan.items() if k not in ("low_memory_init", "auto", "passthrough")}
        world = (plan.get("topology") or {}).get("nodes", 1) * (plan.get("topology") or {}).get("gpus_per_node", 1)
        if plan.get("framework") == "fsdp1" and world == 1:
            plan["sharding"] = "one rank (NO_SHARD)"
        key = json.dumps([t["source"].split(" ")[0], t["gpu"], plan, t["model"]], sort_keys=True, default=str)
        groups.setdefault(key, []).append(t)
    spreads = []
    for rows_ in groups.values():
        if len(rows_) < 2:
            continue
        m = [r["measured"] for r in rows_]
        spreads.append(max(m) / min(m) - 1)
        print(f"{rows_[0]['source']:28} spread {spreads[-1]:6.1%}  " + "  ".join(f"{r['name']} {r['error']:+.1%}" for r in rows_))
    if spreads:
        print(f"{len(spreads)} programs timed more than once: spread (fastest to slowest) median {statistics.median(spreads):.1%},"
              f" largest {max(spreads):.1%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--shared", action="store_true", help="also issue 13's rows timed while other runs shared the GPU")
    ap.add_argument("--zero3", action="store_true", help="what each DeepSpeed ZeRO-3 row implies for its overlap")
    ap.add_argument("--twins", action="store_true", help="after the table: the same program timed more than once on one machine")
    a = ap.parse_args(argv)
    if a.zero3:
        zero3_regimes(rows(a.shared))
        return 0
    table = []
    for r in rows(a.shared):
        cal = RESULTS / r["calibration"] if r.get("calibration") else None  # only one made on the row's own machine
        try:
            pred = estimate(r["plan"], r["model"], r["gpu"], calibration=False).time["tokens_per_s"]  # noqa: E501
            pc = estimate(r["plan"], r["model"], r["gpu"], calibration=json.load(open(cal))).time["tokens_per_s"] if cal else None
        except Exception as e:  # a row the estimator cannot read is reported, not skipped silently
            print(f"{r['source']:28} {r['name']:34} cannot estimate: {e}")
            continue
        e0 = pred / r["measured"] - 1
        e1 = pc / r["measured"] - 1 if pc else None
        table.append({**r, "predicted": pred, "predicted_calibrated": pc, "error": e0, "error_calibrated": e1})
        print(f"{r['source']:28} {r['name']:34} {r['measured']:>9.0f} {pred:>9.0f} {e0:>+7.1%}" + (f" {pc:>9.0f} {e1:>+7.1%}" if pc else ""))
    print()
    for src in sorted({t["source"] for t in table}) + ["all"]:
        sel = [t for t in table if src == "all" or t["source"] == src]
        u = [abs(t["error"]) for t in sel]
        c = [abs(t["error_calibrated"]) for t in sel if t["error_calibrated"] is not None]
        line = f"{src:28} n={len(sel):3}  uncalibrated median {statistics.median(u):.1%} max {max(u):.1%}"
        if c:
            line += f"  calibrated median {statistics.median(c):.1%} max {max(c):.1%}"
        print(line)
    if a.twins:
        print()
        twins(table)
    if a.json:
        plain = [{**t, "plan": t["plan"] if isinstance(t["plan"], dict) else t["plan"].model_dump(mode="json"),
                  "gpu": t["gpu"] if isinstance(t["gpu"], str) else t["gpu"].name} for t in table]  # a capped GPU by name
        Path(a.json).write_text(json.dumps(plain, indent=1))  # issue 13's rows carry a Plan
    return 0


if __name__ == "__main__":
    sys.exit(main())
