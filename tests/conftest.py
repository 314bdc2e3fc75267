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
    if any("gpu" in item.keywords for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
