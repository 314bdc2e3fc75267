"""Which part of a calibration moves the step-time predictions toward the measured ones (issue 14).

Every recorded GPU row timed on a machine that was also calibrated (benchmarks/steptime_accuracy.py's rows
with a calibration) is re-predicted with: no calibration, the whole calibration, and each group of its GPU
rates alone (matmul + HBM efficiency, attention efficiency + its sequence-length knee, everything but
attention). Of calibrate's host timings rates_from applies the host unit only (since session 20), which every
variant here keeps, so only the GPU rates differ between them. Prints median and largest |predicted/measured - 1| and the mean signed error.

    .venv/bin/python benchmarks/calibration_parts.py
"""

from __future__ import annotations

import copy
import json
import statistics

import steptime_accuracy as sa

from shardlab.estimate import estimate

PARTS = {"none": None, "all": "all", "mm+hbm only": {"mm_eff", "hbm_eff"}, "attn only": {"attn_eff", "attn_t0"},
         "all but attn": "no-attn"}


def _only(cal: dict, keys) -> dict | bool:
    if keys is None:
        return False
    if keys == "all":
        return cal
    keep = set(cal["rates"]) - {"attn_eff", "attn_t0"} if keys == "no-attn" else keys
    out = copy.deepcopy(cal)
    out["rates"] = {k: v for k, v in cal["rates"].items() if k in keep}
    return out


def main() -> None:
    rows = [r for r in sa.rows() if r.get("calibration")]
    errors = {name: [] for name in PARTS}
    for r in rows:
        cal = json.loads((sa.RESULTS / r["calibration"]).read_text())
        for name, keys in PARTS.items():
            est = estimate(r["plan"], r["model"], gpu=r["gpu"], calibration=_only(cal, keys))
            errors[name].append(est.time["tokens_per_s"] / r["measured"] - 1)
    for name, xs in errors.items():
        a = [abs(x) for x in xs]
        print(f"{name:<13} n={len(a)}  median {statistics.median(a) * 100:4.1f}%  max {max(a) * 100:4.1f}%  "
              f"mean signed {statistics.mean(xs) * 100:+.1f}%")


if __name__ == "__main__":
    main()
