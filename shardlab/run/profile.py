"""Where one training step's time went, measured: the GPU's busy time and the host's (issue 14).

The step-time model (shardlab/estimate/steptime.py) says how much of a step is the GPU's work and how
much is the host issuing it (Python, autograd, the frameworks' hooks, kernel launches). A step's wall
time alone cannot tell which side a wrong prediction got wrong. `profiled()` runs one step under
torch.profiler and reduces its events to four figures, each comparable with the estimate's own:

- gpu_busy_s: the union of the step's device intervals (kernels, copies, memsets) -- against the
  estimate's compute_s (+ its exposed communication and offload);
- gpu_kernel_s: their sum (above gpu_busy_s where streams overlap);
- host_wait_s: the host's time inside CUDA's synchronising calls (stream, event and device
  synchronize: `.item()`, DeepSpeed's overflow checks and timers, the worker's loss read-back);
- host_busy_s: the step's wall time less host_wait_s, the host's own work -- against the
  estimate's host seconds (time["detail"]["host_s"]);
- launches: the CUDA runtime's launch calls (kernels, async copies and memsets) -- against the
  kernels stepwork.py counts; top_kernels / top_kernel_s: the device kernels that took the most GPU
  time, by name, with their counts and seconds (what the GPU's busy time is made of); top_ops: the most
  frequent CPU operators by name, with their counts (what the launches are);
- gpu_kind_s: every kernel's GPU seconds summed by kind -- matmul, attention, optimizer, other (the
  memory-bound rest: elementwise, norms, copies, the loss) -- against the estimate's matmul_s, attention_s,
  optimizer_s and memory_bound_s.

The profiler adds its own cost per recorded operator to the host side, so step_s here is longer than
an unprofiled step; profile_overhead_s (this step's wall time less the run's median unprofiled step,
filled in by whoever has both) says by how much. On a CPU run there is no device: the GPU figures are
None and the host's wait is 0.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from contextlib import contextmanager

# CUDA runtime calls in which the host waits for the device (what torch's .item(), .cpu() and
# torch.cuda.synchronize() end in; DeepSpeed's timers and overflow checks use the same calls)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP, TOP_NAME = 40, 100  # how many names top_kernels / top_ops keep, and the characters of each
# a kernel's kind from its name (cuBLAS/cuBLASLt's nvjet, cutlass and xmma GEMMs; cuDNN's and FlashAttention's
# fused attention; the optimizers' fused and foreach kernels); a name matching none is "other"
KINDS = (("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|cublas", re.I)),
         ("attention", re.compile(r"sdpa|flash|fmha|attention", re.I)),
         ("optimizer", re.compile(r"adam|multi_tensor_apply|sgd", re.I)))
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
                "cudaMemsetAsync")


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of `intervals` (microseconds, as the profiler gives them)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e6


def kernel_kind(name: str) -> str:
    """matmul, attention, optimizer or other: which of the estimate's GPU terms a kernel's time belongs to."""
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def summarize(events, wall_s: float, device: str) -> dict:
    """The figures of the module docstring from torch.profiler's FunctionEvents of one step."""
    dev, waits, launches = [], 0.0, 0
    kernels: Counter = Counter()
    kernel_s: Counter = Counter()
    kinds: Counter = Counter()
    ops: Counter = Counter()
    for e in events:
        kind = getattr(getattr(e, "device_type", None), "name", "")
        if kind == "CUDA" and getattr(e, "is_user_annotation", False):
            continue  # a record_function range (FSDP::pre_backward, Optimizer.step#...) drawn on the GPU's timeline: not work
        if kind == "CUDA":
            dev.append((e.time_range.start, e.time_range.end))
            took = (e.time_range.end - e.time_range.start) / 1e6
            kernels[e.name[:TOP_NAME]] += 1
            kernel_s[e.name[:TOP_NAME]] += took
            kinds[kernel_kind(e.name)] += took
        elif e.name.startswith(("aten::", "c10d::", "nccl:")):
            ops[e.name[:TOP_NAME]] += 1
        elif e.name in SYNC_CALLS:
            waits += (e.time_range.end - e.time_range.start) / 1e6
        elif e.name in LAUNCH_CALLS:
            launches += 1
    out = {"step_s": wall_s, "host_wait_s": waits, "host_busy_s": max(0.0, wall_s - waits),
           "gpu_busy_s": None, "gpu_kernel_s": None, "launches": launches if device == "cuda" else None,
           "top_ops": dict(ops.most_common(TOP))}
    longest = [name for name, _ in kernel_s.most_common(TOP)]  # the kernels that take the GPU's time, longest first
    out["top_kernels"] = {name: kernels[name] for name in longest}
    out["top_kernel_s"] = {name: kernel_s[name] for name in longest}
    if device == "cuda":
        out["gpu_busy_s"] = _union_s(dev)
        out["gpu_kernel_s"] = sum(b - a for a, b in dev) / 1e6
        out["gpu_kind_s"] = {kind: kinds[kind] for kind in ("matmul", "attention", "optimizer", "other")}
    return out


@contextmanager
def profiled(device: str):
    """Profile the block (one step); the dict yielded is filled with `summarize`'s figures on exit,
    or with {"error": ...} if the profiler could not run here (the step itself still counts)."""
    result: dict = {}
    try:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        prof = profile(activities=acts)
        prof.__enter__()
    except Exception as e:  # noqa: BLE001 - no profiler (CUPTI missing): the step runs unprofiled
        result["error"] = f"{type(e).__name__}: {e}"[:300]
        yield result
        return
    if device == "cuda":
        import torch

        torch.cuda.synchronize()  # the step starts with the device idle, as the worker's steps do
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        try:
            prof.__exit__(None, None, None)
            result.update(summarize(prof.events(), wall, device))
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"[:300]
