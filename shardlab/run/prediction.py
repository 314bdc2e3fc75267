"""The prediction a run is launched with, kept in its folder, and the run reconciled with it.

At launch, `write_prediction` puts RUN_DIR/prediction.json beside the plan: what shardlab's estimator
says this plan costs on this device (tokens/s, step time and its breakdown into compute, exposed
communication, host overhead and offload, the step's phases, memory by category in bytes), and
whether a calibration of this GPU was used. A CUDA run is priced for the GPU NVML names (through
the GPU table); a CPU run for calibrate.CPU_DEVICE, a rough CPU stand-in that `shardlab calibrate
--from-runs` over CPU runs refits. `reconcile(run)` sets the measurement beside the prediction, with
residuals (measured / predicted - 1). The run store reads the file (`Run.prediction`).
"""

from __future__ import annotations

import time
from pathlib import Path

from shardlab.estimate.gpus import DEFAULT_GPU

MEMORY_KEYS = ("params", "grads", "optimizer", "activations", "buffers", "peak_allocated", "total")


def gpu_table_name_nvml(index: int = 0) -> str | None:
    """The GPU-table name of NVML device `index` (no torch import); None without a driver or a match."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    from shardlab.estimate.gpus import gpu_table_name

    return gpu_table_name(name.decode() if isinstance(name, bytes) else str(name))


def predict(plan, model, device: str, gpu: str | None = None) -> dict:
    """The prediction record for `plan` training `model` on `device` ('cuda' with GPU-table name `gpu`, or 'cpu')."""
    from shardlab.estimate import estimate
    from shardlab.estimate.calibrate import CPU_DEVICE, find

    if device == "cpu":
        est = estimate(plan, model, gpu=CPU_DEVICE, calibration=find("cpu") or False)
    else:
        est = estimate(plan, model, gpu=gpu or DEFAULT_GPU)
    t = est.time
    fb = t["step_time_s"] - t["detail"]["optimizer_s"] - t["offload_s"]
    # forward : backward work is about 1 : 2; activation checkpointing recomputes the forward inside backward
    fwd_share = 1 / 4 if est.plan.activation_checkpointing else 1 / 3
    return {
        "version": 1, "created": time.time(), "device": device, "gpu": est.gpu.name,
        "gpu_assumed": device == "cuda" and gpu is None,
        "calibrated": t["calibrated"], "rates_source": t["rates_source"],
        "tokens_per_s": t["tokens_per_s"], "step_time_s": t["step_time_s"], "tokens_per_step": t["tokens_per_step"],
        "breakdown": dict(t["breakdown"]), "detail": dict(t["detail"]),
        "phases": {"forward": fb * fwd_share, "backward": fb * (1 - fwd_share),
                   "optimizer": t["detail"]["optimizer_s"] + t["offload_s"]},
        "memory": {k: est.per_gpu.get(k) for k in MEMORY_KEYS},
        "memory_unit": "bytes per GPU",
    }


def write_prediction(run_dir: str | Path, plan, model, device: str, gpu_index: int | None = 0) -> dict:
    """Write RUN_DIR/prediction.json; never fails the launch (an estimator error is recorded instead)."""
    from shardlab.run.files import RunFiles, write_json_atomic

    try:
        gpu = gpu_table_name_nvml(gpu_index or 0) if device == "cuda" else None
        rec = predict(plan, model, device, gpu)
    except Exception as e:
        rec = {"version": 1, "created": time.time(), "device": device, "error": f"{type(e).__name__}: {e}"[:500]}
    write_json_atomic(RunFiles(Path(run_dir)).prediction, rec)
    return rec


def measured(run) -> dict:
    """tokens/s, step time (median step period after the first step, slowest rank), phases and state
    bytes by category (rank 0, last step) as the run's metrics hold them."""
    m = run.metrics
    out: dict = {}
    if m.empty:
        return out
    periods = run.step_periods(warmup=1)
    if not periods.empty:
        step = float(periods["period_s"].median())
        out.update(step_time_s=step, tokens_per_s=float(periods["tokens"].median()) / step)
    elif "step_time_s" in m:
        out.update(step_time_s=float(m["step_time_s"].median()), tokens_per_s=float(m["tokens_per_s"].median()))
    steady = m[m["step"] > 1] if (m["step"] > 1).any() else m
    if {"t_start", "t_fwd_end", "t_bwd_end", "t_opt_end"} <= set(m.columns):
        out["phases"] = {"forward": float((steady["t_fwd_end"] - steady["t_start"]).median()),
                         "backward": float((steady["t_bwd_end"] - steady["t_fwd_end"]).median()),
                         "optimizer": float((steady["t_opt_end"] - steady["t_bwd_end"]).median())}
    last = m[(m["step"] == m["step"].max()) & (m["rank"] == m["rank"].min())]
    mem = {k: float(last[f"state_bytes.{k}"].iloc[0]) for k in ("params", "grads", "optimizer") if f"state_bytes.{k}" in last and last[f"state_bytes.{k}"].notna().any()}
    if "peak_allocated_bytes" in m and m["peak_allocated_bytes"].notna().any():
        mem["peak_allocated"] = float(m["peak_allocated_bytes"].max())
    out["memory"] = mem
    return out


def _res(meas, pred):
    return meas / pred - 1 if meas is not None and pred else None


def reconcile(run) -> dict:
    """Prediction beside measurement for one run, with residuals (measured / predicted - 1)."""
    pred = run.prediction if hasattr(run, "prediction") else None
    if pred is None or "error" in (pred or {}):
        return {"prediction": pred, "measured": measured(run)}
    meas = measured(run)
    out = {"prediction": pred, "measured": meas,
           "tokens_per_s_residual": _res(meas.get("tokens_per_s"), pred["tokens_per_s"]),
           "step_time_residual": _res(meas.get("step_time_s"), pred["step_time_s"])}
    if "phases" in meas:
        out["phase_residuals"] = {k: _res(meas["phases"][k], pred["phases"].get(k)) for k in meas["phases"]}
    out["memory_residuals"] = {k: _res(v, (pred.get("memory") or {}).get(k)) for k, v in meas.get("memory", {}).items()}
    return out
