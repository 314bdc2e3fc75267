"""Process helpers for the runner tests: what is left of a run, and a CLI run started in the background."""

import subprocess
import sys
import time

import psutil
import pytest

PLAN_TEXT = "framework: fsdp2\nsharding: zero3\ntopology: {gpus_per_node: 2}\n"


def leftovers(run_dir) -> list:
    """Processes whose command line names the run folder (the workers and agents do)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(run_dir) in a for a in (p.info["cmdline"] or ())):
                out.append(p.info)
        except psutil.Error:
            pass
    return out


def start_cli_run(tmp_path, steps: int, wait_s: float = 240):
    """`shardlab run ... --json` in the background; returns (process, run_dir) once the first step is logged."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN_TEXT)
    store = tmp_path / "runs"
    cli = subprocess.Popen([sys.executable, "-m", "shardlab.cli", "run", str(plan), "--model", "gpt-tiny", "--steps", str(steps),
                            "--device", "cpu", "--out", str(store), "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        metrics = list(store.glob("*/metrics.jsonl"))
        if metrics and metrics[0].stat().st_size > 0:
            return cli, metrics[0].parent
        time.sleep(0.2)
    cli.kill()
    pytest.fail("the CLI run never reached its first step")
