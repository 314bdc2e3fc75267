"""Shared test set-up: `gpu` tests run only where CUDA is present; runs go to a temporary store."""

import os
import shutil

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu") if not shutil.which("nvidia-smi") else None


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
