"""Your own nn.Module in the served app, in a real browser: the person's model file sits in the folder
the app runs from; typed into the ConfigBuilder's model picker it gets an estimate (with the block
class found in it), typed into the RunLauncher it trains on the CPU under FSDP2."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_browser import app, browser  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser

MY_MODEL = '''
import torch
from torch import nn


class MyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class MyLM(nn.Module):
    def __init__(self, vocab=128, d=32, layers=2):
        super().__init__()
        self.seq_len = 16
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[MyBlock(d) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids)))


def make():
    return MyLM()
'''


def test_my_model_is_estimated_in_the_builder_and_runs_from_the_launcher(browser, app, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    (tmp_path / "mymodel.py").write_text(MY_MODEL)
    url, runs = app
    page = browser
    page.goto(url)
    page.wait_for_selector(".sl-field-framework select", timeout=60_000)
    page.select_option(".sl-field-framework select", "fsdp2")
    page.select_option(".sl-field-precision select", "fp32")

    picker = page.locator(".sl-model input")
    picker.fill("mymodel:make")
    picker.press("Enter")
    expect(page.locator(".sl-model-note")).to_contain_text("MyBlock", timeout=60_000)
    expect(page.locator(".sl-memory-bar")).to_be_visible()

    page.locator(".sl-app-tabs .bk-tab", has_text="Run").first.click()
    model = page.locator(".sl-run-model input")
    model.fill("mymodel:make")
    model.press("Enter")
    steps = page.locator(".sl-run-steps input")
    steps.fill("2")
    steps.press("Enter")
    page.select_option(".sl-run-device select", "cpu")
    page.locator(".sl-run-start button").click()
    end = time.monotonic() + 300
    while time.monotonic() < end:
        status = page.locator(".sl-run-status").inner_text()
        if any(s in status for s in ("completed", "failed", "refused")):
            break
        page.wait_for_timeout(500)
    expect(page.locator(".sl-run-status")).to_contain_text("completed", timeout=30_000)
    run_dirs = [d for d in runs.iterdir() if d.is_dir()]
    assert len(run_dirs) == 1
    status = json.loads((run_dirs[0] / "status.json").read_text())
    assert status["status"] == "completed" and status["model"] == "mymodel:make" and status["wrap_class"] == "MyBlock"
    assert page.console_errors == [], "\n".join(page.console_errors)
