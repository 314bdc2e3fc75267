"""Calibration of the step-time model: a file of measured rates for one GPU kind and software stack.

`shardlab calibrate` (microbench.py) measures, on this machine's GPU, matmul rates over a grid of
shapes and dtypes, flash attention, HBM bandwidth and the host's cost of a few framework steps, and
saves them as JSON keyed by the GPU's table name + torch + DeepSpeed versions. Every later estimate
for that GPU in that software stack uses it (`rates_for`); without one, steptime.py's documented
defaults apply and the estimate says "uncalibrated". `shardlab calibrate --from-runs DIR...` refits
two multipliers (the GPU's work and the host's) from runs already in the store, so predictions
move toward what this machine measured.

Where: $SHARDLAB_CALIBRATION_DIR, else ~/.cache/shardlab/calibration (a `--calibration-dir` flag
overrides both). One file per key: `<gpu>__torch-<v>__deepspeed-<v>.json`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from functools import lru_cache
from pathlib import Path

from shardlab.units import GIB

from .gpus import DEFAULT_GPU, GPU
from .hostcost import DEFAULT_LAUNCH_S
from .steptime import Rates

ENV_DIR = "SHARDLAB_CALIBRATION_DIR"
VERSION = 1


def calibration_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "shardlab" / "calibration"


_VERSIONS: dict[str, str | None] = {}


def installed_version(dist: str) -> str | None:
    """A distribution's installed version without importing it (torch stays unimported)."""
    if dist not in _VERSIONS:
        from importlib.metadata import PackageNotFoundError, version

        try:
            _VERSIONS[dist] = version(dist)
        except PackageNotFoundError:
            _VERSIONS[dist] = None
    return _VERSIONS[dist]


def key_for(gpu_name: str, torch_v: str | None = None, ds_v: str | None = None) -> dict:
    return {"gpu": gpu_name, "torch": torch_v if torch_v is not None else installed_version("torch"),
            "deepspeed": ds_v if ds_v is not None else installed_version("deepspeed")}


def file_name(key: dict) -> str:
    clean = lambda v: str(v).replace("/", "_").replace(" ", "_")  # noqa: E731
    return f"{clean(key['gpu'])}__torch-{clean(key['torch'])}__deepspeed-{clean(key['deepspeed'])}.json"


def save(cal: dict, directory: str | Path | None = None) -> Path:
    d = calibration_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / file_name(cal["key"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cal, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def load(path: str | Path) -> dict:
    from shardlab.plan import bad_input
    from shardlab.safe_input import label, load_json, read_file

    text = read_file(path, "calibration file")  # regular files only, bounded size (safe_input)
    try:
        cal = load_json(text, str(path))
    except (ValueError, RecursionError) as e:
        raise bad_input("calibration", f"calibration={label(str(path))} could not be read as JSON ({label(str(e))}). Give a file written by `shardlab calibrate`, or none.") from None
    if not isinstance(cal, dict) or not isinstance(cal.get("key"), dict) or not _rates_ok(cal.get("rates")):
        raise bad_input("calibration", f"calibration={label(str(path))} is not a shardlab calibration (a 'key' mapping and 'rates' of finite positive numbers). Run `shardlab calibrate` to make one.")
    return cal


def _rates_ok(rates) -> bool:
    import math

    def num(v) -> bool:  # every rate is an efficiency, a time, a rate or a scale: finite and above zero
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    return isinstance(rates, dict) and all(
        num(v) or (isinstance(v, dict) and all(isinstance(k, str) and num(x) for k, x in v.items())) for v in rates.values())


_CACHE: dict[tuple, tuple[float, dict | None]] = {}


def find(gpu_name: str, directory: str | Path | None = None) -> dict | None:
    """The calibration for `gpu_name` in this software stack, or None (cached on the file's mtime)."""
    path = calibration_dir(directory) / file_name(key_for(gpu_name))
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    ck = (str(path),)
    got = _CACHE.get(ck)
    if got is not None and got[0] == mtime:
        return got[1]
    try:
        cal = load(path)
    except Exception:  # an unreadable file is no calibration; `shardlab calibrate` rewrites it
        cal = None
    _CACHE[ck] = (mtime, cal)
    return cal


# The micro-benchmark's host timings (steps of an 8-layer, 64-wide model): the host unit (launch_s) is applied, the
# FSDP2 unit and DeepSpeed's hook scales are recorded only.
# - The host unit is applied since session 20, recomputed from the timed plain step (microbench.host.plain_step_s) in
#   today's units (microbench.launch_seconds; the files written before session 18's host_units hold launch_s per
#   kernel). Session 20 ran seven of its unseen rows on two machines whose calibrate timed 39.6 and 26.3 us per unit:
#   the rows ran 1.19-1.55x faster on the second (#1308 79,803 -> 123,649 tokens/s), the probe said 1.51x. Over the
#   206 recorded rows with a calibration of their own machine (23 machines, benchmarks/steptime_accuracy.py), applying
#   it moved the calibrated median from 10.8% to 9.8%, rows over 25% from 17 to 11 and over 15% from 64 to 60; five
#   machines improved by 4.3-11.7 points of median (new3, new6, new6b, new6c, new7c), one moved the other way by
#   3.6 points (val: its probe timed 0.75x the default while its rows ran at the default: #302 +23.1% -> +43.4%).
# - Not applied (APPLY_MICROBENCH_HOST): the FSDP2 unit and DeepSpeed's hook scales. On the six recorded machines of
#   session 7, applying every host timing moved the real steps away from their measurements (median 13.5% with the
#   GPU rates alone, 15.8% with the host timings too, 12.6% with neither); e.g. the held-out host timed DeepSpeed
#   ZeRO-2's hooks at 1.44x the constants while its ZeRO-1/2 steps ran faster than the constants predict (#504, #508).
#   Session 11 tried the two FSDP2 timings as one factor on all host time (benchmarks/host_population.py --index):
#   machine s6b's rows went 12.3 -> 16.4%. `calibrate --from-runs` (host_fit, gpu_scale) fits the host from real steps.
APPLY_MICROBENCH_HOST = False


def _host_unit_s(cal: dict) -> float | None:
    """Seconds per host unit from a calibration's timed plain step, in today's units (None: not timed)."""
    plain = ((cal.get("microbench") or {}).get("host") or {}).get("plain_step_s")
    return _launch_from_plain(float(plain)) if isinstance(plain, (int, float)) and plain > 0 else None


@lru_cache(maxsize=64)
def _launch_from_plain(plain_step_s: float) -> float:
    from .microbench import host_model, launch_seconds

    return launch_seconds(plain_step_s, host_model()[1])


def rates_from(cal: dict, where: str = "") -> Rates:
    r = cal["rates"]
    base = Rates()
    host = r if APPLY_MICROBENCH_HOST else {}
    unit = _host_unit_s(cal)
    if unit is not None:
        host = {**host, "launch_s": unit}
    return base.with_(
        mm_eff={**base.mm_eff, **r.get("mm_eff", {})}, attn_eff={**base.attn_eff, **r.get("attn_eff", {})},
        hbm_eff=r.get("hbm_eff", base.hbm_eff), attn_t0=r.get("attn_t0", base.attn_t0),
        align_eff=r.get("align_eff", base.align_eff), launch_s=host.get("launch_s", base.launch_s),
        fsdp_unit_s=host.get("fsdp_unit_s", base.fsdp_unit_s),
        gpu_scale=r.get("gpu_scale", 1.0), host_fit=r.get("host_fit", 1.0), calibrated=True,
        ds3_hook_scale=host.get("ds3_hook_scale", 1.0), ds12_hook_scale=host.get("ds12_hook_scale", 1.0),
        torch_cpu_adam=r.get("torch_cpu_adam_params_per_s"),
        nccl_latency_s=r.get("nccl_latency_s"), nccl_bus_bytes_per_s=r.get("nccl_bus_bytes_per_s"),
        source=f"calibration {cal['key'].get('gpu')} ({cal.get('source', 'microbench')}, {cal.get('date', '?')}){' ' + where if where else ''}")


def rates_for(gpu: GPU, calibration=None) -> Rates:
    """Rates for an estimate: calibration=False -> defaults; a dict or a path -> that calibration;
    None (or True) -> this machine's calibration for `gpu` if one exists; anything else is bad input."""
    if calibration is False:
        return Rates()
    if not (calibration is None or calibration is True or isinstance(calibration, (dict, str, Path))):
        from shardlab.plan import bad_input
        from shardlab.safe_input import short

        # (calibration=3 was ignored: the machine's own calibration applied, silently)
        raise bad_input("calibration", f"calibration={short(calibration)} is not a calibration. Give a file or folder written by "
                        "`shardlab calibrate`, its contents as a dict, None / True (this machine's, if any) or False (none).")
    if isinstance(calibration, dict):
        if not isinstance(calibration.get("key"), dict) or not _rates_ok(calibration.get("rates")):
            from shardlab.plan import bad_input

            raise bad_input("calibration", "this dict is not a shardlab calibration (a 'key' mapping and 'rates' of finite positive "
                            "numbers, as `shardlab calibrate` writes). Pass a file or folder it wrote, its contents, or False (none).")
        return rates_from(calibration)
    if isinstance(calibration, (str, Path)):
        from shardlab.plan import bad_input
        from shardlab.safe_input import is_existing_file, label

        p = Path(calibration)
        if not is_existing_file(str(p)):
            raise bad_input("calibration", f"calibration={label(str(p))}: no such file or folder. Give a file or folder written by `shardlab calibrate`, or none.")
        cal = find(gpu.name, p) if p.is_dir() else load(p)
        return rates_from(cal, str(p)) if cal else Rates()
    cal = find(gpu.name)
    return rates_from(cal) if cal else Rates()


# ---------------------------------------------------------------------------------------------
# --from-runs: refit the GPU-work and host multipliers from measured step times


def run_observation(run) -> dict | None:
    """(plan, model, device, measured step seconds) of a completed run, or None if it cannot say."""
    from shardlab.models import resolve_model

    if run.status != "completed":
        return None
    try:
        periods = run.step_periods(warmup=1)
        m = run.metrics
    except Exception:
        return None
    if periods.empty and (m.empty or "step_time_s" not in m):
        return None
    measured = float(periods["period_s"].median()) if not periods.empty else float(m["step_time_s"].median())
    cfg = run.config
    try:
        spec = resolve_model(cfg.get("model", run.info.get("model")))
    except Exception:
        return None
    device = _device_name(run, m)
    return {"plan": run.plan, "model": spec, "device": device, "measured_s": measured, "dir": str(run.dir)}


def _device_name(run, m) -> str:
    """'cpu', or the GPU-table name the worker's start event recorded (else the prediction's GPU)."""
    if run.info.get("device") == "cpu" or run.config.get("device") == "cpu":
        return "cpu"
    try:
        ev = run.events
        starts = ev[(ev["event"] == "start") & ev["gpu"].notna()] if "gpu" in ev else []
        if len(starts):
            return str(starts["gpu"].iloc[0])
    except Exception:
        pass
    return str((run.prediction or {}).get("gpu") or DEFAULT_GPU)


def fit_from_runs(observations: list[dict], gpu: GPU, base: Rates | None = None) -> dict:
    """Least squares in log space for (gpu_scale, host_fit): the prediction of each run is
    max(g·G, h·H) + serial·min(..) + the rest; a grid over both multipliers (0.25x-8x) is enough and
    never diverges. With a single run only one overall factor can be told apart: both move together."""
    from shardlab.estimate import estimate

    base = base or Rates()
    if not observations:
        from shardlab.plan import bad_input

        raise bad_input("--from-runs", "no completed run with step times was found. Give run folders (or the store's folder) holding completed runs.")
    grid = [2 ** (i / 8) for i in range(-16, 25)]

    def err(g: float, h: float) -> float:
        r = base.with_(gpu_scale=base.gpu_scale * g, host_fit=base.host_fit * h)
        e = 0.0
        for o in observations:
            pred = estimate(o["plan"], o["model"], gpu=gpu, rates=r).time["step_time_s"]
            e += math.log(pred / o["measured_s"]) ** 2
        return e

    if len(observations) == 1:
        best = min(((err(s, s), s, s) for s in grid))
    else:
        best = min(((err(g, h), g, h) for g in grid[::2] for h in grid[::2]))
        _, g0, h0 = best
        fine = [2 ** (i / 16) for i in range(-2, 3)]
        best = min(((err(g0 * a, h0 * b), g0 * a, h0 * b) for a in fine for b in fine))
    before = err(1.0, 1.0)
    _, g, h = best
    return {"gpu_scale": base.gpu_scale * g, "host_fit": base.host_fit * h,
            "rms_log_error_before": math.sqrt(before / len(observations)),
            "rms_log_error_after": math.sqrt(best[0] / len(observations))}


def calibrate_from_runs(run_dirs: list[str | Path], gpu: GPU | str | None = None, directory=None, write: bool = True) -> dict:
    """Refit from run folders (each a run, or a store holding runs); save per device; return a summary."""
    from shardlab.run.store import runs_in


    runs = runs_in(run_dirs)
    obs = [o for o in (run_observation(r) for r in runs) if o]
    by_device: dict[str, list[dict]] = {}
    for o in obs:
        by_device.setdefault(str(gpu.name if isinstance(gpu, GPU) else gpu or o["device"]), []).append(o)
    out = {"runs_read": len(runs), "runs_used": len(obs), "calibrations": []}
    for dev, group in by_device.items():
        g = device_gpu(dev) if not isinstance(gpu, GPU) else gpu
        prior = find(g.name, directory)
        base = rates_from(prior) if prior else Rates()
        fit = fit_from_runs(group, g, base)
        cal = {"version": VERSION, "key": key_for(g.name), "source": "runs", "date": time.strftime("%Y-%m-%d"),
               "rates": {**(prior or {}).get("rates", {}), "gpu_scale": fit["gpu_scale"], "host_fit": fit["host_fit"]},
               "fit": {**fit, "runs": [o["dir"] for o in group], "median_measured_s": statistics.median(o["measured_s"] for o in group)}}
        if prior:
            cal["microbench"] = prior.get("microbench")
        path = save(cal, directory) if write else None
        out["calibrations"].append({"device": g.name, "path": str(path) if path else None, **fit, "runs": len(group)})
    return out


# A CPU "device" for runs on the CPU (gloo): rough figures for a few server cores, so that
# --from-runs over CPU runs has a baseline to refit. Not in the GPU table (no one plans on it).
CPU_DEVICE = GPU("cpu", bf16_tflops=1.0, fp32_tflops=1.0, memory_bytes=64 * GIB, intra_node_bw=5e9,
                 inter_node_bw=1e9, pcie_bw=20e9, hbm_bw=20e9, sms=1)


def device_gpu(name: str) -> GPU:
    from .gpus import get_gpu

    return CPU_DEVICE if name == "cpu" else get_gpu(name)


def cli_calibrate(a) -> int:
    """`shardlab calibrate`: measure (exit 2 without a GPU) or refit from runs; print what was saved."""
    import sys

    if a.from_runs:
        missing = [d for d in a.from_runs if not Path(d).is_dir()]
        if missing:
            print(f"error: --from-runs {missing[0]!r}: no such folder. Give run folders or a run store (shardlab runs lists one).",
                  file=sys.stderr)
            return 2
        out = calibrate_from_runs(a.from_runs, gpu=a.gpu, directory=a.calibration_dir)
        if not out["runs_used"]:
            print(f"error: --from-runs {' '.join(map(str, a.from_runs))}: {out['runs_read']} run(s) read, none completed with step "
                  "times; nothing to refit, nothing written. Give folders of completed runs.", file=sys.stderr)
            return 2
        if a.json:
            print(json.dumps(out))
        else:
            print(f"read {out['runs_read']} run(s), used {out['runs_used']} completed one(s) with step times")
            for c in out["calibrations"]:
                print(f"  {c['device']}: {c['runs']} run(s), gpu x{c['gpu_scale']:.3f}, host x{c['host_fit']:.3f}; "
                      f"rms log error {c['rms_log_error_before']:.3f} -> {c['rms_log_error_after']:.3f}; wrote {c['path']}")
        return 0
    from shardlab.run.host import gpu_count

    has_gpu = gpu_count() > 0  # NVML: no torch import to find there is nothing to measure
    if has_gpu:
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
    if not has_gpu:
        print("error: no CUDA GPU on this machine: `shardlab calibrate` measures a GPU. Run it where the GPU is, "
              "or refit from recorded runs with `shardlab calibrate --from-runs DIR`.", file=sys.stderr)
        return 2
    from .microbench import measure

    t0 = time.perf_counter()
    cal = measure(a.gpu)
    path = save(cal, a.calibration_dir)
    r = cal["rates"]
    if a.json:
        print(json.dumps({"path": str(path), **cal}))
    else:
        print(f"{cal['device_name']} ({cal['key']['gpu']}), torch {cal['key']['torch']}, deepspeed {cal['key']['deepspeed']}")
        nan = {"bf16": float("nan"), "fp32": float("nan")}
        mm, at = r.get("mm_eff", nan), r.get("attn_eff", nan)
        print(f"  matmul efficiency bf16 {mm['bf16']:.3f}, fp32 {mm['fp32']:.3f} (of the data sheet peak, shape-corrected)")
        print(f"  attention efficiency bf16 {at['bf16']:.3f}, fp32 {at['fp32']:.3f}; HBM {r.get('hbm_eff', float('nan')):.3f} of the data sheet")
        print(f"  host: {r.get('launch_s', float('nan')) * 1e6:.1f} us per host unit (a kernel, or a module's share: hostcost.host_units; default {DEFAULT_LAUNCH_S * 1e6:.1f}), FSDP2 unit {r.get('fsdp_unit_s', float('nan')) * 1e3:.3f} ms"
              + ("" if APPLY_MICROBENCH_HOST else " (the unit applied, the FSDP2 unit recorded only: `calibrate --from-runs` fits the host from real steps)"))
        if r.get("torch_cpu_adam_params_per_s"):
            print(f"  CPU AdamW (FSDP's CPU offload): {r['torch_cpu_adam_params_per_s'] / 1e9:.2f}e9 parameters/s on {cal['microbench']['cpu_adam'].get('threads')} threads")
        if r.get("nccl_bus_bytes_per_s"):
            n = (cal["microbench"].get("collectives") or {}).get("world_size")
            print(f"  collectives between {n} GPUs: {r['nccl_latency_s'] * 1e6:.0f} us + wire bytes at {r['nccl_bus_bytes_per_s'] / 1e9:.0f} GB/s"
                  " (all_gather / reduce_scatter fitted)")
        for k, v in (cal["microbench"].get("errors") or {}).items():
            print(f"  {k} failed (default kept): {v}")
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0
