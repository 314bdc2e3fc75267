"""Your own model, trained for real on the CPU (2 processes) through `shardlab run --model ...`.

A transformers Llama-style model and a GPT-2, both built from configs, under FSDP1, FSDP2 and
DeepSpeed ZeRO-3; a user nn.Module factory through the CLI and through the Python API (`launch` with
the factory function itself). Each run must complete with the block class found in the model and
written into the run's plan, TFLOPS reported, and the sharded model states every rank really holds
(measured from the frameworks' own tensors) within 5% of the estimate. All runs start at once and
train 2 steps of 2-layer, hidden-64 models: the cost is mostly starting Python, torch and transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardlab.estimate import estimate
from shardlab.run.store import load_run

pytestmark = pytest.mark.heavy  # SHARDLAB_HEAVY_TESTS=1 runs it (the 25-minute budget of make test)

LLAMA = "hf:llama hidden_size=64 intermediate_size=128 num_hidden_layers=2 num_attention_heads=4 num_key_value_heads=2 vocab_size=256 seq_len=32"
GPT2 = "hf:gpt2 n_embd=64 n_layer=2 n_head=4 vocab_size=256 n_positions=32 seq_len=32"
FACTORY = "tests.usermodels:tiny_lm"
CLI_RUNS = {
    "llama-fsdp1": (LLAMA, "fsdp1", "LlamaDecoderLayer"),
    "llama-fsdp2": (LLAMA, "fsdp2", "LlamaDecoderLayer"),
    "llama-deepspeed": (LLAMA, "deepspeed", "LlamaDecoderLayer"),
    "gpt2-fsdp1": (GPT2, "fsdp1", "GPT2Block"),
    "gpt2-fsdp2": (GPT2, "fsdp2", "GPT2Block"),
    "gpt2-deepspeed": (GPT2, "deepspeed", "GPT2Block"),
    "factory-fsdp2": (FACTORY, "fsdp2", "MyBlock"),
}
STEPS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of CLI_RUNS (as `python -m shardlab.cli run`) and one through launch(), at once."""
    from shardlab.run.launcher import launch
    from tests.usermodels import tiny_lm

    base = tmp_path_factory.mktemp("usermodel")
    procs = {}
    for name, (model, fw, _) in CLI_RUNS.items():
        plan = base / f"{name}.yaml"
        plan.write_text(f"framework: {fw}\nsharding: zero3\nprecision: bf16\ntopology: {{gpus_per_node: 2}}\n")
        procs[name] = subprocess.Popen([sys.executable, "-m", "shardlab.cli", "run", str(plan), "--model", *model.split(),
                                        "--steps", str(STEPS), "--device", "cpu", "--out", str(base / "runs"), "--json",
                                        "--timeout", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    api = launch({"framework": "deepspeed", "sharding": "zero3", "topology": {"gpus_per_node": 2}}, model=tiny_lm,
                 steps=STEPS, device="cpu", out=base / "runs", timeout_s=600)
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=900)
        done[name] = (p.returncode, json.loads(out.strip().splitlines()[-1]) if out.strip() else {}, err)
    api.wait(timeout=900)
    done["factory-api-deepspeed"] = (0 if api.status == "completed" else 1, {"dir": str(api.dir)}, "")
    return done


def _check(rc, info, err, model, wrap_cls):
    assert rc == 0, err[-3000:]
    run = load_run(info["dir"])
    assert run.status == "completed"
    assert run.plan.wrap.transformer_layer_cls == wrap_cls  # found in the model, written into the run's plan
    m = run.metrics
    assert len(m) == 2 * STEPS and sorted(m["rank"].unique()) == [0, 1]
    assert (m["tflops"] > 0).all()
    est = estimate(run.plan, model).to_dict()["per_gpu"]
    last = m[m["step"] == STEPS]
    for _, row in last.iterrows():
        for part in ("params", "grads", "optimizer"):
            measured, predicted = row[f"state_bytes.{part}"], est[part]
            assert measured == pytest.approx(predicted, rel=0.05), (int(row["rank"]), part, measured, predicted)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", list(CLI_RUNS))
def test_cli_run_trains_with_the_wrap_class_found_tflops_and_states_as_estimated(runs, name):
    model, _, wrap_cls = CLI_RUNS[name]
    rc, info, err = runs[name]
    assert f"wrap unit {wrap_cls}" in err  # shown before the run starts
    _check(rc, info, err, model, wrap_cls)


def test_a_factory_function_through_the_python_api(runs):
    rc, info, err = runs["factory-api-deepspeed"]
    _check(rc, info, err, FACTORY, "MyBlock")
    assert load_run(info["dir"]).info["model"] == FACTORY  # the function travelled as module:function
