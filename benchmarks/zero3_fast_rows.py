"""FSDP2 ZeRO-3 (no offload) rows run alone: what moves their step-time error (issue 14, session 13, helper fh).

For every such row of benchmarks/results/fidelity_*.json it prints the error of the uncalibrated prediction
(measured step / predicted - 1: positive = predicted fast), the error with that machine's own `calibrate` host
timings (launch_s, fsdp_unit_s of the calibration made on the same lent machine; an analysis device: rates_from
applies the host unit since session 20, the FSDP2 unit never, calibrate.APPLY_MICROBENCH_HOST), and how far the prediction moves if the flash-attention rate were
half what steptime.attention_eff gives (whether the head_dim / long-T flash rate could matter at all for the
row: it cannot where the timeline is host-bound). Nothing here changes the model.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/zero3_fast_rows.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import fidelity  # noqa: E402
import steptime_accuracy as sa  # noqa: E402

from shardlab.estimate import estimate  # noqa: E402
from shardlab.estimate import steptime as stt  # noqa: E402
from shardlab.estimate.steptime import Rates  # noqa: E402
from shardlab.models import resolve_model  # noqa: E402


def main() -> int:
    orig = stt.attention_eff
    unc, cal = [], []
    for f in sorted(sa.RESULTS.glob("fidelity_*.json")):
        own = sa._calibration_of(f)
        c = json.loads((sa.RESULTS / own).read_text())["rates"] if own else None
        for r in json.loads(f.read_text()):
            if r.get("status") != "completed" or r["framework"] != "fsdp2" or r["sharding"] != "zero3" or r.get("offload", "none") != "none":
                continue
            if r.get("concurrent", 1) != 0 or len([x for x in r.get("steps", []) if x.get("step", 0) > 2]) < sa.MIN_TIMED_STEPS:
                continue
            plan, model = fidelity.plan_for(r), fidelity.model_for(r)
            spec = resolve_model(model)
            meas = r["step_time_s"]
            t0 = estimate(plan, model, gpu="h200", rates=Rates()).time["step_time_s"]
            stt.attention_eff = lambda *a, **k: orig(*a, **k) / 2
            stt._GEMM_CACHE.clear()
            try:
                t_attn = estimate(plan, model, gpu="h200", rates=Rates()).time["step_time_s"]
            finally:
                stt.attention_eff = orig
                stt._GEMM_CACHE.clear()
            th = estimate(plan, model, gpu="h200", rates=Rates(launch_s=c["launch_s"], fsdp_unit_s=c["fsdp_unit_s"])).time["step_time_s"] if c else None
            e0 = 100 * (meas / t0 - 1)
            unc.append(e0)
            if th:
                cal.append((e0, 100 * (meas / th - 1)))
            hc = f"{100 * (meas / th - 1):+6.1f}%" if th else "   -   "
            print(f"{f.stem:28s} #{r['id']} {r['model']:10s} L{spec.layers:<2} hd{spec.hidden // spec.heads:<3} T{spec.seq_len:<5} V{spec.vocab:<6} "
                  f"mb{r['micro_batch_size']}x{r['grad_accum_steps']} ac{int(r['activation_checkpointing'])} c{int(bool(r.get('compile')))}  "
                  f"error {e0:+6.1f}%  with the machine's host timings {hc}  flash rate halved: {1e3 * (t_attn - t0):+5.1f} ms")
    print(f"\n{len(unc)} rows: signed median {statistics.median(unc):+.1f}%, median |error| {statistics.median(abs(x) for x in unc):.1f}%")
    if cal:
        a, b = zip(*cal)
        print(f"{len(cal)} rows with their machine's calibration: signed median {statistics.median(a):+.1f}% -> {statistics.median(b):+.1f}%,"
              f" median |error| {statistics.median(abs(x) for x in a):.1f}% -> {statistics.median(abs(x) for x in b):.1f}% with its host timings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
