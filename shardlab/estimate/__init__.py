"""Estimators: memory, communication, step time and what fits. Pure arithmetic, fast (well under 5 ms).

`estimate(plan, model, gpu="h100-80gb") -> Estimate`; `Estimate.to_dict()` is DESIGN.md's JSON
contract (bytes everywhere), `Estimate.summary()` the human table (GiB = 2^30 bytes, labelled).
What each figure counts is documented in memory.py (per-GPU, CPU, NVMe), comm.py (wire bytes for
time vs payload bytes as the runner counts collectives) and steptime.py (time, TFLOPS, MFU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardlab.models import ModelSpec, resolve_model
from shardlab.plan import Plan, load_plan
from shardlab.units import GB, GIB, MIB  # noqa: F401  (GB: estimate.GB stays importable)

from .basis import resolve
from .comm import comm
from .gpus import DEFAULT_GPU, GPU, GPUS, get_gpu, register_gpu
from .memory import memory
from .steptime import BARE_SEQ_LEN, step_time

__all__ = ["Estimate", "estimate", "GPU", "GPUS", "get_gpu", "register_gpu"]


@dataclass
class Estimate:
    """One plan's predicted memory, communication and speed on one GPU kind (all bytes)."""

    plan: Plan
    model: ModelSpec
    gpu: GPU
    per_gpu: dict
    cpu: dict
    nvme: dict
    comm_per_step: dict
    comm_payload_per_step: dict
    time: dict
    notes: dict = field(default_factory=dict)
    flags: list = field(default_factory=list)

    @property
    def fit(self) -> dict:
        """The memory verdict (allocator.fit: "fits" | "tight" | "does not fit", with its figures)."""
        from .allocator import fit

        return fit(self.per_gpu["peak_allocated"], self.gpu)

    @property
    def fits(self) -> bool:
        """Fits by the estimate ("fits" or "tight"): the one rule tune, the widgets and fits.py use."""
        return self.fit["verdict"] != "does not fit"

    @property
    def headroom_bytes(self) -> int:
        return self.fit["headroom_bytes"]

    def to_dict(self) -> dict:
        p = self.plan
        return {
            "model": {"name": self.model.name, "params": self.model.params, "bare": self.model.is_bare},
            "gpu": self.gpu.name,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "plan": {"framework": p.framework, "sharding": p.sharding, "precision": p.precision,
                     "world_size": p.world_size, "nodes": p.topology.nodes, "micro_batch_size": p.micro_batch_size,
                     "grad_accum_steps": p.grad_accum_steps},
            "per_gpu": dict(self.per_gpu),
            "cpu": dict(self.cpu),
            "nvme": self.nvme["total"],
            "nvme_detail": dict(self.nvme),
            "comm_per_step": dict(self.comm_per_step),
            "comm_payload_per_step": dict(self.comm_payload_per_step),
            "step_time_s": self.time["step_time_s"],
            "tokens_per_s": self.time["tokens_per_s"],
            "tokens_per_s_global": self.time["tokens_per_s_global"],
            "tflops": self.time["tflops"],
            "mfu": self.time["mfu"],
            "time": dict(self.time),
            "step_breakdown": dict(self.time["breakdown"]),
            "calibrated": self.time["calibrated"],
            "fits": self.fits,
            "fit": self.fit,
            "headroom_bytes": self.headroom_bytes,
            "labels": {"memory": "bytes per GPU (cpu, nvme: bytes per node)", "comm_per_step":
                       "wire bytes per GPU per optimizer step (ring factor)", "comm_payload_per_step":
                       "tensor bytes passed to collectives per GPU per optimizer step", "tokens_per_s": "per GPU"},
            "method": getattr(self, "method", "analytic"),
            "trace": getattr(self, "trace", None),
            "notes": dict(self.notes),
            "flags": list(self.flags),
        }

    def summary(self) -> str:
        p, m = self.plan, self.model
        # small models read better in MiB; the unit is always named
        big = max(self.per_gpu[k] for k in ("params", "grads", "optimizer", "activations", "buffers")) >= GIB
        unit, div = ("GiB", GIB) if big else ("MiB", MIB)
        gib = lambda b: f"{b / div:9.2f} {unit}"  # noqa: E731
        lines = [f"{m.name} ({m.params:,} params) | {p.framework} {p.sharding} {p.precision} | "
                 f"{p.topology.nodes} node(s) x {p.topology.gpus_per_node} {self.gpu.name}",
                 "", f"Memory per GPU ({unit} = 2^{30 if big else 20} bytes)"]
        for k in ("params", "grads", "optimizer", "activations", "buffers", "step_buffers", "overhead"):
            lines.append(f"  {k:<13}{gib(self.per_gpu[k])}   {self.notes.get(k, '')}")
        lines.append(f"  {'peak alloc':<13}{gib(self.per_gpu['peak_allocated'])}   {'traced (one fake-tensor step)' if getattr(self, 'method', 'analytic') == 'trace' else 'analytical'}; caching allocator reserves ~{self.per_gpu['peak_reserved'] / GIB:.2f} GiB on this GPU (at its limit it gives its cache back rather than reserve more)"
                     + (f": {self.notes['peak_reserved']}" if self.notes.get("peak_reserved") else ""))
        if self.notes.get("trace"):
            lines.append(f"  trace: {self.notes['trace']}")
        cap, f = self.gpu.memory_bytes, self.fit
        verdict = {"fits": "fits", "tight": "TIGHT", "does not fit": "DOES NOT FIT"}[f["verdict"]]
        lines.append(f"  {'total':<13}{self.per_gpu['total'] / GIB:9.2f} GiB   of {cap / GIB:.1f} GiB: {verdict} "
                     f"(headroom {self.headroom_bytes / GIB:.2f} GiB)")
        lines.append(f"  {'':<13}{f['why']}")
        if self.cpu["total"] or self.nvme["total"]:
            lines.append(f"  CPU RAM per node {self.cpu['total'] / GIB:.2f} GiB, NVMe per node {self.nvme['total'] / GIB:.2f} GiB")
        c = self.comm_per_step
        cu, cd = ("GB", GB) if c["total"] >= GB else ("MB", 10**6)
        lines += ["", f"Communication per GPU per optimizer step (wire bytes with the ring factor; {cu} = 10^{9 if cu == 'GB' else 6} bytes)"]
        for k, v in c.items():
            if v and k not in ("intra_node", "inter_node", "total"):
                lines.append(f"  {k:<22}{v / cd:10.3f} {cu}")
        lines.append(f"  intra-node {c['intra_node'] / cd:.3f} {cu}, inter-node {c['inter_node'] / cd:.3f} {cu}, total {c['total'] / cd:.3f} {cu}")
        lines.append(f"  tensor bytes passed to collectives (as the runner counts): {self.comm_payload_per_step['total'] / cd:.3f} {cu}")
        t = self.time
        seq_note = f" (bare count: assumes {BARE_SEQ_LEN}-token sequences)" if m.is_bare else ""
        cal = "calibrated: " + t["rates_source"] if t["calibrated"] else "uncalibrated: GPU table data sheet and default efficiencies"
        lines += ["", f"Step time {t['step_time_s'] * 1e3:.1f} ms (compute {t['compute_s'] * 1e3:.1f}, host overhead "
                  f"{t['host_overhead_s'] * 1e3:.1f}, exposed comm {t['exposed_comm_s'] * 1e3:.1f}, offload {t['offload_s'] * 1e3:.1f}){seq_note}",
                  *([f"  of the host overhead, {t['detail']['allocator_flush_s'] * 1e3:.1f} ms: at the GPU's memory limit the caching "
                     "allocator gives its cache back and makes it again every step (stepsim.capped_churn)"]
                    if t["detail"].get("allocator_flush_s") else []),
                  f"  {cal}",
                  f"  {t['tokens_per_s']:,.0f} tokens/s per GPU, {t['tflops']:.0f} TFLOPS per GPU, MFU {t['mfu']:.1%}",
                  *(["  (MFU over 100%: model FLOPs count attention's whole T x T score matrix, as torchtitan does, while a "
                     "causal kernel computes half of it; at this sequence length attention is most of the work)"]
                    if t["mfu"] > 1 else [])]
        lines += [f"note: {f}" for f in self.flags]
        return "\n".join(lines)


def _traced(plan: Plan, s, model, gpu) -> dict:
    """memory() with the traced peak (trace.py) in place of the formulas it replaces."""
    from .allocator import CUDA_CONTEXT_BYTES, allocator_limit, on_gpu, reserved, stranded
    from .memory import cublas_workspaces
    from .trace import traced_memory

    t = traced_memory(plan, model)
    if t["traced"] == "activations":  # DeepSpeed, FSDP offload: traced working set + analytical states and buffers
        mem = memory(plan, s, traced_activations=t["peak"], gpu=gpu)
        whose = ("DeepSpeed states, buffers and step temporaries" if plan.framework == "deepspeed" else
                 "FSDP's states (offloaded to the CPU: not told apart on a fake device), gathered units and step temporaries")
        what = f"forward/backward working set traced; {whose} analytical; reserved: the analytical allocator model on that peak"
    else:
        mem = memory(plan, s, gpu=gpu)
        g = mem["per_gpu"]
        peak = t["peak"] + cublas_workspaces(gpu)  # a fake-tensor step runs no cuBLAS
        # reserved: the traced step's own requests replayed through the caching allocator's rules
        # (cachesim.py), + the workspaces (segments of their own)
        resv = t["reserved"] + cublas_workspaces(gpu) if t.get("reserved") else reserved(peak)
        g["peak_allocated"], g["peak_reserved"] = peak, on_gpu(resv, peak, allocator_limit(gpu))  # what that GPU shows
        mem["notes"]["peak_reserved"] = "the traced step's own requests replayed through the caching allocator's rules (cachesim.py)"
        g["overhead"] = CUDA_CONTEXT_BYTES + stranded(peak)
        g["total"] = peak + g["overhead"]
        what = ("whole step traced (wrapping, states, buffers, activations, optimizer step) + the cuBLAS workspaces; reserved: the"
                " step's requests replayed through the caching allocator's rules on their streams (cachesim.py); the category rows above are analytical")
    at = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in t["at_peak"].items())
    mem["notes"]["trace"] = f"{what}; traced peak {t['peak'] / GIB:.2f} GiB ({at})"
    mem["trace"] = t
    return mem


def estimate(plan, model, gpu: str | GPU | dict = DEFAULT_GPU, method: str = "analytic", *, calibration=None,
             rates=None) -> Estimate:
    """Predict memory, communication and step time for `plan` (a Plan or anything load_plan takes)
    training `model` (anything resolve_model takes: preset, shape file/dict, bare count, nn.Module).

    method="analytic" (default): arithmetic, well under 5 ms. method="trace": one real training step
    on fake tensors (estimate/trace.py; seconds, no GPU) gives peak_allocated; FSDP1/FSDP2 are traced
    whole, DeepSpeed's forward/backward working set is traced and its states stay analytical
    (`notes["trace"]` says which). For a trace, `model` may also be {"module": zero-argument callable
    returning an nn.Module mapping token ids [B, T] to logits [B, T, vocab] (e.g. a Hugging Face
    model from its config), "spec": a shape (preset, dict or ModelSpec) with its vocab and seq_len}.

    calibration: None uses this machine's calibration for `gpu` if `shardlab calibrate` made one
    (estimate/calibrate.py), False ignores it, a path or dict names one. rates: explicit steptime.Rates.
    """
    plan = load_plan(plan)  # a Plan with errors (e.g. micro_batch_size=0) is bad input, not arithmetic
    if method not in ("analytic", "trace"):
        from shardlab.plan import bad_input

        raise bad_input("method", f"method={method!r} is not an estimate method. Use 'analytic' (arithmetic, instant) or 'trace' (one fake-tensor step, seconds).")
    user_module = isinstance(model, dict) and "module" in model
    spec = resolve_model(model["spec"] if user_module else model)
    g = get_gpu(gpu)
    s = resolve(plan, spec)
    if method == "analytic":
        mem = memory(plan, s, gpu=g)
    elif user_module:
        mem = _traced(plan, s, model, g)
    elif spec.source:  # a Hugging Face config or a factory (shardlab.usermodel): build that model, fake
        from shardlab.usermodel import resolve as resolve_source
        from shardlab.usermodel import with_wrap_class

        # wrapped as a run wraps it: the model's own block class, not shardlab's GPT "Block"
        mem = _traced(with_wrap_class(plan, spec), s, resolve_source(spec.source).for_trace(), g)
    else:
        mem = _traced(plan, s, spec, g)
    c = comm(plan, s)
    if rates is None:
        from .calibrate import rates_for

        rates = rates_for(g, calibration)
    t = step_time(plan, s, g, c["wire"], rates)
    notes = dict(mem["notes"])
    if c["notes"]:
        notes["comm"] = "; ".join(c["notes"])
    flags = list(mem["flags"])
    if s.ds and s.stage == "zero3":
        flags.append("DeepSpeed ZeRO-3 figures are the steady state (from the second step, once the module trace is recorded)")
    e = Estimate(plan, spec, g, mem["per_gpu"], mem["cpu"], mem["nvme"], c["wire"], c["payload"], t, notes, flags)
    e.method, e.trace = method, mem.get("trace")
    return e
