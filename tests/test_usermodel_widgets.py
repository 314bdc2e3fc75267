"""Your own model in the widgets: the ConfigBuilder's model picker estimates it, the RunLauncher
runs it (the browser test of both is in test_browser.py, one JupyterLab session with the builder)."""

from __future__ import annotations

import pytest

pytest.importorskip("panel")

from shardlab.models import PRESETS  # noqa: E402
from shardlab_widgets.builder import ConfigBuilder  # noqa: E402


def test_builder_estimates_a_factory_and_a_hf_config_typed_into_the_picker():
    b = ConfigBuilder({"framework": "fsdp2", "topology": {"gpus_per_node": 2}}, model="gpt-tiny")
    assert set(PRESETS) <= set(b.memory.model.options)
    b.memory.model.value = "tests.usermodels:tiny_lm"
    est = b.memory.last
    assert est["per_gpu"]["params"] > 0, est
    assert "MyBlock" in b.memory.speed.object and "parameters" in b.memory.speed.object
    b.memory.model.value = "hf:gpt2 n_embd=64 n_layer=2 n_head=4 vocab_size=256 seq_len=32"
    assert b.memory.last["model"]["wrap_class"] == "GPT2Block" and b.memory.last["per_gpu"]["activations"] > 0
    b.memory.model.value = "hf:gpt3000"
    assert "not a model type" in b.memory.bar.object  # bad input shown where the bar was, no exception
