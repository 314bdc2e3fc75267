"""The real CPU training runs the suite shares: each setup trains once per pytest process, through `launch()`.

gpt-tiny, seed 0, 3 steps, fp32, 2 ranks (the 2x2 setups: two "nodes" of two processes), started two
at a time (most of a tiny run is process start-up). test_run_matrix checks every setup against the
estimator, test_worker checks what the worker wrote, and the analysis tests (test_compare, test_plots,
test_report, test_store, test_steptime) read three of them (`real_runs`). The fixtures that read them say
so (`@needs(...)`): the runs the selected tests read are started in the background right after collection
(_prestart.py), the analysis three first, so a file run alone starts only the runs it reads.

fp32 and 2 ranks make the expected figures exact (one full copy of the parameters is params x 4 bytes;
ZeRO-3 holds half of it). DeepSpeed keeps every parameter under stage3_param_persistence_threshold
(1e5 elements) gathered, and all of gpt-tiny's are that small, so its ZeRO-3 setups set the threshold
to 0: they then shard parameters the way ZeRO-3 is meant to (the estimator reads the same plan).
The two 2x2 setups train in bf16, so real bf16 runs of FSDP2 and DeepSpeed stay in the suite.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _prestart

MODEL, STEPS, NPROC, SEED = "gpt-tiny", 3, 2, 0
# Runs going at the same time (_prestart.AT_ONCE). All 14 setups on the 2-core machine, 2026-12-01, others'
# load 6-13 (benchmarks/suite_runs.py, docs/benchmarks.md): 5 at once 555 s wall / 610 CPU-s, 2 at once
# 308 s / 368 CPU-s, 1 at once 391 s / 346 CPU-s. More than two runs (4+ ranks) on 2 cores wait on each other.
_TWO = {"nodes": 1, "gpus_per_node": NPROC}
_TWO_BY_TWO = {"nodes": 2, "gpus_per_node": 2}
_DS3 = {"buckets": {"param_persistence_threshold": 0}}


def _plan(framework: str, sharding: str, topology=_TWO, precision: str = "fp32", **more) -> dict:
    return {"framework": framework, "sharding": sharding, "precision": precision, "topology": topology, **more}


SETUPS: dict[str, dict] = {
    "fsdp1-ddp": _plan("fsdp1", "ddp"),
    "fsdp1-zero2": _plan("fsdp1", "zero2"),
    "fsdp1-zero3": _plan("fsdp1", "zero3"),
    "fsdp2-ddp": _plan("fsdp2", "ddp"),
    "fsdp2-zero2": _plan("fsdp2", "zero2"),
    "fsdp2-zero3": _plan("fsdp2", "zero3"),
    "deepspeed-ddp": _plan("deepspeed", "ddp"),
    "deepspeed-zero1": _plan("deepspeed", "zero1"),
    "deepspeed-zero2": _plan("deepspeed", "zero2"),
    "deepspeed-zero3": _plan("deepspeed", "zero3", **_DS3),
    "deepspeed-zero2-offload-optimizer": _plan("deepspeed", "zero2", offload={"optimizer": "cpu"}),
    "deepspeed-zero3-offload-params": _plan("deepspeed", "zero3", offload={"params": "cpu", "optimizer": "cpu"}, **_DS3),
    "fsdp2-hybrid-2x2": _plan("fsdp2", "hybrid", _TWO_BY_TWO, "bf16"),
    "deepspeed-hpz-2x2": _plan("deepspeed", "zero3", _TWO_BY_TWO, "bf16", zeropp={"hpz_partition_size": 2}),
}
# the analysis tests' three runs, in the order their tables list them
ANALYSIS = ("fsdp2-zero3", "deepspeed-zero3", "fsdp1-ddp")

_store: list[Path] = []


def _launch(name: str):
    if not _store:
        _store.append(Path(tempfile.mkdtemp(prefix="shardlab-cpu-runs-")))
    # 900 s without progress: a first CPU-offload run may JIT-build CPU Adam at low priority (_prestart.NICE)
    # while the foreground tests keep both cores busy
    return _prestart.launch(SETUPS[name], model=MODEL, steps=STEPS, device="cpu", out=_store[0], seed=SEED, timeout_s=900)


def job(name: str) -> str:
    """The background job (_prestart.py) that trains this setup."""
    return f"cpu-run {name}"


for _name in SETUPS:
    _prestart.register(job(_name), lambda name=_name: _launch(name), lambda run: run.done, _prestart.run_pids)
# the order the background starts them in when every setup is wanted: the analysis runs first (the
# earliest tests read them), then the optimizer-offload run, whose first start builds CPU Adam
ORDER = tuple(dict.fromkeys((*ANALYSIS, "deepspeed-zero2-offload-optimizer", *SETUPS)))


def needs(*names: str):
    """Under a fixture's `@pytest.fixture`: it reads these setups (all of them by default)."""
    return _prestart.needs(*(job(n) for n in names or ORDER))


def cpu_runs(names=tuple(SETUPS)) -> dict:
    """{name: LiveRun} of these setups, each finished; the ones not yet started go first in the background
    queue (_prestart.py, AT_ONCE at a time). A run that stops making progress is ended by the launcher
    (timeout_s); a launcher that never ends it fails the tests that read it (status running) after 1500 s
    instead of hanging the suite."""
    _prestart.want([job(n) for n in names], first=True)
    runs = {n: _prestart.get(job(n)) for n in names}
    for run in runs.values():
        run.wait(timeout=1500)
    return runs


def real_runs() -> list:
    """The analysis tests' runs (FSDP2 ZeRO-3, DeepSpeed ZeRO-3, FSDP1 DDP), each completed."""
    runs = cpu_runs(ANALYSIS)
    for name, run in runs.items():
        assert run.status == "completed", f"{name} run ended {run.status}: see {run.dir}/status.json"
    return list(runs.values())


def label(framework: str, sharding: str) -> str:
    """The label compare() gives a run of an analysis setup (framework, sharding, precision)."""
    return f"{framework} {sharding} fp32"
