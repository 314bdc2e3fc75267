"""What DeepSpeed ZeRO-0/1/2 bf16 costs the host per phase, next to the same model in plain torch (CPU, ~1 min).

hostcost.py prices a DeepSpeed ZeRO-0/1/2 step as the model's kernels (stepwork.py's count at the launch cost),
plus DS12_PARAM_S per parameter tensor (ZeRO-0/1 at the accumulation boundary, ZeRO-2 every backward), plus
DS_NORM_KERNELS_PER_PARAM launches per tensor after the engine's synchronisation. This runs DeepSpeed 0.19.8's
engine (world size 1, DS_ACCELERATOR=cpu, the config shardlab's runner hands it) on the runner's own model at a
width where the kernels' own work is negligible, and times each phase in the calling thread's CPU time (immune to
the other processes on the cores): engine.forward, engine.backward, engine.step, per micro-step, and the same
model's forward and backward without DeepSpeed. A second pass counts the aten operators each phase dispatches
(a TorchDispatchMode: one count per operator call, which on a GPU is at most one kernel launch, and the
`.item()`-style reads that would synchronise with a GPU).

Two shapes with different layer counts give the cost per parameter tensor; two accumulation settings say which
of it is paid per micro-step and which once per step.

On a GPU the engine uses DeepSpeed's FusedAdam (a CUDA op); on this CPU shardlab's runner asks for torch's AdamW
(`torch_adam`). Under ZeRO-0 + bf16 the engine wraps a FusedAdam in FP16_Optimizer and anything else in
FP16_UnfusedOptimizer (engine._configure_fp16_optimizer), so for ZeRO-0 the probe presents torch's AdamW as
DeepSpeed's FusedAdam class (the `--no-fused-alias` flag turns this off) to run the wrapper the GPU runs; both
step one flat fp32 tensor per parameter group.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/ds12_cpu_probe.py [--json benchmarks/results/ds12_cpu_probe.json]

`--split` instead times ZeRO-1's per-tensor methods apart (gpt, accumulation 1, L=4 and 16): the boundary's
`reduce_gradients`, the overflow check before its `.item()`, the norm after it, the whole `step()`, and the
engine's forward + backward less `reduce_gradients` per counted kernel. `--autocast` times the model `shardlab
calibrate` times for `launch_s` (microbench.host_model) under torch.autocast with fp32 parameters, as calibrate
does, against the same model in bf16 without autocast, as DeepSpeed's engine and FSDP's mixed precision run it
(CPU autocast; its operator lists are close to, not the same as, CUDA's).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for _k, _v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29612"}.items():
    os.environ.setdefault(_k, _v)  # world size 1, as the runner's torchrun child sees it


class _Count:
    """Counts aten operator calls (and local scalar reads) while active."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.ops[str(func.overloadpacket.__name__)] += 1
                return func(*args, **(kwargs or {}))

        self.ops: collections.Counter = collections.Counter()
        self.mode = Mode()

    def __enter__(self):
        self.ops.clear()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


_VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "as_strided", "detach", "alias",
          "unsqueeze", "squeeze", "permute", "split", "split_with_sizes", "unbind", "narrow", "reshape", "_reshape_alias",
          "lift_fresh", "set_"}


def _kernels(ops: collections.Counter) -> int:
    """Operator calls less the metadata-only ones (views, detach): on a GPU these launch no kernel."""
    return sum(n for k, n in ops.items() if k not in _VIEWS)


def _engine(stage: int, family: str, layers: int, accum: int, fused_alias: bool):
    import deepspeed
    import deepspeed.runtime.engine as ds_engine
    import torch

    from shardlab.frameworks.deepspeed import ds_config
    from shardlab.models import ModelSpec
    from shardlab.plan import plan_from_dict
    from shardlab.run.gpt import build_model

    sharding = {0: "ddp", 1: "zero1", 2: "zero2"}[stage]
    plan = plan_from_dict({"framework": "deepspeed", "sharding": sharding, "precision": "bf16", "micro_batch_size": 1,
                           "grad_accum_steps": accum}, check=False)
    cfg = ds_config(plan, "cpu")
    spec = ModelSpec("ds12-probe", layers=layers, hidden=32, heads=4, vocab=256, seq_len=32, family=family)
    model = build_model(spec, device="cpu")
    if fused_alias and stage == 0:
        ds_engine.FusedAdam = torch.optim.AdamW  # see the module docstring
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    return spec, model, engine


def measure(stage: int, family: str, layers: int, accum: int, steps: int = 40, fused_alias: bool = True) -> dict:
    import torch

    from shardlab.estimate.stepwork import work
    from shardlab.run.gpt import loss_fn

    spec, model, engine = _engine(stage, family, layers, accum, fused_alias)
    tok = torch.randint(0, spec.vocab, (1, spec.seq_len))
    w = work(spec, 1, spec.seq_len, 2, False)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    t = collections.defaultdict(list)

    def micro(timed: bool, i: int):
        c0 = time.thread_time()
        loss = loss_fn(engine(tok), tok)
        c1 = time.thread_time()
        engine.backward(loss)
        c2 = time.thread_time()
        engine.step()
        c3 = time.thread_time()
        if timed:
            last = i == accum - 1
            t["forward"].append(c1 - c0)
            t["backward_boundary" if last else "backward_inner"].append(c2 - c1)
            t["step_boundary" if last else "step_inner"].append(c3 - c2)

    for s in range(steps):
        for i in range(accum):
            micro(s >= 8, i)
    ops = {}
    cnt = _Count()
    for i in range(accum):
        last = i == accum - 1
        with cnt:
            loss = loss_fn(engine(tok), tok)
        ops.setdefault("forward", collections.Counter(cnt.ops))
        with cnt:
            engine.backward(loss)
        ops["backward_boundary" if last else "backward_inner"] = collections.Counter(cnt.ops)
        with cnt:
            engine.step()
        ops["step_boundary" if last else "step_inner"] = collections.Counter(cnt.ops)
    med = {k: statistics.median(v) for k, v in t.items()}
    row = {"stage": stage, "family": family, "layers": layers, "accum": accum, "param_tensors": tensors,
           "stepwork_param_tensors": w.param_tensors, "stepwork_kernels": w.kernels, "stepwork_fwd_kernels": w.fwd_kernels,
           "optimizer": type(engine.optimizer).__name__, "seconds": med,
           "kernels": {k: _kernels(v) for k, v in ops.items()},
           "scalar_reads": {k: v.get("_local_scalar_dense", 0) for k, v in ops.items()},
           "top_ops": {k: v.most_common(12) for k, v in ops.items() if k.startswith(("step", "backward_b"))}}
    return row


def plain(family: str, layers: int, steps: int = 40) -> dict:
    """The runner's model in bf16 without DeepSpeed: forward and backward host time and operator count."""
    import torch

    from shardlab.models import ModelSpec
    from shardlab.run.gpt import build_model, loss_fn

    spec = ModelSpec("ds12-probe", layers=layers, hidden=32, heads=4, vocab=256, seq_len=32, family=family)
    model = build_model(spec, device="cpu").to(torch.bfloat16)
    tok = torch.randint(0, spec.vocab, (1, spec.seq_len))
    fwd, bwd = [], []
    for s in range(steps):
        c0 = time.thread_time()
        loss = loss_fn(model(tok), tok)
        c1 = time.thread_time()
        loss.backward()
        c2 = time.thread_time()
        model.zero_grad(set_to_none=True)
        if s >= 8:
            fwd.append(c1 - c0)
            bwd.append(c2 - c1)
    cnt = _Count()
    with cnt:
        loss = loss_fn(model(tok), tok)
    kf = _kernels(cnt.ops)
    with cnt:
        loss.backward()
    kb = _kernels(cnt.ops)
    return {"family": family, "layers": layers, "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
            "forward_kernels": kf, "backward_kernels": kb}


def split(steps: int = 60) -> None:
    """ZeRO-1's per-tensor host time by method (see the module docstring), printed."""
    import torch
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z

    from shardlab.estimate.stepwork import work
    from shardlab.run.gpt import loss_fn

    t = collections.defaultdict(list)

    def timed(name):
        f = getattr(Z, name)

        def g(self, *a, **k):
            c = time.thread_time()
            out = f(self, *a, **k)
            t[name].append(time.thread_time() - c)
            return out
        setattr(Z, name, g)

    for n in ("reduce_gradients", "has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "step"):
        timed(n)
    res, tensors, kernels = {}, {}, {}
    for L in (4, 16):
        t.clear()
        spec, model, engine = _engine(1, "gpt", L, 1, False)
        tok = torch.randint(0, spec.vocab, (1, spec.seq_len))
        for _ in range(steps):
            c0 = time.thread_time()
            loss = loss_fn(engine(tok), tok)
            engine.backward(loss)
            t["forward+backward"].append(time.thread_time() - c0)
            engine.step()
        res[L] = {k: statistics.median(v[10:]) for k, v in t.items()}
        res[L]["model"] = res[L]["forward+backward"] - res[L]["reduce_gradients"]
        tensors[L] = sum(1 for p in model.parameters() if p.requires_grad)
        kernels[L] = work(spec, 1, spec.seq_len, 2, False).kernels
    dt, dk = tensors[16] - tensors[4], kernels[16] - kernels[4]
    per_k = (res[16]["model"] - res[4]["model"]) / dk
    print(f"forward + backward less reduce_gradients: {per_k * 1e6:.1f} us per counted kernel")
    for n in ("reduce_gradients", "has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "step"):
        per_t = (res[16][n] - res[4][n]) / dt
        print(f"{n:40} {per_t * 1e6:6.1f} us per tensor = {per_t / per_k:.2f} counted kernels")


def autocast_cost(family: str, steps: int = 300) -> None:
    """Forward and backward host time and operators: fp32 parameters under autocast vs bf16 parameters, printed."""
    import torch

    from shardlab.estimate.microbench import host_model
    from shardlab.models import ModelSpec
    from shardlab.run.gpt import build_model, loss_fn

    spec, _ = host_model()
    spec = ModelSpec(spec.name, layers=spec.layers, hidden=spec.hidden, heads=spec.heads, vocab=spec.vocab,
                     seq_len=spec.seq_len, family=family)
    tok = torch.randint(0, spec.vocab, (1, spec.seq_len))
    models = {n: build_model(spec, device="cpu") for n in ("autocast fp32", "native bf16")}
    models["native bf16"] = models["native bf16"].to(torch.bfloat16)

    def fwd(name):
        if name == "native bf16":
            return loss_fn(models[name](tok), tok)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(models[name](tok), tok)

    times = collections.defaultdict(list)
    for s in range(steps):  # interleaved, so both see the same load
        for name in models:
            c0 = time.thread_time()
            loss = fwd(name)
            c1 = time.thread_time()
            loss.backward()
            c2 = time.thread_time()
            models[name].zero_grad(set_to_none=True)
            if s >= 20:
                times[name].append((c1 - c0, c2 - c1))
    cnt = _Count()
    for name in models:
        f = statistics.median(x[0] for x in times[name])
        b = statistics.median(x[1] for x in times[name])
        with cnt:
            loss = fwd(name)
        kf, cf = _kernels(cnt.ops), cnt.ops.get("_to_copy", 0)
        with cnt:
            loss.backward()
        kb, cb = _kernels(cnt.ops), cnt.ops.get("_to_copy", 0)
        print(f"{family} {name:14} forward {f * 1e3:6.3f} ms / {kf} ops ({cf} casts)  backward {b * 1e3:6.3f} ms / {kb} ops "
              f"({cb} casts)  forward+backward {(f + b) * 1e3:6.3f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--family", default="gpt")
    ap.add_argument("--layers", default="4,16")
    ap.add_argument("--stages", default="0,1,2")
    ap.add_argument("--accum", default="1,2")
    ap.add_argument("--no-fused-alias", action="store_true")
    ap.add_argument("--split", action="store_true", help="ZeRO-1's per-tensor time by method, printed")
    ap.add_argument("--autocast", action="store_true", help="calibrate's autocast step vs native bf16, printed")
    a = ap.parse_args(argv)
    import deepspeed
    import torch

    torch.set_num_threads(1)
    if a.split:
        split()
        return 0
    if a.autocast:
        for fam in ("gpt", "llama"):
            autocast_cost(fam)
        return 0
    layers = [int(x) for x in a.layers.split(",")]
    rows, plains = [], [plain(a.family, L, a.steps) for L in layers]
    for p in plains:
        print(f"plain {p['family']} L={p['layers']:3}  forward {p['forward_s'] * 1e3:6.2f} ms / {p['forward_kernels']} ops  "
              f"backward {p['backward_s'] * 1e3:6.2f} ms / {p['backward_kernels']} ops")
    for st in (int(x) for x in a.stages.split(",")):
        for acc in (int(x) for x in a.accum.split(",")):
            for L in layers:
                r = measure(st, a.family, L, acc, a.steps, not a.no_fused_alias)
                rows.append(r)
                s, k, q = r["seconds"], r["kernels"], r["scalar_reads"]
                print(f"zero{st} acc={acc} L={L:3} tensors={r['param_tensors']:4} ({r['optimizer']})  " +
                      "  ".join(f"{ph} {s[ph] * 1e3:6.2f} ms/{k.get(ph, 0)} ops/{q.get(ph, 0)} reads" for ph in s), flush=True)
    if a.json:
        out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "deepspeed": deepspeed.__version__, "command": "benchmarks/ds12_cpu_probe.py " + " ".join(argv or sys.argv[1:]),
               "plain": plains, "rows": rows}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
