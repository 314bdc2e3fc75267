"""Your own nn.Module in the notebook widgets, in a real browser (JupyterLab in headless Chromium).

The person's model file sits next to the notebook; typed into the ConfigBuilder's model box it gets
an estimate (with the block class found in it), typed into the RunLauncher it trains on the CPU under
FSDP2. (The served app refuses module:function sources from a browser, issue 19: there only presets
and hf: sources are taken, so this runs where the person's own code runs, the notebook kernel.)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.test_browser import browser, jupyterlab, open_and_run_all  # noqa: F401 - browser is a fixture

pytestmark = [pytest.mark.browser, pytest.mark.heavy]

# Lab 08's own model file (labs/_src/08_bring_your_own_model.py writes it), so the lab and this test
# cannot drift apart; a smaller factory is added for a quick CPU run with a declared sequence length.
LAB_08 = Path(__file__).resolve().parents[1] / "labs" / "_src" / "08_bring_your_own_model.py"
MY_MODEL = re.search(r"Path\(.my_model\.py.\)\.write_text\('{3}(.*?)'{3}\)", LAB_08.read_text(), re.S).group(1) + """

def make_small():
    model = MyLM(vocab=128, d=32, layers=2)
    model.seq_len = 16
    return model
"""
SOURCE = "mymodel:make_small"


NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source":
               "import panel as pn\npn.extension(inline=True)\nfrom shardlab_widgets.builder import ConfigBuilder\n"
               "from shardlab_widgets.launcher import RunLauncher\n"
               "builder = ConfigBuilder({'framework': 'fsdp2', 'precision': 'fp32', 'topology': {'gpus_per_node': 2}}, model='gpt-tiny')\n"
               "launcher = RunLauncher(builder, model='gpt-tiny', steps=2, nproc=2, device='cpu', out='runs')\n"
               "pn.Column(builder, launcher)"}],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


@pytest.fixture
def lab(tmp_path):
    files = {"mine.ipynb": json.dumps(NOTEBOOK), "mymodel.py": MY_MODEL}
    with jupyterlab(tmp_path, files, env={"DS_ACCELERATOR": "cpu"}) as (base, root):
        yield f"{base}/tree/mine.ipynb", root


def test_my_model_is_estimated_in_the_builder_and_runs_from_the_launcher(browser, lab):  # noqa: F811
    from playwright.sync_api import expect

    url, root = lab
    page = browser
    open_and_run_all(page, url)
    picker = page.locator(".jp-OutputArea .sl-model input")
    expect(picker).to_be_visible(timeout=240_000)

    picker.fill(SOURCE)
    picker.press("Enter")
    picker.press("Tab")  # leaving the box applies it (measured: Enter alone did not, bokeh 3.9's autocomplete)
    expect(page.locator(".jp-OutputArea .sl-model-note")).to_contain_text("MyBlock", timeout=120_000)

    model = page.locator(".jp-OutputArea .sl-run-model input")
    model.fill(SOURCE)
    model.press("Enter")
    model.press("Tab")
    page.locator(".jp-OutputArea .sl-run-start button").click()
    status = page.locator(".jp-OutputArea .sl-run-status")
    end = time.monotonic() + 400
    while time.monotonic() < end:
        text = status.inner_text()
        if any(s in text for s in ("completed", "failed", "refused")):
            break
        page.wait_for_timeout(1000)
    expect(status).to_contain_text("completed", timeout=30_000)
    run_dirs = [d for d in (root / "runs").iterdir() if d.is_dir()]
    assert len(run_dirs) == 1
    info = json.loads((run_dirs[0] / "status.json").read_text())
    assert info["status"] == "completed" and info["model"] == SOURCE and info["wrap_class"] == "MyBlock"
