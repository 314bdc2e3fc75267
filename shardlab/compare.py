"""Runs and estimates -> pandas DataFrames: what happened next to what was predicted.

Runs are read through the run store (`shardlab.run.store.Run`), so this works on any run store,
whoever wrote it, and on broken run folders too: a run whose files cannot be read still gets its
row (status `unreadable`, the reason in `prediction_note`), with the figures that can be read.
`compare()` gives one row per run; the `*_frame` helpers give the long tables that shardlab.plots
draws. Bytes stay bytes here; only `style_compare` turns them into GiB (2^30) for people.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from shardlab.estimate.gpus import DEFAULT_GPU
from shardlab.plan import Plan, bad_input
from shardlab.run.metrics import STATE_PARTS
from shardlab.run.store import Run, load_run

BREAKDOWN_PARTS = ("params", "grads", "optimizer", "activations", "buffers")
_NOT_COLLECTIVES = {"intra_node", "inter_node", "total"}


def _base_label(r: Run) -> str:
    p = r.plan
    if p is None:
        return f"unreadable run {r.id}"
    off = [k for k in ("optimizer", "params") if getattr(p.offload, k) != "none"]
    return f"{p.framework} {p.sharding}" + (f" +offload({','.join(off)})" if off else "") + f" {p.precision}"


def load(run: Any) -> Run:
    """A Run, a run folder path, or anything with `.dir` -> that run, read once (store.Run.frozen()).

    Raises PlanError (bad input) for a path that is not a run folder; a broken run folder loads.
    """
    if isinstance(run, Run) and run._cache is not None:
        return run
    return load_run(run).frozen()


def load_runs(runs: Any) -> list[Run]:
    """Load several runs and give each a short unique label (framework, sharding, offload, precision). A folder that
    is a run store (no run's files of its own, run folders inside, as `shardlab runs` lists) stands for its runs:
    `shardlab report runs -o r.html` refused the store as "not a run folder"."""
    from shardlab.run.listing import is_run_folder, runs_in

    if isinstance(runs, (str, Path, Run)) or hasattr(runs, "dir"):
        runs = [runs]
    each = []
    for r in runs:
        store = isinstance(r, (str, Path)) and Path(r).is_dir() and not is_run_folder(Path(r))
        each += (runs_in([r]) or [r]) if store else [r]  # an empty folder keeps load()'s "not a run folder"
    out = [load(r) for r in each]
    if not out:
        raise bad_input("run_dirs", "no runs given. Name at least one run folder (see `shardlab runs`).")
    base = [_base_label(r) for r in out]
    for r, b in zip(out, base):
        r.label = b if base.count(b) == 1 else f"{b} [{r.id}]"
    return out


def _steady(m: pd.DataFrame) -> pd.DataFrame:
    """Steps after the first (warm-up: allocator, JIT, first all-gathers) when there are any."""
    if "step" not in m or m.empty:
        return m
    later = m[m["step"] > m["step"].min()]
    return later if len(later) else m


def _agg(m: pd.DataFrame, col: str, how: str) -> float | None:
    """mean / max of a numeric column, None where the column is absent or empty (e.g. mfu on a CPU)."""
    v = pd.to_numeric(m[col], errors="coerce").dropna() if col in m else ()
    return float(getattr(v, how)()) if len(v) else None


_mean, _max = partial(_agg, how="mean"), partial(_agg, how="max")


def predict(run: Run, gpu: str | None = None) -> dict | None:
    """The estimator's figures for the run's plan, model and real world size (None without a model
    or a readable plan)."""
    if run.model is None or run.plan is None or not run.world_size:
        return None
    from shardlab.estimate import estimate

    plan = run.plan
    if plan.world_size != run.world_size:
        nodes = plan.topology.nodes if run.world_size % plan.topology.nodes == 0 else 1
        plan = plan.model_copy(update={"topology": plan.topology.model_copy(update={"nodes": nodes, "gpus_per_node": run.world_size // nodes})})
    return estimate(plan, run.model, gpu or run.gpu or DEFAULT_GPU).to_dict()


def _try_predict(run: Run, gpu: str | None) -> tuple[dict | None, str | None]:
    """predict(), or None and the reason: a run whose plan the estimator cannot price still compares."""
    try:
        return predict(run, gpu), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _comm_pred(est: dict) -> dict[str, float]:
    by = est.get("comm_payload_per_step") or est.get("comm_per_step") or {}
    return {k: float(v) for k, v in by.items() if k not in _NOT_COLLECTIVES and isinstance(v, (int, float))}


def _comm_measured(m: pd.DataFrame) -> dict[str, float]:
    """Bytes per step per rank by collective: rank 0, median over steady steps."""
    cols = [c for c in m.columns if c.startswith("comm_bytes.")]
    if not cols:
        return {}
    r0 = _steady(m[m["rank"] == m["rank"].min()])
    return {c.split(".", 1)[1]: float(pd.to_numeric(r0[c], errors="coerce").fillna(0).median()) for c in cols}


def _states_measured(m: pd.DataFrame) -> dict[str, float]:
    last = m[m["step"] == m["step"].max()] if "step" in m and len(m) else m
    return {k: _max(last, f"state_bytes.{k}") or 0.0 for k in STATE_PARTS}


def _peak_measured(r: Run) -> tuple[float | None, str]:
    """The figure to set beside the estimator's per-GPU total, which includes the CUDA context and the
    allocator's slack: on GPUs the device memory NVML saw in use, else the allocator's reserved peak."""
    m, tl = r.metrics, r.timeline
    if r.device == "cuda":
        nvml = tl[tl["source"] == "nvml"] if len(tl) and "source" in tl else tl.iloc[0:0]
        if len(nvml):
            return _max(nvml, "bytes"), "device memory in use (NVML)"
        for col, what in (("peak_reserved_bytes", "peak reserved (CUDA)"), ("peak_allocated_bytes", "peak allocated (CUDA)")):
            if _max(m, col) is not None:
                return _max(m, col), what
    vals = [v for v in (_max(m, "rss_bytes"), _max(r.timeline, "bytes") if len(r.timeline) else None) if v is not None]
    return (max(vals) if vals else None), "process RSS (CPU)"


def _err(measured, predicted):
    if measured is None or not predicted:
        return None
    return (measured - predicted) / predicted


def _by_category(row: dict, pg: dict, cpu: dict) -> dict:
    """Measured minus predicted, bytes per rank, where the runner measures the same thing (issue 13):
    each model-state category, and (GPU runs) peak allocated / reserved against the estimator's
    peak_allocated / peak_reserved. A workshop sees which term of the estimate is wrong. The measured
    states count offloaded tensors too, so the prediction's CPU share is added to them."""
    out = {"peak_allocated_pred_bytes": pg.get("peak_allocated"), "peak_reserved_pred_bytes": pg.get("peak_reserved")}
    for k in STATE_PARTS:
        measured = row.get(f"{k}_bytes")
        out[f"{k}_minus_pred_bytes"] = (float(measured) - float(pg[k]) - float(cpu.get(k, 0))
                                        if measured is not None and k in pg else None)
    for k in ("peak_allocated", "peak_reserved"):
        measured, pred = row.get(f"{k}_bytes"), pg.get(k)
        out[f"{k}_minus_pred_bytes"] = float(measured) - float(pred) if measured is not None and pred else None
    return out


def compare(runs: Any, reference: Any = None, gpu: str | None = None) -> pd.DataFrame:
    """One row per run: setup, throughput, memory and communication measured vs predicted, loss.

    `reference` (a run, a run folder, or a label/id among `runs`; default the first run) is the run the
    losses are compared with. Errors are relative: (measured - predicted) / predicted. Peak memory is
    CUDA's peak allocation on GPUs; on CPUs it is the process RSS, shown beside the per-GPU prediction
    without an error (the two measure different things). Model states and communication compare on both.
    A run folder that cannot be read has status `unreadable` and the reason in `prediction_note`.
    """
    rd = load_runs(runs)
    ref = _pick_reference(rd, reference)
    df = pd.DataFrame([_compare_row(r, _loss_by_step(ref), gpu) for r in rd]).set_index("run")
    df.attrs["reference"] = ref.label
    return df


def _setup(r: Run) -> dict:
    p = r.plan
    if p is None:
        return dict(framework=None, strategy=None, precision=None, offload=None)
    return dict(framework=p.framework, strategy=p.sharding, precision=p.precision, offload=_offload_text(p))


def _compare_row(r: Run, ref_loss: pd.Series, gpu: str | None) -> dict:
    m = r.metrics
    steady = _steady(m)
    est, why = _try_predict(r, gpu)
    pg = (est or {}).get("per_gpu", {})
    cpu = (est or {}).get("cpu", {})
    states = _states_measured(m)
    states_pred = sum(float(pg.get(k, 0)) + float(cpu.get(k, 0) if isinstance(cpu, dict) else 0) for k in STATE_PARTS) if est else None
    comm = _comm_measured(m)
    comm_pred = _comm_pred(est) if est else {}
    peak, peak_src = _peak_measured(r)
    loss = _loss_by_step(r)
    common = loss.index.intersection(ref_loss.index)
    row = dict(
        run=r.label, id=r.id, **_setup(r), world_size=r.world_size, device=r.device, status=r.status,
        steps=int(m["step"].nunique()) if "step" in m else 0,
        tokens_per_s=_mean(steady, "tokens_per_s"), tflops=_mean(steady, "tflops"), mfu=_mean(steady, "mfu"),
        step_time_s=_mean(steady, "step_time_s"), step_time_pred_s=(est or {}).get("step_time_s") if r.device == "cuda" else None,
        peak_bytes=peak, peak_source=peak_src, peak_pred_bytes=float(pg["total"]) if "total" in pg else None,
        peak_allocated_bytes=_max(m, "peak_allocated_bytes"), peak_reserved_bytes=_max(m, "peak_reserved_bytes"),
        params_bytes=states["params"], grads_bytes=states["grads"], optimizer_bytes=states["optimizer"],
        state_bytes=sum(states.values()), state_pred_bytes=states_pred,
        comm_bytes=sum(comm.values()) if comm else None, comm_pred_bytes=sum(comm_pred.values()) if est else None,
        final_loss=float(loss.iloc[-1]) if len(loss) else None,
        loss_diff=float(loss.iloc[-1] - ref_loss.iloc[-1]) if len(loss) and len(ref_loss) else None,
        loss_max_abs_diff=float((loss[common] - ref_loss[common]).abs().max()) if len(common) else None,
        model_params=r.model.params if r.model is not None else None,
        prediction_note=r.problem or why,
    )
    row.update(_launch_prediction(r))
    # A CPU run's RSS holds the whole Python runtime and no CUDA context: no match for a GPU figure.
    row["peak_error"] = _err(row["peak_bytes"], row["peak_pred_bytes"]) if r.device == "cuda" else None
    row["state_error"] = _err(row["state_bytes"], states_pred)
    row["comm_error"] = _err(row["comm_bytes"], row["comm_pred_bytes"])
    row.update(_by_category(row, pg, cpu if isinstance(cpu, dict) else {}))
    return row


def _launch_prediction(r: Run) -> dict:
    """The prediction stored at launch (run/prediction.py) beside the measurement, with residuals
    (measured / predicted - 1). Runs from before predictions were stored, or whose prediction.json
    cannot be read, get empty columns."""
    from shardlab.run.prediction import reconcile

    empty = {"tokens_per_s_pred": None, "tokens_per_s_residual": None, "step_time_residual": None, "prediction_calibrated": None}
    try:
        rec = reconcile(r)
        pred = rec.get("prediction") or {}
        if "tokens_per_s" not in pred:
            return empty
        return {"tokens_per_s_pred": pred["tokens_per_s"], "tokens_per_s_residual": rec.get("tokens_per_s_residual"),
                "step_time_launch_pred_s": pred["step_time_s"], "step_time_residual": rec.get("step_time_residual"),
                "prediction_calibrated": pred.get("calibrated"), "predicted_on": pred.get("gpu")}
    except (KeyError, TypeError, ValueError, ArithmeticError):  # a prediction.json written by hand or garbled
        return empty


def _offload_text(p: Plan) -> str:
    return ", ".join(f"{k}:{getattr(p.offload, k)}" for k in ("optimizer", "params") if getattr(p.offload, k) != "none") or "none"


def _pick_reference(rd: list[Run], reference: Any) -> Run:
    if reference is None:
        return rd[0]
    if isinstance(reference, str):
        for r in rd:
            if reference in (r.label, r.id, str(r.dir)):
                return r
    try:
        return load_runs([reference])[0] if not isinstance(reference, Run) else reference
    except Exception:
        raise bad_input("reference", f"reference={reference!r} is neither one of the runs ({', '.join(r.label for r in rd)}) nor a run folder. Give a run label, id or folder.") from None


def _loss_by_step(r: Run) -> pd.Series:
    m = r.metrics
    if m.empty or "loss" not in m:
        return pd.Series(dtype=float)
    return m.groupby("step")["loss"].mean().astype(float)


# --------------------------------------------------------------------------------------------
# Long frames for plots


def _tag(df: pd.DataFrame, r: Run) -> pd.DataFrame:
    p = r.plan
    return df.assign(run=r.label, id=r.id, framework=p.framework if p else None, sharding=p.sharding if p else None)


def loss_frame(runs: Any) -> pd.DataFrame:
    """run, framework, sharding, step, loss (mean over ranks; data-parallel ranks report the same loss)."""
    parts = [_tag(_loss_by_step(r).rename("loss").reset_index(), r) for r in load_runs(runs)]
    return pd.concat(parts, ignore_index=True)


def phase_frame(runs: Any) -> pd.DataFrame:
    """One row per step per rank per phase (fwd, bwd, opt) with start/end seconds from the run's start."""
    out = []
    for r in load_runs(runs):
        m = r.metrics
        if m.empty or "t_start" not in m:
            continue
        t0 = _t0(r)
        for name, a, b in (("forward", "t_start", "t_fwd_end"), ("backward", "t_fwd_end", "t_bwd_end"), ("optimizer", "t_bwd_end", "t_opt_end")):
            if a in m and b in m:
                out.append(_tag(pd.DataFrame({"step": m["step"], "rank": m["rank"], "phase": name,
                                              "start_s": m[a] - t0, "end_s": m[b] - t0}), r))
    cols = ["step", "rank", "phase", "start_s", "end_s", "run", "id", "framework", "sharding"]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def _t0(r: Run) -> float:
    """The run's time zero: its first memory sample or first step, whichever came first (same clock)."""
    starts = [v for v in (_agg(r.metrics, "t_start", "min"), _agg(r.timeline, "t", "min")) if v is not None]
    return min(starts, default=0.0)


def timeline_frame(runs: Any) -> pd.DataFrame:
    """Sampled memory: run, rank, source (rss | nvml), seconds from the run's start, bytes."""
    out = []
    for r in load_runs(runs):
        tl = r.timeline
        if tl.empty:
            continue
        out.append(_tag(tl.assign(seconds=tl["t"] - _t0(r)), r))
    cols = ["t", "rank", "gpu", "source", "bytes", "seconds", "run", "id", "framework", "sharding"]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def memory_breakdown(runs: Any, gpu: str | None = None) -> pd.DataFrame:
    """run, kind (predicted | measured), part, bytes: model states per rank, plus the rest of the peak.

    Predicted parts are the estimator's per-GPU params/grads/optimizer/activations/buffers. Measured
    parts are the states the rank really held; on CUDA the rest of the peak allocation (activations,
    buffers, temporaries) is shown as `activations`, which on CPU cannot be told apart from the runtime.
    """
    rows = []
    for r in load_runs(runs):
        est, _ = _try_predict(r, gpu)
        if est:
            for part in BREAKDOWN_PARTS:
                rows.append(dict(run=r.label, kind="predicted", part=part, bytes=float(est["per_gpu"].get(part, 0))))
        states = _states_measured(r.metrics)
        for part in STATE_PARTS:
            rows.append(dict(run=r.label, kind="measured", part=part, bytes=states[part]))
        peak, _ = _peak_measured(r)
        if r.device == "cuda" and peak:
            rows.append(dict(run=r.label, kind="measured", part="activations", bytes=max(peak - sum(states.values()), 0.0)))
    return pd.DataFrame(rows, columns=["run", "kind", "part", "bytes"])


def comm_frame(runs: Any, gpu: str | None = None) -> pd.DataFrame:
    """run, kind (predicted | measured), collective, bytes per step per rank."""
    rows = []
    for r in load_runs(runs):
        for coll, b in _comm_measured(r.metrics).items():
            rows.append(dict(run=r.label, kind="measured", collective=coll, bytes=b))
        est, _ = _try_predict(r, gpu)
        for coll, b in (_comm_pred(est) if est else {}).items():
            rows.append(dict(run=r.label, kind="predicted", collective=coll, bytes=b))
    return pd.DataFrame(rows, columns=["run", "kind", "collective", "bytes"])


# --------------------------------------------------------------------------------------------
# Notebook styling

_BYTES = ["peak_bytes", "peak_pred_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "params_bytes", "grads_bytes", "optimizer_bytes", "state_bytes", "state_pred_bytes", "comm_bytes", "comm_pred_bytes"]
_HIGHER_BETTER = ["tokens_per_s", "tflops", "mfu"]
_LOWER_BETTER = ["peak_bytes", "state_bytes", "comm_bytes", "step_time_s"]
_LABELS = {
    "tokens_per_s": "tokens/s per device", "tokens_per_s_pred": "tokens/s predicted at launch", "tokens_per_s_residual": "tokens/s residual",
    "step_time_residual": "step residual", "step_time_launch_pred_s": "step predicted at launch (s)", "tflops": "TFLOPS", "mfu": "MFU", "step_time_s": "step (s)", "step_time_pred_s": "step predicted (s)",
    "peak_bytes": "peak (GiB)", "peak_pred_bytes": "peak predicted (GiB)", "peak_allocated_bytes": "max allocated (GiB)", "peak_reserved_bytes": "max reserved (GiB)",
    "params_bytes": "params/rank (GiB)", "grads_bytes": "grads/rank (GiB)", "optimizer_bytes": "optimizer/rank (GiB)",
    "state_bytes": "states/rank (GiB)", "state_pred_bytes": "states predicted (GiB)", "state_error": "states error",
    "comm_bytes": "comm/step (GiB)", "comm_pred_bytes": "comm predicted (GiB)", "comm_error": "comm error",
    "final_loss": "final loss", "loss_diff": "loss - reference", "loss_max_abs_diff": "max |loss diff|",
}


def style_compare(df: pd.DataFrame):
    """A pandas Styler for notebooks: bytes in the binary unit that fits each column (shardlab.units), named in the headers, thousands separators,
    percent errors, the best value per column highlighted (most throughput, least memory/traffic)."""

    from shardlab.units import unit_for

    # one unit per column, fitted to its largest value (gpt-tiny's KiB are not 0.000 GiB)
    units = {c: unit_for(pd.to_numeric(df[c], errors="coerce").abs().max()) for c in _BYTES if c in df}

    def in_unit(size):
        return lambda v: "" if v is None or pd.isna(v) else f"{v / size:,.3f}"

    fmt: dict[str, Any] = {c: in_unit(size) for c, (_, size) in units.items()}
    fmt.update({c: "{:,.0f}" for c in ("tokens_per_s", "tokens_per_s_pred", "model_params") if c in df})
    fmt.update({c: "{:,.3g}" for c in ("tflops",) if c in df})
    fmt.update({c: "{:+.1%}" for c in ("tokens_per_s_residual", "step_time_residual") if c in df})
    fmt.update({c: "{:.1%}" for c in ("mfu", "peak_error", "state_error", "comm_error") if c in df})
    fmt.update({c: "{:.4f}" for c in ("final_loss",) if c in df})
    fmt.update({c: "{:+.2e}" for c in ("loss_diff", "loss_max_abs_diff") if c in df})
    fmt.update({c: "{:.3f}" for c in ("step_time_s", "step_time_pred_s", "step_time_launch_pred_s") if c in df})
    best = "font-weight: bold; background-color: #d9f2d9"
    st = df.style.format(fmt, na_rep="–")
    hi = [c for c in _HIGHER_BETTER if c in df and df[c].notna().any()]
    lo = [c for c in _LOWER_BETTER if c in df and df[c].notna().any()]
    if hi:
        st = st.highlight_max(subset=hi, props=best)
    if lo:
        st = st.highlight_min(subset=lo, props=best)
    labels = [_LABELS.get(c, c.replace("_", " ")) for c in df.columns]
    labels = [lab.replace("(GiB)", f"({units[c][0]})") if c in units else lab for c, lab in zip(df.columns, labels)]
    st = st.relabel_index(labels, axis="columns")
    ref = df.attrs.get("reference")
    return st.set_caption(f"Measured vs predicted per run (loss reference: {ref})" if ref else "Measured vs predicted per run")
