"""Why DeepSpeed ZeRO-3 trails FSDP on one GPU (issue 8): the same model and loop, one setting at a time.

Each variant runs in a fresh process (world size 1, NCCL): DeepSpeed keeps its engines alive after
use, so variants sharing one process piled up GPU memory (seen on an H100: 26 -> 41 -> 56 -> 71 GiB,
then out of memory). The process builds the ~1B GPT of gpu_validate (micro-batch 4 unless the variant
says otherwise, bf16, AdamW, no activation checkpointing), wraps it, and trains `--warmup` + `--steps`
steps. Variants are DeepSpeed configs shardlab exports for the plan plus one override each
(the optimizer DeepSpeed picks, prefetch / live-parameter / reuse limits, persistence threshold,
overlap_comm, DeepSpeed's own linear autograd function), ZeRO-2 for contrast, FSDP2 zero3 through shardlab's own wrapper, and a plain torch loop
(autocast bf16, no sharding) as the ceiling. With `--profile`, three steps of selected variants run
under torch.profiler and the script reports how busy the GPU was (kernel time / step time) and the
host-side operators that cost most.

    python benchmarks/zero3_gap.py --out DIR [--steps 8] [--warmup 4] [--only ds-default,fsdp2] [--profile ds-default,fsdp2]

Writes DIR/zero3_gap.json (one object per variant) and DIR/profile_<variant>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardlab import Plan  # noqa: E402
from shardlab.models import flops_per_token, resolve_model  # noqa: E402
from shardlab.run.host import free_port  # noqa: E402

MODEL = "gpt-1b"
MB = 4
DEVICE = "cuda"  # --device cpu (gloo) only checks the script itself on a machine without a GPU
Z3 = {"zero_optimization": {"stage": 3}}
TORCH_ADAM = {"optimizer": {"params": {"torch_adam": True}}}
DEEPCOMPILE = {"compile": {"deepcompile": True}}
# name -> (framework, sharding, DeepSpeed config overrides merged over shardlab's export[, micro-batch])
VARIANTS = {
    "ds-default": ("deepspeed", "zero3", {}),
    "ds-torch-adamw": ("deepspeed", "zero3", TORCH_ADAM),
    "ds-prefetch-5e8": ("deepspeed", "zero3", {"zero_optimization": {"stage3_prefetch_bucket_size": 500_000_000}}),
    "ds-live-reuse-1e10": ("deepspeed", "zero3", {"zero_optimization": {"stage3_max_live_parameters": 10**10,
                                                                       "stage3_max_reuse_distance": 10**10}}),
    "ds-persist-all": ("deepspeed", "zero3", {"zero_optimization": {"stage3_param_persistence_threshold": 10**9}}),
    "ds-no-overlap": ("deepspeed", "zero3", {"zero_optimization": {"overlap_comm": False}}),
    "ds-plain-linear": ("deepspeed", "zero3", {"zero_optimization": {"memory_efficient_linear": False}}),
    "ds-combined": ("deepspeed", "zero3", {**TORCH_ADAM, "zero_optimization": {
        "stage3_prefetch_bucket_size": 500_000_000, "stage3_param_persistence_threshold": 10**9}}),
    "ds-deepcompile": ("deepspeed", "zero3", DEEPCOMPILE),
    "ds-mb8": ("deepspeed", "zero3", {}, 8),
    "ds-zero2": ("deepspeed", "zero2", {}),
    "ds-zero2-torch-adamw": ("deepspeed", "zero2", TORCH_ADAM),
    "fsdp2": ("fsdp2", "zero3", {}),
    "fsdp2-mb8": ("fsdp2", "zero3", {}, 8),
    "torch": ("torch", "none", {}),
}


def micro_batch(name: str) -> int:
    v = VARIANTS[name]
    return v[3] if len(v) > 3 else MB


def trainer_for(name: str, model, loss_fn):
    """(Trainer, what optimizer runs) for one variant."""
    import torch

    from shardlab.run.wrap import Trainer, wrap

    framework, sharding, over = VARIANTS[name][:3]
    if framework == "torch":
        model.to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        class Autocast(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    return self.m(x)

        return Trainer("torch", Autocast(model), opt, loss_fn), "torch.optim.AdamW(fused=True)"
    plan = Plan.model_validate({"framework": framework, "sharding": sharding, "precision": "bf16",
                                "micro_batch_size": micro_batch(name), "optimizer": {"name": "adamw", "lr": 1e-4}})
    t = wrap(plan, model, DEVICE, loss_fn, ds_overrides=over)
    inner = getattr(t.optimizer, "optimizer", None)  # DeepSpeed's ZeRO optimizer wraps the one it picked
    return t, type(t.optimizer).__name__ + (f"({type(inner).__name__})" if inner is not None else "")


def run_variant(name: str, args, out: Path) -> dict:
    """Set up one process group, build, wrap and train one variant; its result as a dict."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    from shardlab.run.worker import _prepare_env

    _prepare_env(DEVICE)  # TORCH_CUDA_ARCH_LIST 9.0a -> 9.0 before DeepSpeed JIT-builds FusedAdam
    import torch
    import torch.distributed as dist

    from shardlab.run.data import Batches
    from shardlab.run.gpt import build_model, loss_fn

    if DEVICE == "cuda":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo")
    spec = resolve_model(args.model)
    mb = micro_batch(name)
    model = build_model(spec, seed=0)
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t, opt_name = trainer_for(name, model, loss_fn)
    batches = Batches(seed=0, rank=0, world_size=1, micro_batch_size=mb, grad_accum_steps=1,
                      seq_len=spec.seq_len, vocab=spec.vocab, device=DEVICE)

    def one(step: int) -> float:
        t0 = time.perf_counter()
        x, y = batches(step, 0)
        loss = t.forward(x, y)
        t.backward(loss, 1)
        t.step()
        t.zero_grad()
        loss.item()  # wait for the GPU: the step's time is its work
        return time.perf_counter() - t0

    for s in range(1, args.warmup + 1):
        one(s)
    times = [one(args.warmup + s) for s in range(1, args.steps + 1)]
    step_s = statistics.median(times)
    tokens = mb * spec.seq_len
    res = {"variant": name, "framework": VARIANTS[name][0], "sharding": VARIANTS[name][1],
           "overrides": VARIANTS[name][2], "micro_batch": mb, "optimizer": opt_name, "step_ms": step_s * 1e3,
           "step_ms_all": [round(x * 1e3, 1) for x in times], "tokens_per_s": tokens / step_s,
           "tflops": flops_per_token(spec) * tokens / step_s / 1e12,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    if name in args.profile:
        res.update(profile(name, one, args.warmup + args.steps, out))
    dist.destroy_process_group()
    return res


def profile(name: str, one, done: int, out: Path, steps: int = 3) -> dict:
    """Kernel time per step against the step's wall time, and the costliest host operators."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        wall = sum(one(done + s) for s in range(1, steps + 1))
    ka = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in ka if e.device_type.name == "CUDA")
    n_kernels = sum(e.count for e in ka if e.device_type.name == "CUDA")
    by_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    by_gpu = ka.table(sort_by="self_device_time_total", row_limit=25)
    (out / f"profile_{name}.txt").write_text(f"{name}: {steps} steps, wall {wall * 1e3:.1f} ms\n\n"
                                             f"by self CPU time\n{by_cpu}\n\nby GPU time\n{by_gpu}\n")
    return {"profiled_wall_ms_per_step": wall * 1e3 / steps, "kernel_ms_per_step": kernel_us / 1e3 / steps,
            "gpu_busy": kernel_us / 1e6 / wall, "kernels_per_step": n_kernels / steps}


RESULT = "zero3_gap result: "


def run_child(name: str, args) -> dict:
    """Run one variant in a fresh interpreter; a crash or timeout becomes an error entry."""
    argv = [sys.executable, __file__, "--out", args.out, "--variant", name, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--model", args.model, "--device", args.device,
            "--profile", ",".join(args.profile)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-3:]
    return {"variant": name, "error": f"exit {proc.returncode}: " + " | ".join(tail)[-1000:]}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--only", default=None, help="comma list of variants (default: all): " + ", ".join(VARIANTS))
    ap.add_argument("--profile", default="", help="comma list of variants to profile")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # set for the child process
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    args.profile = [p for p in args.profile.split(",") if p]
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--only: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:  # the child: one variant, its result as the last line of stdout
        print(RESULT + json.dumps(run_variant(args.variant, args, out)), flush=True)
        return 0
    results = []
    for name in names:
        results.append(run_child(name, args))
        print(json.dumps(results[-1]), flush=True)
        (out / "zero3_gap.json").write_text(json.dumps({"device": device_name(), "results": results}, indent=1))
    print(f"\n{'variant':<22}{'optimizer':<40}{'ms/step':>9}{'TFLOPS':>8}{'peak GiB':>9}{'GPU busy':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<22}ERROR {r['error'][:100]}")
            continue
        busy = f"{r['gpu_busy']:.0%}" if "gpu_busy" in r else "-"
        peak = f"{r['peak_allocated_gib']:.2f}" if r["peak_allocated_gib"] is not None else "-"
        print(f"{r['variant']:<22}{r['optimizer']:<40}{r['step_ms']:>9.1f}{r['tflops']:>8.1f}{peak:>9}{busy:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
