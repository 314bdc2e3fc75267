"""`shardlab estimate` as a person uses it: JSON for tools, a labelled table for people, exit 2 with a
message (no traceback) on bad input."""

import json
import subprocess
import sys

import pytest

from shardlab.cli import main


@pytest.fixture
def plan_file(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("framework: fsdp2\nsharding: zero3\ntopology: {nodes: 2, gpus_per_node: 4}\nmicro_batch_size: 2\n")
    return str(p)


def test_json_holds_the_contract(plan_file, capsys):
    assert main(["estimate", plan_file, "--model", "gpt-1.3b", "--gpu", "a100-80gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["per_gpu"]) >= {"params", "grads", "optimizer", "activations", "buffers", "overhead", "total"}
    assert d["per_gpu"]["total"] > 0 and d["cpu"]["total"] == 0 and d["nvme"] == 0
    assert d["comm_per_step"]["inter_node"] > 0  # zero3 across two nodes
    assert d["comm_payload_per_step"]["all_gather"] > 0
    assert d["gpu"] == "a100-80gb" and d["model"]["name"] == "gpt-1.3b"
    assert 0 < d["mfu"] < 1 and d["tokens_per_s"] > 0 and d["step_time_s"] > 0


def test_bare_count_table_is_labelled_and_flagged(plan_file, capsys):
    assert main(["estimate", plan_file, "--params", "7e9"]) == 0
    out = capsys.readouterr().out
    assert "GiB = 2^30 bytes" in out and "7,000,000,000 params" in out
    assert "bare parameter count" in out and "activations are 0" in out


def test_params_that_is_no_count_is_named_as_params(plan_file, capsys):
    """`--params abc` was refused as --model='abc' (the count went through the model resolver)."""
    assert main(["estimate", plan_file, "--params", "gpt-1.3b"]) == 2
    err = capsys.readouterr().err
    assert "--params='gpt-1.3b' is not a finite number" in err and "--model" not in err


def test_shape_file_as_model(plan_file, tmp_path, capsys):
    shape = tmp_path / "shape.yaml"
    shape.write_text("layers: 4\nhidden: 256\nheads: 4\nvocab: 1000\nseq_len: 128\n")
    assert main(["estimate", plan_file, "--model", str(shape), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["per_gpu"]["activations"] > 0 and d["model"]["bare"] is False


def _run(*args):
    return subprocess.run([sys.executable, "-m", "shardlab.cli", *args], capture_output=True, text=True)


def test_unknown_gpu_exits_2_with_a_suggestion(plan_file):
    r = _run("estimate", plan_file, "--model", "gpt-tiny", "--gpu", "a100-40")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--gpu='a100-40'" in r.stderr and "Did you mean" in r.stderr


def test_a_transformers_config_its_own_validation_refuses_exits_2(plan_file):
    """transformers 5.x checks a config's architecture in huggingface_hub's strict dataclass (not a ValueError):
    a hidden size the heads do not divide is a one-line error naming --model, exit 2, no traceback."""
    r = _run("estimate", plan_file, "--model", "hf:llama", "hidden_size=100", "num_attention_heads=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--model=" in r.stderr and "not a multiple of the number of attention heads" in r.stderr


def test_unknown_model_and_missing_model_exit_2(plan_file):
    r = _run("estimate", plan_file, "--model", "gpt-tinny")
    assert r.returncode == 2 and "Did you mean 'gpt-tiny'" in r.stderr and "Traceback" not in r.stderr
    r = _run("estimate", plan_file)
    assert r.returncode == 2 and "--model" in r.stderr and "Traceback" not in r.stderr
