"""The training worker: the model matches the spec, data is deterministic, real sharded CPU runs train
and report what each rank holds and sends.

The sharded runs are the suite's shared CPU runs (cpu_runs.py: gpt-tiny, 2 processes with gloo, 3 steps,
fp32, started by launch(), which runs `python -m shardlab.run.worker RUN_DIR` through torchrun); the
tests here read the files the worker wrote. What only a run of its own can show (no or alternating
instrumentation, a user factory, out of memory, a plan the worker itself refuses, low_memory_init)
starts the worker directly, with the command the launcher uses (launch_command + sanitized_env).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import _prestart
import pytest
import torch
from cpu_runs import SETUPS, STEPS, cpu_runs, needs

from shardlab.export.launch import launch_command, sanitized_env
from shardlab.models import PRESETS, resolve_model
from shardlab.plan import load_plan
from shardlab.run.data import Batches, global_batch
from shardlab.run.gpt import Block, build_model, loss_fn
from shardlab.run.host import free_port
from shardlab.run.store import read_jsonl

TINY_BYTES = PRESETS["gpt-tiny"].params * 4  # fp32 model bytes


# ---------------------------------------------------------------------------------------------
# Model and data


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small", "gpt-125m", "gpt-1.3b", "gpt-13b", "llama-7b", "llama-8b", "llama-70b"])
def test_model_parameter_count_equals_spec(name):
    spec = PRESETS[name]
    model = build_model(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == spec.params
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == spec.layers
    assert sum(p.numel() for p in blocks[0].parameters()) == spec.block_params


def test_custom_shape_with_gqa_and_ffn_counts_exactly():
    spec = resolve_model({"layers": 3, "hidden": 96, "heads": 6, "kv_heads": 2, "ffn_hidden": 200,
                          "vocab": 300, "seq_len": 32, "family": "llama"})
    assert sum(p.numel() for p in build_model(spec, device="meta").parameters()) == spec.params


def test_plan_default_wrap_class_is_the_block():
    """The default plan's wrap.transformer_layer_cls finds the GPT's Block, and only it."""
    from shardlab.run.wrap import block_class

    model = build_model(PRESETS["gpt-tiny"], device="meta")
    assert block_class(model, load_plan({}).wrap.transformer_layer_cls) is Block


def test_same_seed_same_weights_other_seed_other_weights():
    spec = PRESETS["gpt-tiny"]
    a, b, c = build_model(spec, seed=1), build_model(spec, seed=1), build_model(spec, seed=2)
    for (n, pa), pb, _pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_attention_is_causal(family):
    spec = resolve_model({"layers": 2, "hidden": 32, "heads": 4, "vocab": 50, "seq_len": 16, "family": family})
    model = build_model(spec, seed=0).eval()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    with torch.no_grad():
        lx, ly = model(x), model(y)
    assert torch.allclose(lx[0, :10], ly[0, :10], atol=1e-5)  # earlier positions never see later tokens
    assert not torch.allclose(lx[0, 10:], ly[0, 10:])


def test_batches_are_a_pure_function_of_seed_and_step():
    assert torch.equal(global_batch(7, 3, 4, 16, 100), global_batch(7, 3, 4, 16, 100))
    assert not torch.equal(global_batch(7, 3, 4, 16, 100), global_batch(7, 4, 4, 16, 100))
    assert not torch.equal(global_batch(7, 3, 4, 16, 100), global_batch(8, 3, 4, 16, 100))
    x, y = Batches(seed=0, rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=1, seq_len=16, vocab=100)(1)
    assert x.shape == y.shape == (2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_rank_layouts_see_the_same_global_batch():
    """2 ranks x 1 micro-batch and 1 rank x 2 micro-batches cover the same sequences in one step."""
    kw = dict(seed=5, micro_batch_size=3, seq_len=8, vocab=64)
    two = [Batches(rank=r, world_size=2, grad_accum_steps=1, **kw)(4, 0)[0] for r in range(2)]
    one = [Batches(rank=0, world_size=1, grad_accum_steps=2, **kw)(4, m)[0] for m in range(2)]
    assert torch.equal(torch.cat(two), torch.cat(one))
    assert not torch.equal(two[0], two[1])


def test_synthetic_data_is_learnable():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    try:
        _train_tiny_and_check_loss_falls()
    finally:
        torch.set_num_threads(threads)


def _train_tiny_and_check_loss_falls():
    spec = PRESETS["gpt-tiny"]
    model = build_model(spec, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = Batches(seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum_steps=1, seq_len=spec.seq_len, vocab=spec.vocab)
    losses = []
    for step in range(1, 31):
        x, y = batches(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(spec.vocab) - 0.5
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


# ---------------------------------------------------------------------------------------------
# Communication counting (one process, gloo)


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")  # DeepSpeed still calls the old names
def test_comm_counter_counts_each_collective_once_by_family(one_rank_group):
    from shardlab.run.measure import CommCounter

    dist = one_rank_group
    c = CommCounter().install()
    try:
        t = torch.ones(1000)  # 4000 bytes
        out = torch.empty(1000)
        dist.all_gather_into_tensor(out, t)        # torch routes this through all_gather_single
        dist.reduce_scatter_tensor(out, t)
        dist.all_reduce(t)
        dist.broadcast(t, src=0)
        dist.all_gather([torch.empty(1000)], t)
        with c.pause():
            dist.all_reduce(t)                     # the worker's own traffic is not counted
        nbytes, count = c.snapshot()
    finally:
        c.uninstall()
    assert count == {"all_gather": 2, "reduce_scatter": 1, "all_reduce": 1, "broadcast": 1}
    assert nbytes == {"all_gather": 8000, "reduce_scatter": 4000, "all_reduce": 4000, "broadcast": 4000}
    assert not getattr(dist.all_reduce, "_shardlab_wrapped", False)


# ---------------------------------------------------------------------------------------------
# Real 2-process CPU runs


def _spawn(run_dir: Path, plan, *, nproc: int = 2, steps: int = STEPS, instrument: bool | str = True,
           factory: str | None = None, extra_path: str | None = None, profile_step: int | None = None) -> subprocess.Popen:
    """torchrun running the worker on `run_dir`, as the launcher starts it; its output goes to files there
    (a pipe nobody reads while other starts are waited for could fill and stall it). Started in the background,
    from the suite's collection-time environment and folder (_prestart.py says why)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = load_plan(plan)
    (run_dir / "plan.yaml").write_text(plan.to_yaml())
    (run_dir / "run.json").write_text(json.dumps({"model": "gpt-tiny", "steps": steps, "device": "cpu", "seed": 0,
                                                  "factory": factory, "trace_memory": False, "instrument": instrument,
                                                  "profile_step": profile_step}))
    argv, env = launch_command(plan, ["-m", "shardlab.run.worker", str(run_dir)], nproc_per_node=nproc,
                               torchrun=[sys.executable, "-m", "torch.distributed.run"], master_port=free_port())
    extra = {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if extra_path:
        extra["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, _prestart.base_env().get("PYTHONPATH")) if p)
    with open(run_dir / "torchrun.out", "w") as out, open(run_dir / "torchrun.err", "w") as err:
        return subprocess.Popen(argv, env=sanitized_env(extra, base=_prestart.base_env()), cwd=_prestart.CWD,
                                stdout=out, stderr=err, text=True)


def _finish(run_dir: Path, proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=420)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, (run_dir / "torchrun.out").read_text(),
                                       (run_dir / "torchrun.err").read_text())


# The runs only a start of their own can show: no or alternating instrumentation, low_memory_init, a user
# factory (one that trains, one that runs out of memory) and a plan the worker itself must refuse (launch()
# refuses it before starting anything). `user`: the run imports userfactory.py from the runs' folder.
DIRECT = {
    "bare": dict(plan=SETUPS["fsdp2-zero3"], steps=2, instrument=False),
    "alternate": dict(plan=SETUPS["deepspeed-zero2"], steps=4, instrument="alternate", profile_step=2),
    "lowmem": dict(plan={**SETUPS["fsdp2-zero3"], "low_memory_init": True}, steps=2),
    "factory": dict(plan=SETUPS["fsdp2-zero3"], steps=2, factory="userfactory:good", user=True),
    "oom": dict(plan=SETUPS["fsdp2-zero3"], steps=2, factory="userfactory:oom", user=True),
    "fp16": dict(plan={**SETUPS["deepspeed-zero2"], "precision": "fp16"}, steps=1),
}
_direct_root: list[Path] = []


def _direct_dir() -> Path:
    """The direct runs' folder, with the user factory module (one per pytest process: the runs start in the
    background right after collection, before any fixture could give a folder)."""
    if not _direct_root:
        root = Path(tempfile.mkdtemp(prefix="shardlab-worker-direct-"))
        (root / "userfactory.py").write_text(_FACTORY)
        _direct_root.append(root)
    return _direct_root[0]


def _start_direct(name: str) -> subprocess.Popen:
    root, kw = _direct_dir(), dict(DIRECT[name])
    if kw.pop("user", False):
        kw["extra_path"] = str(root)
    return _spawn(root / name, **kw)


DIRECT_JOBS = {name: f"worker-direct {name}" for name in DIRECT}
for _name in DIRECT:
    _prestart.register(DIRECT_JOBS[_name], lambda name=_name: _start_direct(name), lambda proc: proc.poll() is not None)


@pytest.fixture(scope="module")
@_prestart.needs(*DIRECT_JOBS.values())
def direct():
    """name -> (completed torchrun, run folder) of each DIRECT run, started two at a time in the background
    (_prestart.py; 2 runs, 4 ranks, fill 2 cores: cpu_runs.py says why)."""
    _prestart.want(DIRECT_JOBS.values(), first=True)
    started = {name: _prestart.get(job) for name, job in DIRECT_JOBS.items()}
    return {name: (_finish(_direct_dir() / name, proc), _direct_dir() / name) for name, proc in started.items()}


# The 2-rank fp32 setups of the shared runs (cpu_runs.py); their DeepSpeed ZeRO-3 runs set
# stage3_param_persistence_threshold to 0, or gpt-tiny's parameters (all under 1e5 elements) would stay whole.
CONFIGS = [n for n, p in SETUPS.items() if p["topology"] == {"nodes": 1, "gpus_per_node": 2} and p["precision"] == "fp32"]


@pytest.fixture(scope="module")
@needs(*CONFIGS)
def run():
    """run(name) -> (LiveRun, metrics lines, event lines) as the worker wrote them; each setup runs once."""
    runs = cpu_runs(CONFIGS)

    def lines(name: str):
        r = runs[name]
        return r, read_jsonl(r.files.metrics), read_jsonl(r.files.events)
    return lines


def _by_rank_step(metrics: list[dict]) -> dict[tuple[int, int], dict]:
    return {(m["rank"], m["step"]): m for m in metrics}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_sharded_run_trains_and_reports(run, name):
    live, metrics, events = run(name)
    assert live.status == "completed", (live.info.get("error"), live.log(0)[-3000:])
    rows = _by_rank_step(metrics)
    assert set(rows) == {(r, s) for r in range(2) for s in range(1, STEPS + 1)}
    for (rank, step), m in rows.items():
        assert m["world_size"] == 2 and m["tokens"] == 64  # micro batch 1 x seq_len 64
        assert math.isfinite(m["loss"]) and m["loss"] == rows[(1 - rank, step)]["loss"]
        assert m["t_start"] <= m["t_fwd_end"] <= m["t_bwd_end"] <= m["t_opt_end"]
        assert m["step_time_s"] > 0 and m["tokens_per_s"] > 0 and m["tflops"] > 0 and m["mfu"] is None
        assert m["rss_bytes"] > 10 * 2**20
        assert all(m["state_bytes"][k] > 0 for k in ("params", "grads", "optimizer"))
        # every layout moves at least one full copy of the gradients per step
        assert sum(m["comm_bytes"].values()) >= TINY_BYTES
        assert set(m["comm_bytes"]) == set(m["comm_count"])
    assert {(e["rank"], e["event"]) for e in events} >= {(0, "start"), (1, "start"), (0, "done"), (1, "done")}


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["fsdp1", "fsdp2", "deepspeed"])
def test_collectives_match_the_sharding(run, framework):
    """ddp all-reduces gradients; zero3 all-gathers parameters and reduce-scatters gradients."""
    ddp = _by_rank_step(run(f"{framework}-ddp")[1])[(0, STEPS)]["comm_bytes"]
    z3 = _by_rank_step(run(f"{framework}-zero3")[1])[(0, STEPS)]["comm_bytes"]
    assert ddp.get("all_reduce", 0) >= TINY_BYTES and "reduce_scatter" not in ddp and "all_gather" not in ddp
    assert z3["reduce_scatter"] == TINY_BYTES  # fp32 gradients, input of the reduce-scatter
    assert z3["all_gather"] >= TINY_BYTES


@pytest.mark.slow
def test_same_seed_same_losses_across_frameworks(run):
    losses = {}
    for fw in ("fsdp1", "fsdp2", "deepspeed"):
        rows = _by_rank_step(run(f"{fw}-zero3")[1])
        losses[fw] = [rows[(0, s)]["loss"] for s in range(1, STEPS + 1)]
    ref = losses["fsdp1"]
    assert ref[0] == pytest.approx(math.log(PRESETS["gpt-tiny"].vocab), abs=0.5)
    for fw, ls in losses.items():
        assert ls == pytest.approx(ref, rel=1e-4), fw
    # and the same as the unsharded layouts of each framework
    for name in ("fsdp1-ddp", "fsdp2-ddp", "deepspeed-zero1", "deepspeed-zero2"):
        rows = _by_rank_step(run(name)[1])
        assert [rows[(0, s)]["loss"] for s in range(1, STEPS + 1)] == pytest.approx(ref, rel=1e-4), name


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["fsdp1", "fsdp2", "deepspeed"])
def test_zero3_holds_half_the_model_states_of_ddp_on_two_ranks(run, framework):
    ddp = _by_rank_step(run(f"{framework}-ddp")[1])[(0, STEPS)]["state_bytes"]
    z3 = _by_rank_step(run(f"{framework}-zero3")[1])[(0, STEPS)]["state_bytes"]
    assert ddp["params"] == ddp["grads"] == TINY_BYTES
    assert z3["params"] == pytest.approx(ddp["params"] / 2, rel=0.02)
    assert z3["grads"] == pytest.approx(ddp["grads"] / 2, rel=0.02)
    if framework == "deepspeed":
        # ZeRO keeps a separate fp32 master partition (even in fp32); DeepSpeed's stage 0 has none
        assert z3["optimizer"] == pytest.approx(3 / 4 * ddp["optimizer"], rel=0.02)
    else:
        assert z3["optimizer"] == pytest.approx(ddp["optimizer"] / 2, rel=0.02)
    assert sum(z3.values()) < 0.65 * sum(ddp.values())


@pytest.mark.slow
def test_zero1_and_zero2_shard_optimizer_states_not_parameters(run):
    ddp = _by_rank_step(run("deepspeed-ddp")[1])[(0, STEPS)]["state_bytes"]
    for name in ("deepspeed-zero1", "deepspeed-zero2"):
        s = _by_rank_step(run(name)[1])[(0, STEPS)]["state_bytes"]
        assert s["params"] == ddp["params"]
        # partitioned: fp32 master + two moments over half the parameters
        assert s["optimizer"] == pytest.approx(1.5 * TINY_BYTES, rel=0.02)


@pytest.mark.slow
def test_uninstrumented_run_logs_loss_only(direct, run):
    proc, d = direct["bare"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _by_rank_step(read_jsonl(d / "metrics.jsonl"))
    assert len(rows) == 4 and all("state_bytes" not in m and "comm_bytes" not in m for m in rows.values())
    instrumented = _by_rank_step(run("fsdp2-zero3")[1])
    assert [rows[(0, s)]["loss"] for s in (1, 2)] == pytest.approx([instrumented[(0, s)]["loss"] for s in (1, 2)], rel=1e-6)


@pytest.mark.slow
def test_alternating_run_measures_odd_steps_and_leaves_even_steps_bare(direct, run):
    proc, d = direct["alternate"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _by_rank_step(read_jsonl(d / "metrics.jsonl"))
    assert len(rows) == 8
    for (_rank, step), m in rows.items():
        measured = step % 2 == 1
        assert m["instrumented"] is measured
        assert ("state_bytes" in m) is measured and ("comm_bytes" in m) is measured
    # the bare steps' collectives are not counted into the next measured step
    full = _by_rank_step(run("deepspeed-zero2")[1])
    assert rows[(0, 3)]["comm_count"] == full[(0, 3)]["comm_count"]
    assert rows[(0, 3)]["state_bytes"] == full[(0, 3)]["state_bytes"]
    # and the training is the same whichever steps are measured (step 2 also ran under torch.profiler)
    assert [rows[(0, s)]["loss"] for s in (1, 2, 3)] == pytest.approx([full[(0, s)]["loss"] for s in (1, 2, 3)], rel=1e-6)
    # the profiled step (run/profile.py) on each rank: a CPU run has no device figures and no waits, and its
    # wall time is the step's own as the record's timestamps say (the profiler brackets the same calls)
    for rank in (0, 1):
        p = rows[(rank, 2)]["profile"]
        assert p["gpu_busy_s"] is None and p["host_wait_s"] == 0 and p["host_busy_s"] == p["step_s"]
        assert rows[(rank, 2)]["step_time_s"] <= p["step_s"] < rows[(rank, 2)]["step_time_s"] + 1.0
    assert all("profile" not in m for (_r, step), m in rows.items() if step != 2)


def test_profile_summary_takes_the_union_of_device_intervals_and_the_host_waits():
    """run/profile.py's reduction, on events whose answer is worked by hand: two kernels overlapping on two
    streams (0-30 and 20-50 us), one after a gap (100-110 us) and k1 again (200-201 us) are busy 61 us of a 71 us
    kernel sum (a record_function range drawn on the GPU's timeline is not work); the host waited 40 us in two
    synchronising calls; launch calls are counted, other host events are not."""
    from types import SimpleNamespace as NS

    from shardlab.run.profile import summarize

    def ev(name, a, b, kind="CPU", annotation=False):
        return NS(name=name, device_type=NS(name=kind), time_range=NS(start=a, end=b), is_user_annotation=annotation)

    events = [ev("k1", 0, 30, "CUDA"), ev("k2", 20, 50, "CUDA"), ev("k3", 100, 110, "CUDA"),
              ev("cudaStreamSynchronize", 60, 90), ev("cudaEventSynchronize", 120, 130), ev("cudaLaunchKernel", 1, 2),
              ev("cudaLaunchKernel", 3, 4), ev("aten::mm", 0, 5), ev("aten::mm", 6, 9), ev("k1", 200, 201, "CUDA"),
              ev("FSDP::pre_backward (blocks.0)", 0, 300, "CUDA", annotation=True)]  # a range drawn on the GPU, no work
    s = summarize(events, 0.002, "cuda")
    assert s["gpu_busy_s"] == pytest.approx(61e-6) and s["gpu_kernel_s"] == pytest.approx(71e-6)
    assert s["host_wait_s"] == pytest.approx(40e-6) and s["host_busy_s"] == pytest.approx(1960e-6)
    assert s["launches"] == 2
    # what the launches were: device kernels and CPU operators by name, most frequent first
    assert s["top_kernels"] == {"k1": 2, "k2": 1, "k3": 1} and list(s["top_kernels"]) == ["k1", "k2", "k3"]
    assert s["top_kernel_s"] == pytest.approx({"k1": 31e-6, "k2": 30e-6, "k3": 10e-6})  # ranked by GPU time
    assert s["top_ops"] == {"aten::mm": 2}
    # by the estimate's terms: a cuBLAS and a cuDNN attention kernel's names, the rest "other"
    assert s["gpu_kind_s"] == pytest.approx({"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 71e-6})
    named = summarize([ev("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 0, 40, "CUDA"),
                       ev("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 40, 50, "CUDA"),
                       ev("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", 50, 53, "CUDA"),
                       ev("void at::native::vectorized_elementwise_kernel<8, GeluCUDAKernelImpl>", 53, 55, "CUDA")],
                      0.001, "cuda")["gpu_kind_s"]
    assert named == pytest.approx({"matmul": 40e-6, "attention": 10e-6, "optimizer": 3e-6, "other": 2e-6})


_WRAP_WITH_OVERRIDES = textwrap.dedent('''
    import json, os
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import torch.distributed as dist
    from shardlab.models import resolve_model
    from shardlab.plan import load_plan
    from shardlab.run.gpt import build_model, loss_fn
    from shardlab.run.wrap import wrap
    dist.init_process_group("gloo")
    plan = load_plan({"framework": "deepspeed", "sharding": "zero3", "precision": "fp32"})
    t = wrap(plan, build_model(resolve_model("gpt-tiny")), "cpu", loss_fn,
             ds_overrides={"zero_optimization": {"stage3_prefetch_bucket_size": 1234}})
    z = t.engine._config.zero_config  # the config DeepSpeed parsed and runs with
    print(json.dumps({"cfg": t.extras["ds_config"]["zero_optimization"], "stage": z.stage,
                      "prefetch": z.prefetch_bucket_size}))
''')


@pytest.mark.slow
def test_deepspeed_overrides_reach_the_engine_next_to_the_exported_keys():
    proc = subprocess.run([sys.executable, "-c", _WRAP_WITH_OVERRIDES], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cfg"]["stage"] == 3 and out["cfg"]["stage3_prefetch_bucket_size"] == 1234
    assert out["stage"] == 3 and out["prefetch"] == 1234


# ---------------------------------------------------------------------------------------------
# Failures


_FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            if self.training and getattr(self, "explode", False):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.lin(x)

    class Net(nn.Module):
        def __init__(self, explode):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.block = Block()
            self.block.explode = explode
            self.head = nn.Linear(8, 16)

        def forward(self, x):
            return self.head(self.block(self.emb(x)))

    def batches(step, micro=0):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 16, (1, 4), generator=g)
        return x, (x + 1) % 16

    def good():
        torch.manual_seed(0)
        return Net(False), batches

    def oom():
        return Net(True), batches
''')


@pytest.mark.slow
def test_user_factory_model_trains(direct):
    proc, d = direct["factory"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _by_rank_step(read_jsonl(d / "metrics.jsonl"))
    assert len(rows) == 4 and rows[(0, 1)]["tokens"] == 4 and rows[(0, 1)]["tflops"] is None


@pytest.mark.slow
def test_out_of_memory_is_an_oom_event_and_exit_code_3(direct):
    from shardlab.run.worker import EXIT_OOM

    proc, d = direct["oom"]
    assert proc.returncode != 0
    ooms = [e for e in read_jsonl(d / "events.jsonl") if e["event"] == "oom"]
    assert {e["rank"] for e in ooms} == {0, 1}
    assert all(e["phase"] == "forward" and "out of memory" in e["message"] and e["rss_bytes"] > 0 for e in ooms)
    assert f"exitcode  : {EXIT_OOM}" in proc.stderr or f"exitcode: {EXIT_OOM}" in proc.stderr.replace(" ", "")


@pytest.mark.slow
def test_a_plan_the_cpu_cannot_run_is_an_error_event_naming_the_field(direct):
    proc, d = direct["fp16"]
    assert proc.returncode != 0
    errors = [e for e in read_jsonl(d / "events.jsonl") if e["event"] == "error"]
    assert errors and all("precision=fp16" in e["message"] and "bf16" in e["message"] and "traceback" not in e for e in errors)


@pytest.mark.slow
def test_low_memory_init_starts_from_rank_0_weights(direct, run):
    """FSDP2 with low_memory_init: rank 1 builds a meta model and receives rank 0's weights."""
    proc, d = direct["lowmem"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _by_rank_step(read_jsonl(d / "metrics.jsonl"))
    ref = _by_rank_step(run("fsdp2-zero3")[1])
    assert [rows[(0, s)]["loss"] for s in (1, 2)] == pytest.approx([ref[(0, s)]["loss"] for s in (1, 2)], rel=1e-6)
    assert rows[(1, 2)]["state_bytes"] == ref[(1, 2)]["state_bytes"]


@pytest.mark.parametrize("device_name, table", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A10G", "a10g"),
    ("NVIDIA L4", "l4"), ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA L40S", None), ("Tesla T4", None)])
def test_mfu_uses_the_gpu_table_entry_for_the_device_name(device_name, table):
    from shardlab.estimate.gpus import get_gpu
    from shardlab.run.worker import gpu_table_name, peak_tflops

    assert gpu_table_name(device_name) == table
    if table:
        assert peak_tflops(device_name, "bf16") == get_gpu(table).bf16_tflops
        assert peak_tflops(device_name, "fp32") == get_gpu(table).fp32_tflops
    else:
        assert peak_tflops(device_name, "bf16") is None
