"""What a real framework's training step holds at its memory peak, on the CPU (one rank, gloo).

The analytical model (shardlab/estimate/memory.py) says which tensors are alive at the peak; this
runs the real thing -- DeepSpeed's engine or FSDP through the runner's own `wrap()` -- on real CPU
tensors, follows every storage an operator creates (trace.LiveBytes: a dispatch mode plus weakref
callbacks), and prints, for each step, the peak of live bytes and the largest storages alive at it
with the operator and the framework source line that made them. Everything the frameworks do is
theirs; only the CUDA-specific pieces (the caching allocator, cuBLAS workspaces, CUDA streams)
are absent, so compare the printed peak with the estimate's peak minus its cuBLAS workspaces.

    .venv/bin/python benchmarks/cpu_memory_probe.py --framework deepspeed --sharding zero1 \
        --precision bf16 --mb 2 --ga 4 [--model '{"family": "llama", ...}'] [--top 12]

Nothing is written; it takes a few seconds per configuration on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {"name": "probe", "family": "llama", "layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2,
        "ffn_hidden": 704, "vocab": 4096, "seq_len": 256}
MIB = 2**20


def _origin() -> str:
    """The innermost frame outside torch's own autograd/dispatch plumbing (where a tensor was asked for)."""
    keep = ("deepspeed", "fsdp", "shardlab", "optim", "cpu_memory_probe")
    for fr in reversed(traceback.extract_stack()[:-3]):
        if any(k in fr.filename for k in keep) and "_python_dispatch" not in fr.filename and "trace.py" not in fr.filename:
            parts = Path(fr.filename).parts
            return f"{'/'.join(parts[-2:])}:{fr.lineno} {fr.name}"
    return "?"


@contextlib.contextmanager
def _fused_rms_norm():
    """torch.nn.RMSNorm as CUDA runs it (the fused kernel keeps its input and a per-row fp32 rstd for
    backward; the CPU's decomposed norm would keep two fp32 copies more), with real arithmetic, so
    that DeepSpeed's overflow check sees finite gradients and steps."""
    import torch
    import torch.nn.functional as F

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + (eps or 1e-6))
            ctx.save_for_backward(x, weight, rstd)
            return ((xf * rstd) * weight.float()).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            x, w, rstd = ctx.saved_tensors
            xf, gw = x.float(), g.float() * w.float()
            dx = rstd * (gw - xf * rstd.pow(2) * (gw * xf).mean(-1, keepdim=True))
            dw = (g.float() * xf * rstd).reshape(-1, x.shape[-1]).sum(0)
            return dx.to(x.dtype), dw.to(w.dtype), None

    orig = F.rms_norm
    F.rms_norm = lambda x, shape, weight=None, eps=None: Fused.apply(x, weight, eps)
    try:
        yield
    finally:
        F.rms_norm = orig


class Probe:
    """trace.LiveBytes plus, for each storage, where it was made; per phase group (forward/backward
    and the optimizer step) the peak and a snapshot of what is alive at it."""

    def __init__(self, min_bytes: int):
        from shardlab.estimate.trace import LiveBytes

        self.live = LiveBytes()
        self.where: dict[int, str] = {}
        self.min_bytes = min_bytes
        self.reset()
        orig_track, orig_add = self.live.track, self.live._add

        def track(t, cat=None):
            from shardlab.estimate.trace import _storages

            for st in _storages(t):
                if id(st) not in self.live.info and st.nbytes() >= self.min_bytes:
                    self.where[id(st)] = f"{self.live.cat}: {_origin()}"
            orig_track(t, cat)

        def add(cat, n):
            orig_add(cat, n)
            group = "step" if self.live.cat == "step" else "fwd/bwd"
            if self.live.live > self.peaks[group][0]:
                snap = self.peaks[group][1]
                if n >= self.min_bytes or not snap:  # a new peak made by a sizeable storage: keep what is alive
                    snap = [(rec[1], self.where.get(k, rec[0])) for k, rec in self.live.info.items() if rec[1] >= self.min_bytes]
                self.peaks[group] = (self.live.live, snap)

        self.live.track, self.live._add = track, add

    def reset(self) -> None:
        self.peaks = {"fwd/bwd": (0, []), "step": (0, [])}


def run(plan, spec: dict, steps: int, top: int, min_bytes: int, ds_overrides: dict | None = None) -> None:
    import torch
    import torch.distributed as dist

    from shardlab.estimate import estimate
    from shardlab.estimate.memory import cublas_workspaces
    from shardlab.estimate.trace import _foreach
    from shardlab.models import resolve_model
    from shardlab.run.gpt import GPT, loss_fn
    from shardlab.run.wrap import wrap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    m = resolve_model(spec)
    torch.manual_seed(0)
    module = GPT(m)
    probe = Probe(min_bytes)
    live = probe.live
    with _fused_rms_norm():  # CUDA's fused RMSNorm keeps what a GPU run keeps
        with live.active():
            live.label_module(module)
            t = wrap(plan, module, "cpu", loss_fn, ds_overrides)
            live.label_module(t.module)
            inner = t.optimizer
            while hasattr(inner, "optimizer"):  # DeepSpeed's ZeRO optimizer wraps the torch one
                inner = inner.optimizer
            _foreach(inner)  # CUDA's default optimizer kernels, not the CPU's per-tensor loop
            after_init = live.live
            for step in range(1, steps + 1):
                probe.reset()
                start = live.live
                for micro in range(plan.grad_accum_steps):
                    x = torch.randint(0, m.vocab, (plan.micro_batch_size, m.seq_len))
                    live.cat = "fwd"
                    loss = t.forward(x, x)
                    live.cat = "bwd"
                    t.backward(loss, plan.grad_accum_steps)
                    del loss
                    if t.engine is not None and micro < plan.grad_accum_steps - 1:
                        live.cat = "mid-step"
                        t.engine.step()
                live.cat = "step"
                t.step()
                t.zero_grad()
                live.label_module(t.module)
                (fb, snap), (sp, ssnap) = probe.peaks["fwd/bwd"], probe.peaks["step"]
                print(f"step {step}: start {start / MIB:8.2f} MiB  forward/backward peak {fb / MIB:8.2f}  step peak {sp / MIB:8.2f}  end {live.live / MIB:8.2f}")
                if step == steps:
                    for title, rows in (("forward/backward", snap), ("optimizer step", ssnap)):
                        print(f"  alive at the {title} peak (largest {top}):")
                        for n, where in sorted(rows, key=lambda r: -r[0])[:top]:
                            print(f"    {n / MIB:9.2f} MiB  {where}")
    e = estimate(plan, spec, gpu="h200").per_gpu
    ws = cublas_workspaces("h200")
    print(f"after init {after_init / MIB:.2f} MiB; estimate: peak {(e['peak_allocated'] - ws) / MIB:.2f} MiB without cuBLAS "
          f"workspaces (params {e['params'] / MIB:.2f}, grads {e['grads'] / MIB:.2f}, optimizer {e['optimizer'] / MIB:.2f}, "
          f"activations {e['activations'] / MIB:.2f}, buffers {(e['buffers'] - ws) / MIB:.2f}, step {e['step_buffers'] / MIB:.2f})")
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", default="deepspeed")
    ap.add_argument("--sharding", default="zero1")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--ga", type=int, default=1)
    ap.add_argument("--ac", action="store_true")
    ap.add_argument("--offload", default="none", choices=("none", "opt", "both"))
    ap.add_argument("--plan", default="{}", help="more Plan fields as JSON (merged)")
    ap.add_argument("--ds", default="{}", help="DeepSpeed config keys the Plan does not model, as JSON (wrap's ds_overrides)")
    ap.add_argument("--model", default=json.dumps(TINY))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--min-mib", type=float, default=0.25)
    a = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from shardlab.export.launch import extensions_dir
    from shardlab.plan import Plan

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    data = {"framework": a.framework, "sharding": a.sharding, "precision": a.precision, "micro_batch_size": a.mb,
            "grad_accum_steps": a.ga, "activation_checkpointing": a.ac, "optimizer": {"name": "adamw", "lr": 1e-4},
            "offload": {"optimizer": "cpu" if a.offload != "none" else "none", "params": "cpu" if a.offload == "both" else "none"},
            **json.loads(a.plan)}
    run(Plan.model_validate(data), json.loads(a.model), a.steps, a.top, int(a.min_mib * MIB), json.loads(a.ds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
