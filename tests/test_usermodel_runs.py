"""Your own model, trained for real on the CPU (2 processes) through `shardlab run --model ...`.

A transformers Llama-style model and a GPT-2, both built from configs, under FSDP1, FSDP2 and
DeepSpeed ZeRO-3; a user nn.Module factory through the CLI and through the Python API (`launch` with
the factory function itself). Each run must complete with the block class found in the model and
written into the run's plan, TFLOPS reported, and the sharded model states every rank really holds
(measured from the frameworks' own tensors) within 5% of the estimate.

Cost (the default suite's 25-minute budget on 2 cores): 2-layer, hidden-64 models, 2 steps, two runs at
a time (more only thrash 2 cores), started in the background right after collection (_prestart.py) so they
train while earlier tests leave a core idle, from the suite's collection-time environment (_prestart.ENV:
the forked CLI processes, the forkserver and the new interpreter too), whatever a foreground test does to
os.environ meanwhile. Most of a run is starting Python, torch and transformers, so the six
Hugging Face runs call the CLI's own `main(argv)` in processes forked from one server that imported
shardlab and transformers once (multiprocessing's forkserver): the same parsing, model resolution,
launch and exit code as the `shardlab` command, without six more ~10 s imports. The factory's CLI run is
the real command, `python -m shardlab.cli run ...`, in a new interpreter (test_launcher.py relies on it
for the `--json` line of a whole `shardlab run`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _prestart
import pytest

from shardlab.estimate import estimate
from shardlab.run.store import load_run

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
NEW_INTERPRETER = {"factory-fsdp2"}  # the others: main(argv) forked from the preloaded server
STEPS = 2
PRELOAD = ["shardlab.cli", "shardlab.commands.running", "shardlab.run.launcher", "shardlab.usermodel", "shardlab.estimate",
           "transformers", "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2"]


def _cli_main(argv: list[str], out: str, err: str, env: dict[str, str], cwd: str) -> None:
    """In a forked child: `shardlab ARGV` in `env` and `cwd`, stdout and stderr going to files, exiting with its code."""
    from shardlab.cli import main

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    with open(out, "w") as o, open(err, "w") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Cli:
    """One `shardlab run` started in a forked child or a new interpreter; .result() -> (rc, --json line, stderr)."""

    def __init__(self, argv: list[str], where: Path, forked: bool, ctx):
        self.out, self.err = where / "stdout", where / "stderr"
        if forked:
            self.proc = ctx.Process(target=_cli_main, args=(argv, str(self.out), str(self.err), _prestart.base_env(), _prestart.CWD))
            self.proc.start()
        else:
            with open(self.out, "w") as o, open(self.err, "w") as e:
                self.proc = subprocess.Popen([sys.executable, "-m", "shardlab.cli", *argv], stdout=o, stderr=e,
                                             env=_prestart.base_env(), cwd=_prestart.CWD)

    def done(self) -> bool:
        return (self.proc.exitcode if isinstance(self.proc, multiprocessing.process.BaseProcess) else self.proc.poll()) is not None

    def result(self, timeout: float = 900):
        if isinstance(self.proc, multiprocessing.process.BaseProcess):
            self.proc.join(timeout)
            rc = self.proc.exitcode
        else:
            rc = self.proc.wait(timeout)
        out, err = self.out.read_text(), self.err.read_text()
        return rc, json.loads(out.strip().splitlines()[-1]) if out.strip() else {}, err


_base: list[Path] = []
_forkserver: list = []


def _where() -> Path:
    """The runs' folder (one per pytest process: the runs start before any fixture could give one)."""
    if not _base:
        _base.append(Path(tempfile.mkdtemp(prefix="shardlab-usermodel-runs-")))
    return _base[0]


def _start_forkserver() -> None:
    """The preloaded forkserver, started from the thread that wants the runs (not the background driver's,
    which may start it while a foreground test has os.environ changed: _prestart.py), at low priority."""
    if _forkserver:
        return
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
    _forkserver.append(ctx)
    _prestart.lower([forkserver._forkserver._forkserver_pid])


def _start_cli(name: str) -> _Cli:
    model, fw, _ = CLI_RUNS[name]
    base = _where()
    _start_forkserver()
    plan = base / f"{name}.yaml"
    plan.write_text(f"framework: {fw}\nsharding: zero3\nprecision: bf16\ntopology: {{gpus_per_node: 2}}\n")
    (base / name).mkdir()
    argv = ["run", str(plan), "--model", *model.split(), "--steps", str(STEPS), "--device", "cpu",
            "--out", str(base / "runs"), "--json", "--timeout", "900"]
    return _Cli(argv, base / name, name not in NEW_INTERPRETER, _forkserver[0])


def _start_api():
    from tests.usermodels import tiny_lm

    return _prestart.launch({"framework": "deepspeed", "sharding": "zero3", "topology": {"gpus_per_node": 2}}, model=tiny_lm,
                  steps=STEPS, device="cpu", out=_where() / "runs", timeout_s=900)


API = "factory-api-deepspeed"
JOBS = {name: f"usermodel {name}" for name in (*sorted(CLI_RUNS, key=lambda n: n not in NEW_INTERPRETER), API)}
for _name in CLI_RUNS:
    _prestart.register(JOBS[_name], lambda name=_name: _start_cli(name), lambda cli: cli.done(), lambda cli: [cli.proc.pid],
                       prepare=None if _name in NEW_INTERPRETER else _start_forkserver)
_prestart.register(JOBS[API], _start_api, lambda run: run.done, _prestart.run_pids)


@pytest.fixture(scope="module")
@_prestart.needs(*JOBS.values())
def runs():
    """Every run of CLI_RUNS and the one through launch(), two at a time in the background (_prestart.py)."""
    _prestart.want(JOBS.values(), first=True)
    started = {name: _prestart.get(job) for name, job in JOBS.items()}
    api = started.pop(API)
    done = {name: cli.result() for name, cli in started.items()}
    api.wait(timeout=900)
    done[API] = (0 if api.status == "completed" else 1, {"dir": str(api.dir)}, "")
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
    # `run --json`'s one line: at least id, status and dir (DESIGN.md's contract), and no traceback
    assert info["status"] == "completed" and Path(info["dir"]).name == info["id"] and "Traceback" not in err


def test_a_factory_function_through_the_python_api(runs):
    rc, info, err = runs[API]
    _check(rc, info, err, FACTORY, "MyBlock")
    assert load_run(info["dir"]).info["model"] == FACTORY  # the function travelled as module:function
