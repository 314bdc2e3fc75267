"""Shared test set-up: `gpu` tests run only where CUDA is present; runs go to a temporary store; the shared
real runs (cpu_runs.py, test_usermodel_runs.py) start in the background right after collection, two at a
time, through _prestart.py, from the environment and working folder the suite had at collection (a snapshot
taken here, before any test can change os.environ). SHARDLAB_PRESTART_AT_COLLECTION=0 opts out: each
fixture's runs then start when the fixture asks (from the same snapshot)."""

import os
import shutil

import pytest

from shardlab.export.launch import extensions_dir

os.environ.setdefault("DS_ACCELERATOR", "cpu") if not shutil.which("nvidia-smi") else None
# DeepSpeed's JIT ops in this environment's own folder, as `make test` and shardlab's runs use it, for the
# tests that start DeepSpeed in a plain subprocess too: outside make, they used ~/.cache/torch_extensions,
# where a build lock left by a killed process (seen 2026-12-01) makes torch wait forever.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())

import _prestart  # noqa: E402 - after the two defaults above, which the snapshot must hold

_prestart.snapshot()  # every background run's environment (_prestart.py says why)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # `heavy`: tests that start many real runs or a whole browser session for one feature; they keep
    # `make test` inside its 25-minute budget on 2 cores only when opted in (SHARDLAB_HEAVY_TESTS=1).
    if os.environ.get("SHARDLAB_HEAVY_TESTS") != "1":
        skip_heavy = pytest.mark.skip(reason="heavy: set SHARDLAB_HEAVY_TESTS=1 to run it")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(skip_heavy)
    if any("gpu" in item.keywords for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_collection_finish(session):
    # after -k/-m deselection and the skip marks above: only what will really run is started.
    # On by default again (2026-12-02): the fresh clone at 7288d3a failed 13 tests whose runs the driver thread
    # had started while a foreground test had os.environ changed ("Intel oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so"); every background run now starts from the snapshot above (launch(env=..., cwd=...)).
    if os.environ.get("SHARDLAB_PRESTART_AT_COLLECTION") != "0" and not session.config.option.collectonly:
        # numpy imported here, before the driver thread can import it first: pytest.approx peeks at
        # sys.modules["numpy"] without the import lock, and a foreground test that compared while the driver was
        # half way through importing numpy failed with "partially initialized module 'numpy' has no attribute
        # 'isscalar'" (session 10, test_gpu_results.py run together with test_tune.py)
        import numpy  # noqa: F401

        _prestart.queue_for(session.items)
