"""Run what you export: the runner and the exported FSDP script build the same thing.

For a matrix of plans covering every sharding, precision, wrap policy (size-based included),
compile on and off, prefetch, offload, optimizer and clipping, the runner's objects
(`shardlab.run.wrap.wrap`) and the objects the exported script builds (`shardlab export --to
fsdp-code`, executed here as a module: its `shard_model`, `make_optimizer`, `make_scaler`,
`train_step`) are fingerprinted from torch's own FSDP objects (tests/fingerprints.py) and must be
equal. Clipping is observed, not read: one real step runs on each side with torch's clip functions
recording what they were called with. Everything runs in this process on a fake process group of 4
ranks (2 per "node"), so FSDP1 keeps its sharding strategy (it turns into NO_SHARD at world size 1)
and no collective costs anything. Size-based units are judged by torch's own size policy.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
from fingerprints import fingerprint

from shardlab.export import export
from shardlab.models import resolve_model
from shardlab.plan import PlanError, load_plan
from shardlab.run.gpt import build_model, loss_fn
from shardlab.run.wrap import wrap

SPEC = resolve_model({"layers": 2, "hidden": 32, "heads": 2, "vocab": 64, "seq_len": 8})
WORLD, PER_NODE = 4, 2
CPU = torch.device("cpu")

# Each dimension's every value appears at least once per framework.
COMMON = [
    {"sharding": "zero3", "precision": "bf16", "gradient_clipping": 1.0},
    {"sharding": "zero2", "precision": "fp32", "wrap": {"policy": "size", "min_num_params": 2000}, "optimizer": {"name": "sgd", "lr": 0.01, "weight_decay": 0.1}},
    {"sharding": "ddp", "precision": "fp16", "wrap": {"policy": "none"}, "optimizer": {"name": "adam"}, "gradient_clipping": 0.5},
    {"sharding": "hybrid", "precision": "bf16", "reduce_dtype": "fp32", "activation_checkpointing": True, "forward_prefetch": True},
    {"sharding": "zero3", "precision": "fp32", "wrap": {"policy": "size", "min_num_params": 500}, "forward_prefetch": True, "gradient_clipping": 2.0},
    {"sharding": "zero3", "compile": True},
    {"sharding": "zero2", "compile": True, "wrap": {"policy": "none"}},
]
FSDP1_ONLY = [
    {"backward_prefetch": "backward_post", "limit_all_gathers": False, "buffer_dtype": "fp32"},
    {"backward_prefetch": "none", "precision": "fp16", "loss_scaling": "none", "sync_module_states": False},
]
FSDP2_ONLY = [
    {"sharding": "hybrid", "offload": {"params": "cpu", "optimizer": "cpu"}, "gradient_clipping": 1.0},
    {"sharding": "zero3", "precision": "fp16", "offload": {"params": "cpu", "optimizer": "cpu"}, "wrap": {"policy": "size", "min_num_params": 2000}},
]
MATRIX = [("fsdp1", p) for p in COMMON + FSDP1_ONLY] + [("fsdp2", p) for p in COMMON + FSDP2_ONLY]


@pytest.fixture(scope="module")
def fake_group():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    before = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(PER_NODE)
    dist.init_process_group("fake", rank=0, world_size=WORLD, store=FakeStore())
    yield
    dist.destroy_process_group()
    if before is None:
        os.environ.pop("LOCAL_WORLD_SIZE")
    else:
        os.environ["LOCAL_WORLD_SIZE"] = before


@pytest.fixture
def clips(monkeypatch):
    """Records every gradient clipping call torch sees: (which function, max_norm)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    seen: list[tuple[str, float]] = []
    fsdp1, plain = FSDP.clip_grad_norm_, torch.nn.utils.clip_grad_norm_

    def fsdp1_clip(self, max_norm, *a, **k):
        seen.append(("FullyShardedDataParallel.clip_grad_norm_", float(max_norm)))
        return fsdp1(self, max_norm, *a, **k)

    def plain_clip(parameters, max_norm, *a, **k):
        seen.append(("torch.nn.utils.clip_grad_norm_", float(max_norm)))
        return plain(parameters, max_norm, *a, **k)

    monkeypatch.setattr(FSDP, "clip_grad_norm_", fsdp1_clip)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", plain_clip)
    return seen


def _batch() -> torch.Tensor:
    return torch.randint(0, SPEC.vocab, (1, SPEC.seq_len + 1), generator=torch.Generator().manual_seed(0))


def load_script(text: str) -> types.ModuleType:
    """The exported script as a module (its main() is not run)."""
    import sys

    mod = types.ModuleType("exported_train")
    sys.modules[mod.__name__] = mod  # its dataclasses look their module up
    try:
        exec(compile(text, "train_fsdp.py", "exec"), mod.__dict__)
    finally:
        del sys.modules[mod.__name__]
    return mod


def runner_side(plan, clips) -> dict:
    t = wrap(plan, build_model(SPEC, seed=0), "cpu", loss_fn)
    if not plan.compile:  # a compiled step costs a compilation: compile plans are compared as built
        b = _batch()
        t.backward(t.forward(b[:, :-1], b[:, 1:]), 1)
        t.step()
    return {**fingerprint(plan.framework, t.module, t.optimizer, t.scaler), "clip": list(clips)}


def export_side(plan, clips) -> dict:
    script = load_script(export(plan, "fsdp-code"))
    model = script.shard_model(build_model(SPEC, seed=0), CPU)
    opt, scaler = script.make_optimizer(model), script.make_scaler(CPU)
    if not plan.compile:
        script.train_step(model, opt, scaler, [_batch()])
    return {**fingerprint(plan.framework, model, opt, scaler), "clip": list(clips)}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("framework,extra", MATRIX, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MATRIX)])
def test_runner_builds_what_the_exported_script_builds(fake_group, clips, framework, extra):
    plan = load_plan({"framework": framework, **extra})
    ran = runner_side(plan, clips)
    clips.clear()
    exported = export_side(plan, clips)
    assert ran == exported
    assert ran["units"], "nothing was wrapped"
    if plan.gradient_clipping and not plan.compile:
        assert ran["clip"] and all(n == plan.gradient_clipping for _, n in ran["clip"])


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("framework,change", [("fsdp1", ("USE_ORIG_PARAMS = True", "USE_ORIG_PARAMS = False")),
                                              ("fsdp2", ("RESHARD_AFTER_FORWARD = True", "RESHARD_AFTER_FORWARD = False")),
                                              ("fsdp2", ('"weight_decay": 0.0}', '"weight_decay": 0.01}'))])
def test_the_fingerprint_sees_a_script_that_differs(fake_group, clips, framework, change):
    """Negative control: one constant of the exported script changed by hand is caught."""
    plan = load_plan({"framework": framework, "compile": True})  # compiled: compared as built, no step
    text = export(plan, "fsdp-code")
    assert change[0] in text
    script = load_script(text.replace(change[0], change[1]))
    model = script.shard_model(build_model(SPEC, seed=0), CPU)
    assert runner_side(plan, clips) != {**fingerprint(framework, model, script.make_optimizer(model), script.make_scaler(CPU)), "clip": []}


# ---------------------------------------------------------------------------------------------
# Size-based units: one algorithm, judged by torch's own size policy


def torch_size_units(model, min_num_params: int) -> list[str]:
    """The modules FSDP1's size_based_auto_wrap_policy wraps (torch's _recursive_wrap, recording only)."""
    import functools

    from torch.distributed.fsdp.wrap import _recursive_wrap, size_based_auto_wrap_policy

    got = []

    def record(module, **_):
        got.append(module)
        return module

    _recursive_wrap(model, functools.partial(size_based_auto_wrap_policy, min_num_params=min_num_params),
                    wrapper_cls=record, ignored_modules=set(), ignored_params=set(), only_wrap_children=True)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in got]


def _issue_tree():
    """A 150M-parameter child inside a parent that is itself a unit (its other 120M reach 100M)."""
    from torch import nn

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(12248, 12248, bias=False)  # 150.0M
            self.small = nn.ModuleList(nn.Linear(5477, 5477, bias=False) for _ in range(4))  # 4 x 30.0M

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(1000, 1000)
            self.parent = Parent()
            self.head = nn.Linear(1000, 1000)

    with torch.device("meta"):
        return Model()


def test_the_issue_tree_wraps_the_same_units_everywhere():
    """Runner (FSDP2), exported script, the estimate's algorithm: the units torch's policy picks."""
    from shardlab.frameworks import fsdp2
    from shardlab.frameworks.units import module_tree, size_units

    model = _issue_tree()
    judge = torch_size_units(model, 100_000_000)
    assert judge == ["parent.big", "parent"]
    assert [p for p, _ in size_units(module_tree(model), 100_000_000)] == judge
    plan = load_plan({"framework": "fsdp2", "wrap": {"policy": "size", "min_num_params": 100_000_000}})
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in fsdp2.unit_modules(fsdp2.settings(plan), model)] == judge
    script = load_script(export(plan, "fsdp-code"))
    assert [names[id(m)] for m in script.wrap_units(model)] == judge


@pytest.mark.parametrize("preset", ["gpt-tiny", "gpt-125m", "llama-7b"])
def test_estimate_wrap_units_are_torchs_size_units(preset):
    """models.wrap_units (the estimate, no torch) picks what torch's policy picks on the real GPT."""
    from shardlab.models import PRESETS, wrap_units

    spec = PRESETS[preset]
    model = build_model(spec, device="meta")
    for threshold in (1000, spec.block_params // 3, spec.block_params, spec.block_params + 1, 10**8):
        ours = wrap_units(spec, "size", threshold)
        assert [n for n, _ in ours[1:]] == torch_size_units(model, threshold), threshold
        assert sum(n for _, n in ours) == spec.params


# ---------------------------------------------------------------------------------------------
# DeepSpeed: the engine the runner builds and the engine built from the exported file resolve the
# same config (one subprocess, gloo world of 1: DeepSpeed keeps its own process-group state)

DS_MATRIX = [
    {"sharding": "ddp", "precision": "fp32", "gradient_clipping": 1.0},
    {"sharding": "zero1", "precision": "bf16", "optimizer": {"name": "adam", "lr": 0.002}},
    {"sharding": "zero2", "precision": "bf16", "optimizer": {"name": "sgd", "weight_decay": 0.1}, "offload": {"optimizer": "cpu"}},
    {"sharding": "zero3", "precision": "fp32", "optimizer": {"name": "sgd"}, "offload": {"optimizer": "cpu", "params": "cpu"}, "gradient_clipping": 0.5},
    {"sharding": "hybrid", "precision": "bf16", "reduce_dtype": "fp32", "grad_accum_steps": 2, "micro_batch_size": 2},
    {"sharding": "zero3", "precision": "bf16", "compile": True, "activation_checkpointing": True},
]

_DS_SCRIPT = '''
import json, os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
import deepspeed, torch.distributed as dist
from shardlab.export import export
from shardlab.frameworks.deepspeed import runtime_config
from shardlab.models import resolve_model
from shardlab.plan import load_plan
from shardlab.run.gpt import build_model, loss_fn
from shardlab.run.wrap import wrap

dist.init_process_group("gloo")
spec = resolve_model({"layers": 2, "hidden": 32, "heads": 2, "vocab": 64, "seq_len": 8})

def fingerprint(engine):
    c, z = engine._config, engine._config.zero_config
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k in ("lr", "weight_decay", "betas", "eps", "momentum")}
              for g in opt.param_groups]
    return {"stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(), "fp16": engine.fp16_enabled(),
            "clip": engine.gradient_clipping(), "micro": engine.train_micro_batch_size_per_gpu(),
            "accum": engine.gradient_accumulation_steps(), "comm_dtype": str(engine.communication_data_type),
            "offload_optimizer": str(z.offload_optimizer.device) if z.offload_optimizer else None,
            "offload_param": str(z.offload_param.device) if z.offload_param else None,
            "hpz": z.zero_hpz_partition_size, "optimizer": type(opt).__name__, "groups": groups,
            "compiled": bool(getattr(engine, "is_compiled", False))}

for extra in json.loads(sys.argv[2]):
    plan = load_plan({"framework": "deepspeed", **extra})
    ran = wrap(plan, build_model(spec, seed=0), "cpu", loss_fn).engine
    cfg = runtime_config(json.loads(export(plan, "deepspeed")), plan, "cpu")
    model = build_model(spec, seed=0)  # the exported file's engine over its own model's parameters, as a script does
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=list(model.parameters()))
    if plan.compile:
        engine.compile()
    print("FP " + json.dumps([fingerprint(ran), fingerprint(engine)]), flush=True)

# the negative control: the first plan's exported file with one value edited must fingerprint differently
plan = load_plan({"framework": "deepspeed", **json.loads(sys.argv[2])[0]})
cfg = {**runtime_config(json.loads(export(plan, "deepspeed")), plan, "cpu"), "gradient_clipping": 0.25}
model = build_model(spec, seed=0)
engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=list(model.parameters()))
print("NEG " + json.dumps(fingerprint(engine)), flush=True)
'''


@pytest.mark.slow  # ~26 s on the 2-core machine at load 5-8 (2026-12-01), once DeepSpeed's shm comm op is built
def test_deepspeed_engine_from_the_runner_equals_the_engine_from_the_exported_file():
    """It was skipped as 'past 600 s': that was DeepSpeed's first JIT build of its shm comm op (385 s under
    load), waited on here while the suite's other DeepSpeed runs built it; and, once built, it failed at
    once: the exported side handed deepspeed.initialize another model's parameters (KeyError in ZeRO-1's
    param_names). The build is shared with every DeepSpeed CPU run (`shardlab doctor` makes it ahead)."""
    import json
    import subprocess
    import sys

    from shardlab.export.launch import extensions_dir
    from shardlab.run.host import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": extensions_dir()}  # as the worker's runs do (conftest sets it too)
    r = subprocess.run([sys.executable, "-c", _DS_SCRIPT, str(free_port()), json.dumps(DS_MATRIX)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    pairs = [json.loads(line[3:]) for line in r.stdout.splitlines() if line.startswith("FP ")]
    assert len(pairs) == len(DS_MATRIX)
    edited = [json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("NEG ")]
    assert len(edited) == 1 and edited[0] != pairs[0][1] and edited[0]["clip"] == 0.25  # the fingerprint sees an edit
    for extra, (ran, exported) in zip(DS_MATRIX, pairs):
        plan = load_plan({"framework": "deepspeed", **extra})
        assert ran == exported, extra
        # and DeepSpeed read the plan's meaning (its own defaults would clip at 1.0, run stage 0, fp32)
        assert ran["stage"] == {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "hybrid": 3}[plan.sharding]
        assert (ran["bf16"], ran["clip"]) == (plan.precision == "bf16", plan.gradient_clipping or 0.0)
        assert (ran["micro"], ran["accum"]) == (plan.micro_batch_size, plan.grad_accum_steps)
        assert ran["groups"][0]["lr"] == plan.optimizer.lr and ran["groups"][0]["weight_decay"] == plan.optimizer.weight_decay
        assert ran["compiled"] == plan.compile


# ---------------------------------------------------------------------------------------------
# launch() refuses, before starting anything, what the worker would refuse

REFUSED_ON_CPU = [
    ({"framework": "deepspeed", "precision": "fp16"}, "precision"),  # host.check_run used to let this through
    ({"framework": "fsdp2", "wrap": {"transformer_layer_cls": "LlamaDecoderLayer"}}, "wrap.transformer_layer_cls"),  # so did launch
    ({"framework": "deepspeed", "activation_checkpointing": True, "wrap": {"transformer_layer_cls": "GPT2Block"}}, "wrap.transformer_layer_cls"),
    ({"framework": "fsdp1", "offload": {"params": "cpu", "optimizer": "cpu"}}, "offload.params"),
    ({"framework": "fsdp1", "low_memory_init": True}, "low_memory_init"),
    ({"framework": "deepspeed", "zeropp": {"quantized_gradients": True}}, "zeropp.quantized_gradients"),
    ({"framework": "deepspeed", "offload": {"optimizer": "nvme", "nvme_path": "/nvme"}}, "offload"),
]


@pytest.mark.parametrize("plan,field", REFUSED_ON_CPU)
def test_launch_refuses_before_any_process_what_the_worker_refuses(tmp_path, plan, field):
    from shardlab.run.launcher import launch

    plan = load_plan({**plan, "topology": {"gpus_per_node": 2}})
    with pytest.raises(PlanError) as worker:  # the worker's own call, on the model it would build
        wrap(plan, build_model(SPEC, seed=0), "cpu", loss_fn)
    with pytest.raises(PlanError) as launched:
        launch(plan, model="gpt-tiny", steps=1, device="cpu", out=tmp_path)
    assert launched.value.findings[0].field == worker.value.findings[0].field == field
    assert not any(tmp_path.iterdir())  # no run folder, so no process was started


def test_a_stale_deepspeed_build_lock_is_cleared_and_a_live_one_kept(tmp_path):
    """A JIT build stopped midway leaves torch's lock file; the next DeepSpeed run would wait on it until its
    timeout. load_ops clears it when it is old and no process works in the build folder, and never when a
    build (a process whose working directory is that folder) is running or the lock is young."""
    import os
    import subprocess
    import sys
    import time

    from shardlab.frameworks.deepspeed import STALE_LOCK_S, clear_stale_build_lock

    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock = build / "lock"
    lock.touch()
    assert not clear_stale_build_lock(build) and lock.exists()  # young: a build may be starting
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=build)
    try:
        time.sleep(0.3)
        assert not clear_stale_build_lock(build) and lock.exists()  # a process builds there
    finally:
        busy.kill()
        busy.wait()
    assert clear_stale_build_lock(build) and not lock.exists()
    assert not clear_stale_build_lock(build)  # nothing to clear
