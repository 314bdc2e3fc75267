"""`shardlab calibrate`'s measurements on this machine's GPU (about a minute; needs torch + CUDA).

- matmul: torch.mm over a grid of transformer-like shapes in bf16 and fp32 (torch's default fp32,
  no TF32); each shape's efficiency is its measured rate over the rate steptime.py's shape curve
  gives at efficiency 1 (data sheet peak x tile and wave quantization x K/(K+K_HALF)); the median is
  the calibrated `mm_eff`.
- attention: SDPA (causal) forward + backward at four shapes -> `attn_eff` and `attn_t0` (flash FLOPs
  counted as stepwork.py counts them; steptime.attention_eff's curve fitted by `fit_rates`).
- HBM: a 1 GiB copy and an in-place add -> `hbm_eff` (achieved / data sheet).
- host: the runner's model (run/gpt.py) at a size where the GPU's work is negligible, plain and
  wrapped with FSDP2 `fully_shard` on a one-rank group: seconds per counted kernel (`launch_s`) and
  per FSDP unit (`fsdp_unit_s`); and stepped by DeepSpeed ZeRO-3 / ZeRO-2 engines: DeepSpeed's hook
  costs on this host over steptime.py's (`ds3_hook_scale`, `ds12_hook_scale`).
- CPU optimizer: torch's AdamW stepping large fp32 tensors on this host's CPU with every core, as FSDP's
  CPU offload runs it (`torch_cpu_adam_params_per_s`): the host's memory system decides that step, and
  the lent hosts differ (steptime.py, TORCH_CPU_ADAM_PARAMS_PER_S).
"""

from __future__ import annotations

import os
import statistics
import time

MM_SHAPES = [(8192, 2048, 2048), (8192, 2048, 8192), (8192, 8192, 2048), (4096, 4096, 4096), (8192, 4096, 14336),
             (4096, 4096, 32000), (2048, 768, 768), (2048, 768, 3072), (16384, 1024, 1024), (1024, 256, 1024),
             (8192, 768, 50257)]  # the last is unaligned (GPT-2's vocabulary): ALIGN_EFF
MIN_FIT_FLOPS = 2e10  # smaller GEMMs are launch-bound in a Python loop; they inform nothing about the rate
FP32_SHAPES = [(8192, 2048, 2048), (4096, 4096, 4096), (2048, 768, 3072), (8192, 2048, 8192)]
ATTN_SHAPES = [(4, 16, 2048, 128), (1, 32, 4096, 128), (8, 12, 1024, 64), (2, 16, 4096, 64)]


def _time_cuda(fn, reps: int, warm: int = 2) -> float:
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _shape_rate(gpu, m, k, n, precision) -> float:
    import math

    from .steptime import K_HALF, TILE

    tiles = math.ceil(m / TILE) * math.ceil(n / TILE)
    tile_q = (m * n) / (tiles * TILE * TILE)
    wave_q = tiles / (math.ceil(tiles / gpu.sms) * gpu.sms)
    return gpu.peak_tflops(precision) * 1e12 * tile_q * wave_q * k / (k + K_HALF)


def matmuls(gpu) -> dict:
    import torch

    points = []
    for precision, dtype, shapes in (("bf16", torch.bfloat16, MM_SHAPES), ("fp32", torch.float32, FP32_SHAPES)):
        for m, k, n in shapes:
            a, b = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(k, n, device="cuda", dtype=dtype)
            flops = 2.0 * m * k * n
            reps = max(3, min(50, int(2e13 / flops))) if precision == "bf16" else max(2, min(10, int(1e12 / flops)))
            t = _time_cuda(lambda a=a, b=b: torch.mm(a, b), reps)
            e = flops / t / _shape_rate(gpu, m, k, n, precision)
            points.append({"dtype": precision, "m": m, "k": k, "n": n, "tflops": flops / t / 1e12, "eff": e})
            del a, b
    return {"points": points}


def attention(gpu) -> dict:
    import torch
    import torch.nn.functional as F

    from .stepwork import ATTN_BWD_FACTOR

    points = []
    for precision, dtype, shapes in (("bf16", torch.bfloat16, ATTN_SHAPES), ("fp32", torch.float32, ATTN_SHAPES[:1])):
        for b, h, t, hd in shapes:
            q, k, v = (torch.randn(b, h, t, hd, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(b, h, t, hd, device="cuda", dtype=dtype)

            def step(q=q, k=k, v=v, g=g):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                y.backward(g)

            sec = _time_cuda(step, 5 if precision == "bf16" else 2, warm=3)
            flops = 2.0 * b * t * t * h * hd * (1 + ATTN_BWD_FACTOR)
            e = flops / sec / (gpu.peak_tflops(precision) * 1e12)
            points.append({"dtype": precision, "shape": [b, h, t, hd], "tflops": flops / sec / 1e12, "eff": e})
    return {"points": points}


def fit_rates(mm_points: list, attn_points: list) -> dict:
    """Rates from measured points: matmul efficiency = median over aligned GEMMs of at least
    MIN_FIT_FLOPS; ALIGN_EFF from unaligned ones; attention's (A, T0) by least squares in log space
    (the T0 that makes the points' implied A agree best; A their median)."""
    import math

    out: dict = {}
    mm = {}
    for dt in ("bf16", "fp32"):
        pts = [p for p in mm_points if p["dtype"] == dt and 2.0 * p["m"] * p["k"] * p["n"] >= MIN_FIT_FLOPS]
        ok = [p["eff"] for p in pts if not (p["m"] % 8 or p["k"] % 8 or p["n"] % 8)]
        if ok:
            mm[dt] = statistics.median(ok)
        bad = [p["eff"] for p in pts if p["m"] % 8 or p["k"] % 8 or p["n"] % 8]
        if bad and dt == "bf16" and ok:
            out["align_eff"] = statistics.median(bad) / mm[dt]
    if mm:
        out["mm_eff"] = {**mm, "fp16": mm.get("bf16")} if "bf16" in mm else mm
    bf = [p for p in attn_points if p["dtype"] == "bf16"]
    wide = [p for p in bf if p["shape"][3] >= 128]
    if len(wide) >= 2:  # fit the T curve where the head-dim factor is 1; short, narrow heads scatter (0.10-0.18 at T 1024, hd 64)
        bf = wide
    if bf:
        from .steptime import attention_eff

        def implied(p, t0):
            _, _, t, hd = p["shape"]
            return p["eff"] / attention_eff(1.0, t, hd, t0, p["dtype"] != "fp32")

        def spread(t0):
            logs = [math.log(implied(p, t0)) for p in bf]
            mean = sum(logs) / len(logs)
            return sum((x - mean) ** 2 for x in logs)

        t0 = min(range(0, 8001, 25), key=spread)
        attn = {"bf16": statistics.median(implied(p, t0) for p in bf)}
        f32 = [implied(p, t0) for p in attn_points if p["dtype"] == "fp32"]
        if f32:
            attn["fp32"] = statistics.median(f32)
        attn["fp16"] = attn["bf16"]
        out.update(attn_eff=attn, attn_t0=t0)
    return out


def bandwidth(gpu) -> dict:
    import torch

    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    t_copy = _time_cuda(lambda: y.copy_(x), 10)
    t_add = _time_cuda(lambda: y.add_(x), 10)
    bw = statistics.mean([2 * x.nbytes / t_copy, 3 * x.nbytes / t_add])
    return {"hbm_eff": bw / gpu.hbm_bw, "hbm_bytes_per_s": bw}


def host_model():
    """The tiny model host() times (GPU time negligible beside the host's) and its counted work; also
    benchmarks/fsdp_host_probe.py's, which times the same steps on a CPU."""
    from shardlab.models import ModelSpec

    from .stepwork import work

    spec = ModelSpec("calib-host", layers=8, hidden=64, heads=4, vocab=256, seq_len=32)
    return spec, work(spec, 1, spec.seq_len, 2, False)


def launch_seconds(plain_step_s: float, w) -> float:
    """Host seconds per host unit (hostcost.host_units: kernels and modules): the plain step's host time over its
    units plus 40, an allowance for launches stepwork does not count, set when calibrate was written (f4a288e)
    without a measurement named for it."""
    from .hostcost import host_units

    return plain_step_s / (sum(host_units(w)) + 40)


def host(steps: int = 12) -> dict:
    """Host seconds per counted kernel and per FSDP2 unit, from tiny models (GPU time negligible)."""
    import torch

    from shardlab.run.gpt import build_model, loss_fn

    spec, w = host_model()
    tokens = torch.randint(0, spec.vocab, (1, spec.seq_len), device="cuda")

    def per_step(model, opt) -> float:
        def one():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(tokens), tokens)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
        return _seconds_per(one, steps)

    model = build_model(spec, device="cpu").to("cuda")
    plain = per_step(model, torch.optim.AdamW(model.parameters()))
    out = {"plain_step_s": plain, "launch_s": launch_seconds(plain, w)}
    try:
        out.update(_fsdp2_units(spec, per_step, plain, w))
    except Exception as e:  # no process group possible here: keep the default per-unit cost
        out["fsdp_error"] = f"{type(e).__name__}: {e}"
    try:
        out.update(_deepspeed_hooks(spec, tokens, plain, w, out["launch_s"], steps))
    except Exception as e:  # no DeepSpeed here, or it cannot start: DeepSpeed's defaults stay
        out["deepspeed_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def _one_rank_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        # DeepSpeed's engine reads these, as torchrun would set them (it refuses to start without LOCAL_RANK)
        for k in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(k, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        dist.init_process_group("nccl", rank=0, world_size=1)


def _deepspeed_hooks(spec, tokens, plain: float, w, launch_s: float, steps: int) -> dict:
    """DeepSpeed's own host cost on this machine. The same tiny model stepped by a ZeRO-3 and a ZeRO-2
    engine on a one-rank group: the step less the plain step and the per-tensor norm launches, over
    what steptime.py's DeepSpeed constants (measured on other hosts) predict for it, gives
    ds3_hook_scale and ds12_hook_scale. DeepSpeed's hooks are Python, and did not track the kernel
    launch cost from host to host (steptime.py), so they are timed rather than scaled."""
    import deepspeed
    import torch

    from shardlab.run.gpt import build_model, loss_fn

    from .hostcost import DS3_MODULE_S, DS3_PARAM_S, DS12_PARAM_S, DS_NORM_UNITS_PER_PARAM

    _one_rank_group()
    norms = w.param_tensors * DS_NORM_UNITS_PER_PARAM * launch_s
    predicted = {3: w.modules * DS3_MODULE_S + w.param_tensors * DS3_PARAM_S, 2: w.param_tensors * DS12_PARAM_S}
    out = {}
    for stage, key in ((3, "ds3_hook_scale"), (2, "ds12_hook_scale")):
        model = build_model(spec, device="cpu").to("cuda")
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
        def one(engine=engine):  # timed at once, in this iteration
            loss = loss_fn(engine(tokens), tokens)
            engine.backward(loss)
            engine.step()
            loss.item()
        step = _seconds_per(one, steps)
        engine.destroy()
        out[f"deepspeed_zero{stage}_step_s"] = step
        out[key] = min(4.0, max(0.25, (step - plain - norms) / predicted[stage]))
    return out


def _seconds_per(step, steps: int, warm: int = 3) -> float:
    """Host seconds per call of `step` (which ends in a synchronising .item()), after `warm` calls: the
    median of the calls, each timed alone, so a garbage-collector pause or a stall of the lent host in one
    of them does not move the figure (these steps last 10-60 ms; one 20 ms stall in 12 moved the mean 3-6%)."""
    for _ in range(warm):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_adam(numel: int = 2**27, tensors: int = 4, steps: int = 3) -> dict:
    """Parameters per second of torch's AdamW on this host's CPU, the optimizer FSDP's CPU offload steps
    (the runner builds torch.optim.AdamW with its defaults; on CPU tensors torch takes the one-tensor-at-a-
    time path). The tensors are as large as FSDP1's flat parameters (32M fp32 elements each, far beyond any
    cache), the threads as many as the runner gives a one-rank run (launcher.py: cores / world size), so
    the figure is the host's memory system doing the run's own work. About 2 GiB of host memory, ~1-3 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    try:
        params = [torch.full((numel // tensors,), 0.5, requires_grad=True) for _ in range(tensors)]
        for q in params:
            q.grad = torch.full_like(q, 1e-3)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        with torch.no_grad():
            seconds = _seconds_per(opt.step, steps, warm=1)
    finally:
        torch.set_num_threads(threads)
    return {"torch_cpu_adam_params_per_s": numel / seconds, "threads": os.cpu_count()}


def _fsdp2_units(spec, per_step, plain: float, w) -> dict:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from shardlab.run.gpt import build_model

    _one_rank_group()
    model = build_model(spec, device="cpu").to("cuda")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for b in model.blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    step = per_step(model, torch.optim.AdamW(model.parameters()))
    return {"fsdp2_step_s": step, "fsdp_unit_s": max(0.0, step - plain) / w.units}


def collectives(max_gpus: int = 8) -> dict:
    """The collectives between this host's GPUs (collbench.py), where it has two or more; {} where it has one."""
    import torch

    n = min(torch.cuda.device_count(), max_gpus)
    if n < 2:
        return {}
    from .collbench import measure as measure_collectives

    return measure_collectives(n)


def measure(gpu=None) -> dict:
    """Run every measurement on the current CUDA device; return a calibration dict (see calibrate.py)."""
    import torch

    from shardlab.estimate.gpus import gpu_table_name

    from .calibrate import VERSION, key_for
    from .gpus import get_gpu

    name = torch.cuda.get_device_name()
    table = gpu if gpu else gpu_table_name(name)
    if table is None:
        from shardlab.plan import bad_input

        raise bad_input("--gpu", f"this GPU ({name!r}) is not in shardlab's GPU table. Pass --gpu NAME of a table entry with the same data sheet, or register one.")
    g = get_gpu(table)
    t0 = time.perf_counter()
    errors = {}

    def attempt(fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # one failed measurement keeps its default; the file says which
            errors[fn.__name__] = f"{type(e).__name__}: {e}"[:300]
            return {}

    mm, at, bw, hs = attempt(matmuls, g), attempt(attention, g), attempt(bandwidth, g), attempt(host)
    ca = attempt(cpu_adam)
    co = attempt(collectives)
    rates = fit_rates(mm.get("points", []), at.get("points", []))
    rates.update({k: v for k, v in (("hbm_eff", bw.get("hbm_eff")), ("launch_s", hs.get("launch_s")),
                                    ("fsdp_unit_s", hs.get("fsdp_unit_s")), ("ds3_hook_scale", hs.get("ds3_hook_scale")),
                                    ("ds12_hook_scale", hs.get("ds12_hook_scale")),
                                    ("torch_cpu_adam_params_per_s", ca.get("torch_cpu_adam_params_per_s")),
                                    ("nccl_latency_s", (co.get("fit") or {}).get("latency_s")),
                                    ("nccl_bus_bytes_per_s", (co.get("fit") or {}).get("bus_bytes_per_s"))) if v is not None})
    return {"version": VERSION, "key": key_for(g.name),
            "device_name": name, "source": "microbench", "date": time.strftime("%Y-%m-%d"), "rates": rates,
            "microbench": {"matmul": mm.get("points"), "attention": at.get("points"), "hbm_bytes_per_s": bw.get("hbm_bytes_per_s"),
                           "host": hs, "cpu_adam": ca, "collectives": co or None, "errors": errors,
                           "seconds": time.perf_counter() - t0}}
