"""The estimator against what torch measured on a real GPU (benchmarks/results/, issue 8).

The measured figures come from `benchmarks/gpu_validate.py` on a lent H100 (docs/benchmarks.md has
the command, device and versions). Re-estimating each configuration here keeps the estimator honest:
a change that moves a prediction more than 10% away from torch's peak allocated fails this test.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from shardlab.estimate import estimate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("gpu_validate_*.json"))
KEYS = {"device", "world_size", "framework", "sharding", "offload", "activation_checkpointing", "tokens_per_s",
        "tflops", "mfu", "peak_allocated_bytes", "predicted_peak_bytes", "bare_tokens_per_s"}


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_validate", ROOT / "benchmarks" / "gpu_validate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ROWS = [r for f in RESULTS for r in json.loads(f.read_text())]


def test_results_cover_the_issue_matrix_with_the_contract_keys():
    assert RESULTS, "benchmarks/results/gpu_validate_*.json is missing"
    seen = {(r["framework"], r["sharding"], r["offload"], r["activation_checkpointing"]) for r in ROWS}
    for fw, sh, off in _bench().CONFIGS:
        for ac in (False, True):
            assert (fw, sh, off, ac) in seen
    for r in ROWS:
        assert KEYS <= set(r) and r["status"] == "completed"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['framework']}-{r['sharding']}-{r['offload']}-ac{int(r['activation_checkpointing'])}")
def test_predicted_peak_within_10_percent_of_torch(row):
    bench = _bench()
    plan = bench.plan_for(row["framework"], row["sharding"], row["offload"], row["activation_checkpointing"])
    gpu = "h200" if "H200" in row["device"] else "h100-80gb"
    predicted = estimate(plan, row["model"], gpu=gpu).to_dict()["per_gpu"]["peak_allocated"]
    assert predicted == pytest.approx(row["peak_allocated_bytes"], rel=0.10)


def _run_folder(tmp_path, rows: list[dict], instrument) -> "Run":
    from shardlab.run.store import Run

    tmp_path.mkdir()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.json").write_text(json.dumps({"instrument": instrument}))
    return Run(tmp_path)


def test_alternating_run_periods_go_to_the_step_that_started_them(tmp_path):
    """gpu_validate's overhead ratio rests on this split: a period (one step's start to the next) is
    charged to the step that began it, the slowest rank sets it, warm-up steps are left out, and the
    last step has no period."""
    bench = _bench()
    starts = [0.0, 2.0, 3.0, 5.0, 6.0, 8.0, 9.0]  # measured (odd) steps take 2 s, bare ones 1 s
    rows = [{"rank": 0, "step": s + 1, "tokens": 100, "t_start": t, "instrumented": (s + 1) % 2 == 1}
            for s, t in enumerate(starts)]
    # rank 1 starts step 4 late, so its step 3 takes 2.5 s and its step 4 only 0.5 s
    rows += [{**r, "rank": 1, "t_start": r["t_start"] + (0.5 if r["step"] == 4 else 0.0)} for r in rows]
    measured, bare = bench.periods(_run_folder(tmp_path / "alt", rows, "alternate"), warmup=2)
    assert measured == [40.0, 50.0] and bare == [100.0, 100.0]  # steps 3, 5 and 4, 6; step 7 has no period
    lo, hi = bench.ratio_ci([50.0] * 10, [100.0] * 10)
    assert lo == hi == 0.5
    plain = [{k: v for k, v in r.items() if k != "instrumented"} for r in rows]
    only = bench.periods(_run_folder(tmp_path / "bare", plain, False), warmup=0)
    assert only[0] == [] and len(only[1]) == 6
