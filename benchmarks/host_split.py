"""Measured against predicted, side by side: the GPU's busy time and the host's, per profiled row (issue 14).

Rows of benchmarks/fidelity.py run with `--profile-step K` carry `profile` (shardlab/run/profile.py: one
step under torch.profiler). For each, the landed estimate (uncalibrated, the GPU table) is split the same
way: its GPU work (compute_s + exposed communication + offload) against the measured gpu_busy_s, its host
seconds (time["detail"]["host_s"]) against host_busy_s less the profiler's own cost, its kernel count
against the launches the profiler saw. A step predicted wrong is then wrong on the GPU side, the host side,
or in how the two overlap (both sides right, the step not). A second table splits the GPU's kernel time by
kind (run/profile.py's gpu_kind_s: matmul, attention, optimizer, other) against the estimate's matmul_s,
attention_s, optimizer_s and memory_bound_s. Rows recorded before gpu_kind_s existed get it from their
top_kernel_s (the 40 longest kernels; record_function ranges, which those rows still held, left out).

    .venv/bin/python benchmarks/host_split.py benchmarks/results/host_split_h200.json [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def split(row: dict) -> dict:
    """The measured and predicted figures of one profiled row."""
    import fidelity

    from shardlab.estimate import estimate

    e = estimate(fidelity.plan_for(row), fidelity.model_for(row), "h200", calibration=False)
    t, p = e.time, row["profile"]
    micro = e.plan.grad_accum_steps
    overhead = p["step_s"] - row["step_time_s"]  # the profiled step less the run's median unprofiled one
    return {"id": row["id"], "name": f"{row['model']} {row['framework']} {row['sharding']} {row['precision']} mb{row['micro_batch_size']}x{micro}",
            "step": row["step_time_s"], "pred_step": t["step_time_s"],
            "gpu": p.get("gpu_busy_s"), "pred_gpu": t["compute_s"] + t["exposed_comm_s"] + t["offload_s"],
            "host": p["host_busy_s"] - max(0.0, overhead), "host_raw": p["host_busy_s"], "pred_host": t["detail"]["host_s"],
            "wait": p["host_wait_s"], "launches": p.get("launches"), "pred_kernels": t["detail"]["kernels_per_micro_step"] * micro}


KIND_TERMS = {"matmul": "matmul_s", "attention": "attention_s", "optimizer": "optimizer_s", "other": "memory_bound_s"}


def kinds(row: dict) -> dict | None:
    """Measured GPU seconds by kind, and the estimate's, of one profiled row (None without kernel times)."""
    import fidelity

    from shardlab.estimate import estimate
    from shardlab.run.profile import kernel_kind

    p = row["profile"]
    got = p.get("gpu_kind_s")
    if not got and p.get("top_kernel_s"):
        got = dict.fromkeys(KIND_TERMS, 0.0)
        for name, sec in p["top_kernel_s"].items():
            if "#" not in name and not name.startswith(("FSDP::", "ProfilerStep")):  # ranges, not kernels
                got[kernel_kind(name)] += sec
    if not got:
        return None
    d = estimate(fidelity.plan_for(row), fidelity.model_for(row), "h200", calibration=False).time["detail"]
    return {kind: (got.get(kind, 0.0), d[term]) for kind, term in KIND_TERMS.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    a = ap.parse_args(argv)
    print(f"{'row':44} {'step ms':>15} {'GPU busy ms':>15} {'host ms (raw)':>22} {'launches':>13}")
    print(f"{'':44} {'meas':>7} {'pred':>7} {'meas':>7} {'pred':>7} {'meas':>7} {'':>6} {'pred':>7} {'meas':>6} {'pred':>6}")
    for f in a.results:
        for r in json.load(open(f)):
            if r.get("status") != "completed" or not r.get("profile") or "step_s" not in r["profile"]:
                continue
            s = split(r)
            ms = lambda v: f"{1e3 * v:7.1f}" if v is not None else "      -"  # noqa: E731
            print(f"#{s['id']} {s['name'][:40]:40} {ms(s['step'])} {ms(s['pred_step'])} {ms(s['gpu'])} {ms(s['pred_gpu'])} "
                  f"{ms(s['host'])} ({1e3 * s['host_raw']:4.0f}) {ms(s['pred_host'])} {int(s['launches'] or 0):6d} {int(s['pred_kernels']):6d}")
    print(f"\nGPU kernel time by kind, ms measured / predicted\n{'row':6}" + "".join(f"{k:>18}" for k in KIND_TERMS))
    for f in a.results:
        for r in json.load(open(f)):
            k = kinds(r) if r.get("status") == "completed" and r.get("profile") else None
            if k:
                print(f"#{r['id']:<5}" + "".join(f"{1e3 * m:9.1f} /{1e3 * p:6.1f}" for m, p in k.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
