"""Step times of the runner's model and wrapper at shapes the step-time model was not fitted to.

In one process (world size 1, a one-rank process group): for each configuration, build the runner's
model (run/gpt.py), wrap it with shardlab's own wrapper (run/wrap.py, as the worker does), train
`--steps` steps with the worker's loop shape (forward, backward, step, zero_grad, loss.item()) and
take the median step period after `--warmup`. FSDP only: DeepSpeed engines leak memory inside one
process and JIT-build FusedAdam; its rows come from the runner matrix (benchmarks/fidelity.py).
Each row is re-estimated uncalibrated and, with --calibration DIR, calibrated.

    bash benchmarks/on_gpu.sh benchmarks/steptime_probe.py --out $OUT/probe [--calibration DIR]
    .venv/bin/python benchmarks/steptime_probe.py --device cpu --only tiny   # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(layers=2, hidden=64, heads=4, vocab=512, seq_len=64),
    "gpt-125m": dict(layers=12, hidden=768, heads=12, vocab=50257, seq_len=2048),
    "llama-1b-128k": dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab=128256, seq_len=4096, family="llama"),
    "llama-3b-128k": dict(layers=28, hidden=3072, heads=24, kv_heads=8, ffn_hidden=8192, vocab=128256, seq_len=4096, family="llama"),
    "gpt-760m": dict(layers=24, hidden=1536, heads=16, vocab=50257, seq_len=2048),
    "gpt-350m": dict(layers=24, hidden=1024, heads=16, vocab=50257, seq_len=1024),
    "llama-wide": dict(layers=8, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=32000, seq_len=2048, family="llama"),
    "gpt-2.5b-aligned": dict(layers=8, hidden=2560, heads=20, vocab=50304, seq_len=2048),
}
# (name, shape, framework, sharding, precision, micro batch, activation checkpointing)
CONFIGS = [
    ("tiny", "tiny", "fsdp2", "zero3", "bf16", 2, False),
    ("gpt125m-mb1", "gpt-125m", "fsdp2", "zero3", "bf16", 1, False),
    ("gpt125m-mb8", "gpt-125m", "fsdp2", "zero3", "bf16", 8, False),
    ("llama1b128k-mb1", "llama-1b-128k", "fsdp2", "zero3", "bf16", 1, False),
    ("llama1b128k-mb2-ac", "llama-1b-128k", "fsdp2", "zero3", "bf16", 2, True),
    ("llama3b128k-mb1", "llama-3b-128k", "fsdp2", "zero3", "bf16", 1, False),
    ("gpt760m-fp32-mb2", "gpt-760m", "fsdp2", "zero3", "fp32", 2, False),
    ("gpt350m-fsdp1-mb8", "gpt-350m", "fsdp1", "zero2", "bf16", 8, False),
    # second probe (after the constants above were fitted): held out for ALIGN_EFF and SERIAL
    ("gpt350m-fsdp2-mb4", "gpt-350m", "fsdp2", "zero3", "bf16", 4, False),
    ("gpt125m-zero2-mb4", "gpt-125m", "fsdp2", "zero2", "bf16", 4, False),
    ("llamawide-mb2", "llama-wide", "fsdp2", "zero3", "bf16", 2, False),
    ("gpt2.5b-fsdp1-ac-mb4", "gpt-2.5b-aligned", "fsdp1", "zero3", "bf16", 4, True),
    ("llama1b128k-fp32-mb1", "llama-1b-128k", "fsdp2", "zero3", "fp32", 1, False),
    ("gpt760m-mb2", "gpt-760m", "fsdp2", "zero3", "bf16", 2, False),
]


def run_one(cfg, device: str, steps: int, warmup: int) -> dict:
    import torch

    from shardlab.models import shape_from_dict
    from shardlab.plan import Plan
    from shardlab.run.gpt import build_model, loss_fn
    from shardlab.run.wrap import wrap

    name, shape, fw, sh, prec, mb, ac = cfg
    spec = shape_from_dict({**SHAPES[shape], "name": shape}, shape)
    plan = Plan(framework=fw, sharding=sh, precision=prec, micro_batch_size=mb, activation_checkpointing=ac)
    model = build_model(spec, device="cpu")  # as the worker: built on the CPU, moved by the wrapper
    t = wrap(plan, model, device, loss_fn)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, spec.vocab, (mb, spec.seq_len + 1), generator=g).to(device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    starts = []
    for _ in range(steps):
        starts.append(time.perf_counter())
        loss = t.forward(inp, tgt)
        t.backward(loss, 1)
        t.step()
        t.zero_grad()
        loss.item()
    starts.append(time.perf_counter())
    periods = [b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1:])]
    step_s = statistics.median(periods)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    del t, model
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"name": name, "model": {**SHAPES[shape], "name": shape}, "plan": plan.model_dump(mode="json"),
            "step_s": step_s, "tokens_per_s": mb * spec.seq_len / step_s, "periods_s": periods, "peak_allocated_bytes": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--calibration", default=None)
    a = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    from shardlab.estimate import estimate

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=0, world_size=1)
    if a.device == "cuda":
        torch.cuda.set_device(0)
    only = set(filter(None, a.only.split(",")))
    gpu = "h200"
    if a.device == "cuda":
        from shardlab.run.worker import gpu_table_name

        gpu = gpu_table_name(torch.cuda.get_device_name()) or gpu
    rows = []
    for cfg in CONFIGS:
        if only and cfg[0] not in only:
            continue
        try:
            r = run_one(cfg, a.device, a.steps, a.warmup)
        except Exception as e:  # an OOM or a wrapper failure is a row, not the end of the probe
            r = {"name": cfg[0], "error": f"{type(e).__name__}: {e}"[:300]}
        if "error" not in r:
            r["predicted_tokens_per_s"] = estimate(r["plan"], r["model"], gpu, calibration=False).time["tokens_per_s"]
            if a.calibration:
                r["predicted_tokens_per_s_calibrated"] = estimate(r["plan"], r["model"], gpu, calibration=a.calibration).time["tokens_per_s"]
        r.update(device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu", torch=torch.__version__,
                 date=time.strftime("%Y-%m-%d"))
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("periods_s", "plan", "model")}), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "steptime_probe.json").write_text(json.dumps(rows, indent=1))
    print(f"{'config':22}{'tok/s':>10}{'pred':>10}{'err':>8}{'pred cal':>10}{'err':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:22} {r['error'][:80]}")
            continue
        m, p, c = r["tokens_per_s"], r["predicted_tokens_per_s"], r.get("predicted_tokens_per_s_calibrated")
        cal = f"{c:>10.0f}{c / m - 1:>+8.1%}" if c else ""
        print(f"{r['name']:22}{m:>10.0f}{p:>10.0f}{p / m - 1:>+8.1%}{cal}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
