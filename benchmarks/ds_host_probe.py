"""Where a DeepSpeed step's host time goes on this machine, and how fast its CPU optimizer runs (issue 14).

Two measurements the step-time model (shardlab/estimate/steptime.py) rests on, made on a lent GPU host:

1. ZeRO-3 host/GPU overlap. One shardlab model stepped by DeepSpeed ZeRO-3 (world size 1, the config
   shardlab's runner uses) under torch.profiler: step time, the GPU's kernel time, and every host
   synchronisation (cudaStreamSynchronize / cudaEventSynchronize / cudaDeviceSynchronize) with the Python
   frame that made it. If step ~ host + GPU, the host waits for the GPU's work inside the step.
2. DeepSpeed CPU Adam (optimizer offload) parameters per second at several OpenMP thread counts, in fresh
   processes (OpenMP reads OMP_NUM_THREADS once), next to the host's core counts (os.cpu_count() vs the
   affinity mask) and its memory bandwidth (a large tensor copy).

    bash benchmarks/on_gpu.sh benchmarks/ds_host_probe.py [--params 1.03e9] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def host_info() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "omp_env": os.environ.get("OMP_NUM_THREADS")}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    x = torch.empty(2**28, dtype=torch.float32)  # 1 GiB
    x.fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    info["cpu_copy_bytes_per_s"] = 2 * x.nbytes * 5 / (time.perf_counter() - t0)
    return info


def cpu_adam_child(n: int) -> None:
    """Runs in a fresh process: DeepSpeedCPUAdam over n fp32 parameters, seconds per step."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float32))
    p.grad = torch.full_like(p, 1e-3)
    opt = DeepSpeedCPUAdam([p], lr=1e-4)
    opt.step()
    t0 = time.perf_counter()
    for _ in range(3):
        opt.step()
    dt = (time.perf_counter() - t0) / 3
    t1 = time.perf_counter()
    torch.optim.AdamW([p], lr=1e-4, foreach=True).step()
    tt = time.perf_counter() - t1
    print(json.dumps({"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), "step_s": dt,
                      "params_per_s": n / dt, "torch_adamw_first_step_s": tt}))


def cpu_adam(n: int, threads: list[int]) -> list[dict]:
    out = []
    for t in threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(t)}
        r = subprocess.run([sys.executable, __file__, "--child", str(n)], env=env, capture_output=True, text=True, timeout=400)
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        out.append(json.loads(line[-1]) if line else {"threads": t, "error": (r.stderr or r.stdout)[-600:]})
        print("cpu adam", out[-1], flush=True)
    return out


def zero3_overlap(model: dict, mb: int, steps: int = 6) -> dict:
    import deepspeed
    import torch

    from shardlab.estimate.microbench import _one_rank_group
    from shardlab.frameworks.deepspeed import ds_config
    from shardlab.models import resolve_model
    from shardlab.plan import Plan
    from shardlab.run.gpt import build_model, loss_fn

    _one_rank_group()
    spec = resolve_model(model)
    plan = Plan(framework="deepspeed", sharding="zero3", micro_batch_size=mb)
    m = build_model(spec, device="cpu").to("cuda")
    engine, *_ = deepspeed.initialize(model=m, model_parameters=list(m.parameters()), config=ds_config(plan, "cuda"))
    tok = torch.randint(0, spec.vocab, (mb, spec.seq_len), device="cuda")

    def one():
        loss = loss_fn(engine(tok), tok)
        engine.backward(loss)
        engine.step()
        return loss.item()

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    step_s = (time.perf_counter() - t0) / steps
    out = {"model": spec.name, "mb": mb, "step_s": step_s}
    try:
        out.update(_profiled(one))
    except Exception as e:  # the timing above still counts
        out["profile_error"] = f"{type(e).__name__}: {e}"[:400]
    engine.destroy()
    return out


def _profiled(one) -> dict:
    """Two steps under torch.profiler: kernel seconds per step and each synchronisation's calls and origin."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(2):
            one()
    kernel_us = sum(e.self_device_time_total for e in prof.events() if getattr(e.device_type, "name", "") == "CUDA")
    syncs = {}
    for e in prof.key_averages(group_by_stack_n=8):
        if "Synchronize" in e.key:
            where = " <- ".join(s for s in e.stack if "site-packages/torch/" not in s)[:400]
            syncs[f"{e.key} @ {where}"] = {"calls_per_step": e.count / 2, "host_ms_per_step": e.cpu_time_total / 2e3}
    return {"gpu_kernel_s": kernel_us / 2e6, "syncs": syncs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", type=int, default=None)
    ap.add_argument("--params", type=float, default=1.03e9)
    ap.add_argument("--threads", default="1,4,8,16")
    ap.add_argument("--skip-adam", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.child:
        cpu_adam_child(a.child)
        return 0
    from shardlab.export.launch import sanitize_arch_list

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):  # "9.0a" on the Hopper image: DeepSpeed's op builder cannot parse it
        os.environ["TORCH_CUDA_ARCH_LIST"] = sanitize_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    out = {"host": host_info()}
    print("host", out["host"], flush=True)
    llamawide6 = {"name": "llamawide6", "family": "llama", "layers": 6, "hidden": 3072, "heads": 24, "kv_heads": 8,
                  "ffn_hidden": 8192, "vocab": 32000, "seq_len": 4096}  # benchmarks/fidelity.py's
    out["zero3"] = []
    for model, mb in ((llamawide6, 1), ("gpt-1b", 4)):
        try:
            r = zero3_overlap(model, mb)
        except Exception as e:  # report and go on to the CPU optimizer
            r = {"model": str(model)[:40], "error": f"{type(e).__name__}: {e}"[:400]}
        out["zero3"].append(r)
        print("zero3", json.dumps(r, indent=1), flush=True)
    if not a.skip_adam:
        out["cpu_adam"] = cpu_adam(int(a.params), [int(t) for t in a.threads.split(",")] + [os.cpu_count() or 1])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
