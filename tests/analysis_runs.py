"""Real CPU runs shared by the analysis tests (test_compare, test_plots, test_report).

Three tiny runs (gpt-tiny, 2 processes, 3 steps, fp32, same seed) launched together once per pytest process:
FSDP2 ZeRO-3, DeepSpeed ZeRO-3 and FSDP1 DDP. About a minute on two cores.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SETUPS = (("fsdp2", "zero3"), ("deepspeed", "zero3"), ("fsdp1", "ddp"))
MODEL, STEPS, NPROC = "gpt-tiny", 3, 2

_cache: dict[str, list] = {}


def real_runs() -> list:
    """The LiveRun objects of the three runs (each has .dir), launched on first call."""
    if "runs" not in _cache:
        import shardlab
        from shardlab.plan import Plan

        out = Path(tempfile.mkdtemp(prefix="shardlab-analysis-runs-"))
        runs = []
        for framework, sharding in SETUPS:  # started together: most of a tiny run is process start-up
            plan = Plan(framework=framework, sharding=sharding, precision="fp32", topology={"nodes": 1, "gpus_per_node": NPROC})
            runs.append(shardlab.launch(plan, model=MODEL, steps=STEPS, nproc=NPROC, device="cpu", out=out, seed=0, timeout_s=300))
        for (framework, sharding), run in zip(SETUPS, runs):
            status = run.wait()
            assert status == "completed", f"{framework} {sharding} run ended {status}: see {run.dir}/status.json"
        _cache["runs"] = runs
    return _cache["runs"]


def label(framework: str, sharding: str) -> str:
    """The label compare() gives a run of this setup (framework, sharding, precision)."""
    return f"{framework} {sharding} fp32"
