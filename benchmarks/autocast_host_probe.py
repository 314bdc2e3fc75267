"""Is calibrate's plain step the step the runner runs? Host seconds and real kernel launches of one tiny step three ways.

`shardlab calibrate` prices a counted kernel from a plain step of a tiny model (estimate/microbench.py's
host(): fp32 weights under torch.autocast(bf16)), and hostcost.DEFAULT_LAUNCH_S comes from that figure on two
lent H200 hosts. No runner path trains that way: FSDP casts its units' parameters to bf16 (MixedPrecision),
DeepSpeed's bf16 engine holds the model in bf16, and neither uses autocast. Autocast adds a cast kernel per
weight per forward (and its backward) and a dispatch step per operator. This probe times, on the GPU host, the
same tiny model (microbench.host_model's, and a Llama of the same size) as

- `autocast`: fp32 weights, autocast bf16 (calibrate's step);
- `bf16`: the model in bf16, no autocast (what DeepSpeed's bf16 engine runs, without its engine);
- `ds_zero1`: DeepSpeed ZeRO-1 bf16 on a one-rank group (the runner's DeepSpeed path, engine included);

each with its host seconds per step (median of 20) and its real launches (torch.profiler's cudaLaunchKernel /
cuLaunchKernel calls in one step), next to the kernels stepwork counts. One JSON line per case.

    bash benchmarks/on_gpu.sh benchmarks/autocast_host_probe.py > $OUT/autocast_host.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def launches(step) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in p.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))


def main() -> int:
    import torch

    from shardlab.estimate.microbench import _one_rank_group, _seconds_per
    from shardlab.estimate.stepwork import work
    from shardlab.models import ModelSpec
    from shardlab.run.gpt import build_model, loss_fn

    specs = [ModelSpec("calib-host", layers=8, hidden=64, heads=4, vocab=256, seq_len=32),
             ModelSpec("calib-host-llama", layers=8, hidden=64, heads=4, vocab=256, seq_len=32, kv_heads=2, ffn_hidden=160, family="llama")]
    for spec in specs:
        w = work(spec, 1, spec.seq_len, 2, False)
        tokens = torch.randint(0, spec.vocab, (1, spec.seq_len), device="cuda")

        def torch_step(model, opt, amp, tokens=tokens):
            def one():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    loss = loss_fn(model(tokens), tokens)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()
            return one

        cases = {}
        m = build_model(spec, device="cpu").to("cuda")
        cases["autocast"] = torch_step(m, torch.optim.AdamW(m.parameters()), True)
        m16 = build_model(spec, device="cpu").to("cuda", torch.bfloat16)
        cases["bf16"] = torch_step(m16, torch.optim.AdamW(m16.parameters()), False)
        try:
            import deepspeed

            _one_rank_group()
            md = build_model(spec, device="cpu").to("cuda")
            cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
                   "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
            engine, *_ = deepspeed.initialize(model=md, optimizer=torch.optim.AdamW(md.parameters()), config=cfg)

            def ds_one(engine=engine, tokens=tokens):
                loss = loss_fn(engine(tokens), tokens)
                engine.backward(loss)
                engine.step()
                loss.item()
            cases["ds_zero1"] = ds_one
        except Exception as e:  # noqa: BLE001 - no DeepSpeed here: the torch cases still answer
            print(json.dumps({"model": spec.name, "case": "ds_zero1", "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
        for name, step in cases.items():
            s = _seconds_per(step, 20)
            n = launches(step)
            print(json.dumps({"model": spec.name, "case": name, "step_s": s, "launches": n, "counted_kernels": w.kernels,
                              "param_tensors": w.param_tensors, "us_per_launch": 1e6 * s / n, "us_per_counted": 1e6 * s / (w.kernels + 40),
                              "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
