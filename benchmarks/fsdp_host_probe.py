"""FSDP's host cost by mechanism, measured on the CPU where the kernels' own work is negligible (~45 s).

hostcost.py prices FSDP's host side as kernels counted x launch cost, a cost per FSDP unit (FSDP_UNIT_S,
timed by `calibrate` on an 8-block GPT under FSDP2) and a foreach optimizer of `8 * max(1, tensors // 64) + 10`
launches. Some of that work goes per parameter tensor instead: FSDP2's parameters are DTensors, so every
foreach op of AdamW (torch's default on CUDA) dispatches through DTensor, and at world size 1 FSDP2's unshard
casts and copies each parameter on its own. This script times each mechanism alone, on a one-rank gloo
group, in the calling thread's CPU time (other processes taking the cores do not count), tiny tensors:

- optimizer: AdamW(foreach=True).step(), clip_grad_norm_, GradScaler's unscale_ + update (fp16) and
  zero_grad(set_to_none=True) over N tensors, plain vs DTensor (FSDP1 with use_orig_params steps plain ones);
- hooks: forward + backward of 8 units of k bias-free Linear layers, FSDP2 (bf16 policy and fp32) against the
  same model unsharded in the same dtype: the hooks' cost per unit as k grows;
- the runner's own models (run/gpt.py, gpt and llama families, 8 layers at hidden 32: blocks of 12 and 7
  tensors) unsharded, FSDP2 and FSDP1, by phase;
- stages (session 13): the runner's models under FSDP2 as the runner shards them for zero3 (1-D mesh,
  reshard_after_forward=True: what `calibrate` times), zero2 (1-D, False) and ddp (a (1, 1) replicate x shard
  mesh, False): what ZeRO-3's reshard after forward and second unshard in backward cost per unit;
- calibrate's own host measurement (microbench.host's tiny model) repeated here, so CPU seconds can be
  carried to an H200 host by the ratio of its results there (launch_s, fsdp_unit_s) to its results here.

Results and what they mean for the step-time model: docs/benchmarks.md, "FSDP's host cost by mechanism".

    .venv/bin/python benchmarks/fsdp_host_probe.py [--json benchmarks/results/fsdp_host_probe_cpu.json] [--reps N]
        [--only optimizer,hooks,runner,stages,calibrate]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _cpu_seconds(fn, reps: int, warm: int = 3, setup=None) -> float:
    """Median thread CPU seconds of one call of fn (setup, if given, runs untimed before each call)."""
    out = []
    for i in range(warm + reps):
        if setup is not None:
            setup()
        c0 = time.thread_time()
        fn()
        if i >= warm:
            out.append(time.thread_time() - c0)
    return statistics.median(out)


def _group():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    return init_device_mesh("cpu", (1,))


def optimizer(n: int, kind: str, reps: int) -> dict:
    """AdamW(foreach=True).step(), clip_grad_norm_, GradScaler and zero_grad(set_to_none) over n tensors of 64 elements."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _group() if kind == "dtensor" else None
    params = []
    for _ in range(n):
        t = torch.randn(64)
        params.append(torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]) if mesh is not None else t))
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)

    def grads():
        for p in params:
            p.grad = torch.ones_like(p)
    step_s = _cpu_seconds(opt.step, reps, setup=grads)
    zero_s = _cpu_seconds(lambda: opt.zero_grad(set_to_none=True), reps, setup=grads)
    clip_s = _cpu_seconds(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), reps, setup=grads)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # creates the scale, as scaling the loss would
    extra = []  # unscale_ and update: what the scaler adds around the optimizer's own step
    for i in range(3 + reps):
        grads()
        c0 = time.thread_time()
        scaler.unscale_(opt)
        c1 = time.thread_time()
        scaler.step(opt)  # on CUDA its found_inf .item() waits for the GPU here
        c2 = time.thread_time()
        scaler.update()
        if i >= 3:
            extra.append(c1 - c0 + time.thread_time() - c2)
    scaler_s = statistics.median(extra)
    return {"tensors": n, "kind": kind, "adamw_step_s": step_s, "zero_grad_s": zero_s, "clip_grad_norm_s": clip_s,
            "grad_scaler_extra_s": scaler_s}


def _phases(models: dict, reps: int, warm: int = 3) -> dict:
    """Thread CPU seconds (medians) of forward, backward, optimizer step and zero_grad for each of
    `models` ({name: (module, forward-to-loss callable, optimizer)}), the models stepped in turn in one
    loop so that a slow stretch of this shared machine falls on all of them alike."""
    times = {k: {"forward": [], "backward": [], "optimizer": [], "zero_grad": []} for k in models}
    for i in range(warm + reps):
        for name, (_m, fwd, opt) in models.items():
            c = [time.thread_time()]
            loss = fwd()
            c.append(time.thread_time())
            loss.backward()
            c.append(time.thread_time())
            opt.step()
            c.append(time.thread_time())
            opt.zero_grad(set_to_none=True)
            c.append(time.thread_time())
            if i >= warm:
                for j, ph in enumerate(times[name]):
                    times[name][ph].append(c[j + 1] - c[j])
    return {k: {ph: statistics.median(v) for ph, v in t.items()} for k, t in times.items()}


def _fsdp2(model, units, precision: str) -> None:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _group()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if precision == "bf16" else MixedPrecisionPolicy()
    for u in units:
        fully_shard(u, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def _fsdp1(model, block_cls, precision: str, strategy: str = "FULL_SHARD"):
    """FSDP1 as the runner applies it (frameworks/fsdp1.py): one unit per block, use_orig_params (at world size 1
    FSDP1 itself switches FULL_SHARD to NO_SHARD)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    _group()
    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16) if precision == "bf16" else None
    return FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy[strategy], auto_wrap_policy=ModuleWrapPolicy({block_cls}),
                                    mixed_precision=mp, use_orig_params=True, device_id=torch.device("cpu"))


def _adamw(m):
    import torch

    return torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True)  # foreach: torch's default on CUDA


def hooks(k: int, units: int, reps: int) -> dict:
    """Host seconds per unit that fully_shard adds to forward + backward, for units of k bias-free Linear
    layers (k parameter tensors), bf16 MixedPrecisionPolicy and fp32, against the same model unsharded."""
    import torch

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Sequential(*[torch.nn.Linear(16, 16, bias=False) for _ in range(k)])
                                     for _ in range(units)])
    x = torch.randn(2, 16)
    x16 = x.to(torch.bfloat16)
    models = {}
    for name in ("plain", "plain_bf16", "bf16", "fp32"):
        m = model()
        if name == "plain_bf16":  # the same compute in bf16: what FSDP2's bf16 policy runs, without its hooks
            m = m.to(torch.bfloat16)
            models[name] = (m, lambda m=m: m(x16).float().sum(), _adamw(m))
            continue
        if name != "plain":
            _fsdp2(m, list(m), name)
        models[name] = (m, lambda m=m: m(x).float().sum(), _adamw(m))
    ph = _phases(models, reps)
    out = {"tensors_per_unit": k, "units": units, "phases": ph}
    for p in ("bf16", "fp32"):  # the root is a unit too (no tensors of its own)
        base = "plain_bf16" if p == "bf16" else "plain"  # the same compute without the hooks
        out[f"{p}_hooks_per_unit_s"] = sum(ph[p][x] - ph[base][x] for x in ("forward", "backward")) / (units + 1)
        out[f"{p}_opt_extra_per_tensor_s"] = (ph[p]["optimizer"] - ph["plain"]["optimizer"]) / (units * k)
    return out


def runner_model(family: str, reps: int, layers: int = 8) -> dict:
    """The runner's model (run/gpt.py) at a tiny width: unsharded vs FSDP2 per block (bf16 and fp32)."""
    import torch

    from shardlab.estimate.stepwork import work
    from shardlab.models import ModelSpec
    from shardlab.run.gpt import build_model, loss_fn

    spec = ModelSpec("probe", layers=layers, hidden=32, heads=4, vocab=256, seq_len=32, family=family)
    w = work(spec, 1, spec.seq_len, 2, False)
    tok = torch.randint(0, spec.vocab, (1, spec.seq_len))
    models = {}
    names = ("plain", "plain_bf16", "bf16", "fp32", "fsdp1_bf16", "fsdp1_fp32")
    for name in names:
        torch.manual_seed(0)
        m = build_model(spec, device="cpu")
        if name == "plain_bf16":
            m = m.to(torch.bfloat16)
        elif name.startswith("fsdp1"):
            m = _fsdp1(m, type(m.blocks[0]), name.split("_")[1])
        elif name != "plain":
            _fsdp2(m, list(m.blocks), name)
        models[name] = (m, lambda m=m: loss_fn(m(tok).float(), tok), _adamw(m))
    ph = _phases(models, reps)
    out = {"family": family, "layers": layers, "units": w.units, "param_tensors": w.param_tensors, "kernels": w.kernels, "phases": ph}
    for p in ("bf16", "fp32", "fsdp1_bf16", "fsdp1_fp32"):
        base = "plain_bf16" if p.endswith("bf16") else "plain"  # the same compute without the hooks
        out[f"{p}_hooks_per_unit_s"] = sum(ph[p][x] - ph[base][x] for x in ("forward", "backward")) / w.units
        out[f"{p}_opt_extra_per_tensor_s"] = (ph[p]["optimizer"] - ph["plain"]["optimizer"]) / w.param_tensors
        # as calibrate measures it (microbench._fsdp2_units): the whole step's extra over the units
        out[f"{p}_unit_s_as_calibrate"] = sum(ph[p][x] - ph[base][x] for x in ph[p]) / w.units
    return out


def stages(family: str, reps: int, layers: int = 8) -> dict:
    """Host seconds per unit (forward + backward, and the whole step as calibrate counts it) that FSDP2 adds over
    the same model in bf16 unsharded, for the runner's three FSDP2 shardings at world size 1 (frameworks/fsdp2.py:
    MESH and FSDP2_RESHARD). hostcost.UNIT_HOOK_SHARE prices zero2 at 0.75 and ddp at 1.0 of calibrate's zero3 unit."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from shardlab.estimate.stepwork import work
    from shardlab.models import ModelSpec
    from shardlab.run.gpt import build_model, loss_fn

    _group()
    meshes = {"shard": init_device_mesh("cpu", (1,)), "replicate": init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))}
    spec = ModelSpec("probe", layers=layers, hidden=32, heads=4, vocab=256, seq_len=32, family=family)
    w = work(spec, 1, spec.seq_len, 2, False)
    tok = torch.randint(0, spec.vocab, (1, spec.seq_len))
    models = {}
    for name, mesh, reshard in (("plain_bf16", None, None), ("zero3", "shard", True), ("zero2", "shard", False), ("ddp", "replicate", False)):
        torch.manual_seed(0)
        m = build_model(spec, device="cpu").to(torch.bfloat16) if mesh is None else build_model(spec, device="cpu")
        if mesh is not None:
            kw = dict(mesh=meshes[mesh], reshard_after_forward=reshard,
                      mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
            for b in m.blocks:
                fully_shard(b, **kw)
            fully_shard(m, **kw)
        models[name] = (m, lambda m=m: loss_fn(m(tok).float(), tok), _adamw(m))
    ph = _phases(models, reps)
    out = {"family": family, "layers": layers, "units": w.units, "param_tensors": w.param_tensors, "phases": ph}
    for p in ("zero3", "zero2", "ddp"):
        out[f"{p}_hooks_per_unit_s"] = sum(ph[p][x] - ph["plain_bf16"][x] for x in ("forward", "backward")) / w.units
        out[f"{p}_unit_s_as_calibrate"] = sum(ph[p][x] - ph["plain_bf16"][x] for x in ph[p]) / w.units
    return out


def as_calibrate(reps: int) -> dict:
    """microbench.host's own measurement (its tiny model, bf16, AdamW as torch defaults it on CUDA: foreach)
    on this CPU: seconds per counted kernel and per FSDP2 unit. An H200 calibration's launch_s / fsdp_unit_s
    over these carries CPU seconds of the same kind of work to that host."""
    import contextlib

    import torch

    from shardlab.estimate.microbench import host_model, launch_seconds
    from shardlab.run.gpt import build_model, loss_fn

    spec, w = host_model()
    tok = torch.randint(0, spec.vocab, (1, spec.seq_len))
    models = {}
    for name in ("plain", "fsdp2"):
        torch.manual_seed(0)
        m = build_model(spec, device="cpu")
        if name == "fsdp2":
            _fsdp2(m, list(m.blocks), "bf16")

        def fwd(m=m, name=name):
            with torch.autocast("cpu", dtype=torch.bfloat16) if name == "plain" else contextlib.nullcontext():
                return loss_fn(m(tok), tok)
        models[name] = (m, fwd, _adamw(m))
    ph = _phases(models, reps)
    plain, sharded = (sum(ph[k].values()) for k in ("plain", "fsdp2"))
    return {"plain_step_s": plain, "fsdp2_step_s": sharded, "launch_s": launch_seconds(plain, w),
            "fsdp_unit_s": (sharded - plain) / w.units, "phases": ph}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--only", default="optimizer,hooks,runner,stages,calibrate", help="which parts, comma-separated")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "command": "benchmarks/fsdp_host_probe.py", "optimizer": [], "hooks": [], "runner": [], "stages": []}
    parts = set(a.only.split(","))
    for n in (16, 64, 256) if "optimizer" in parts else ():
        for kind in ("plain", "dtensor"):
            r = optimizer(n, kind, a.reps)
            res["optimizer"].append(r)
            print(f"optimizer {kind:7} {n:4} tensors: AdamW step {r['adamw_step_s'] * 1e3:7.2f} ms  zero_grad {r['zero_grad_s'] * 1e3:6.2f} ms"
                  f"  clip_grad_norm_ {r['clip_grad_norm_s'] * 1e3:6.2f} ms  GradScaler unscale_+update {r['grad_scaler_extra_s'] * 1e3:6.2f} ms", flush=True)
    for k in (1, 2, 4, 8, 12, 24) if "hooks" in parts else ():
        r = hooks(k, 8, a.reps)
        res["hooks"].append(r)
        print(f"hooks {k:2} tensors/unit x 8 units: per unit bf16 {r['bf16_hooks_per_unit_s'] * 1e3:5.3f} ms fp32 {r['fp32_hooks_per_unit_s'] * 1e3:5.3f} ms;"
              f" optimizer extra per tensor bf16 {r['bf16_opt_extra_per_tensor_s'] * 1e6:5.1f} us fp32 {r['fp32_opt_extra_per_tensor_s'] * 1e6:5.1f} us", flush=True)
    for family in ("gpt", "llama") if "runner" in parts else ():
        r = runner_model(family, a.reps)
        res["runner"].append(r)
        print(f"runner {family:5}: {r['units']} units {r['param_tensors']} tensors {r['kernels']} kernels; "
              + "; ".join(f"{p}: {' '.join(f'{x} {v * 1e3:.2f}' for x, v in r['phases'][p].items())} ms" for p in r["phases"]), flush=True)
        for p in ("bf16", "fp32", "fsdp1_bf16", "fsdp1_fp32"):
            print(f"   {p if p.startswith('fsdp1') else 'fsdp2_' + p:10} per unit: hooks {r[f'{p}_hooks_per_unit_s'] * 1e3:5.3f} ms, whole step as calibrate"
                  f" {r[f'{p}_unit_s_as_calibrate'] * 1e3:5.3f} ms; optimizer extra per tensor {r[f'{p}_opt_extra_per_tensor_s'] * 1e6:5.1f} us", flush=True)
    for family in ("gpt", "llama") if "stages" in parts else ():
        r = stages(family, a.reps)
        res["stages"].append(r)
        z3 = r["zero3_unit_s_as_calibrate"]
        print(f"stages {family:5}: {r['units']} units {r['param_tensors']} tensors; FSDP2 per unit (hooks fwd+bwd / whole step as calibrate): "
              + "; ".join(f"{p} {r[f'{p}_hooks_per_unit_s'] * 1e3:.3f} / {r[f'{p}_unit_s_as_calibrate'] * 1e3:.3f} ms ({r[f'{p}_unit_s_as_calibrate'] / z3:.2f} of zero3)"
                          for p in ("zero3", "zero2", "ddp")), flush=True)
    c = res["as_calibrate"] = as_calibrate(a.reps) if "calibrate" in parts else None
    if c:
        print(f"as calibrate: plain step {c['plain_step_s'] * 1e3:.2f} ms -> {c['launch_s'] * 1e6:.1f} us per kernel; FSDP2 step"
              f" {c['fsdp2_step_s'] * 1e3:.2f} ms -> {c['fsdp_unit_s'] * 1e3:.3f} ms per unit", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
