"""DataFrames -> figures (HoloViews on bokeh for notebooks and panel apps, matplotlib for PNG).

Every function takes the long frames that shardlab.compare builds (or runs / run folders, which it
turns into those frames first) and returns a HoloViews object. Options are set for both backends on
each element, so the same object shows interactively (bokeh) and saves to PNG (matplotlib) through
`save_figure(obj, "x.png" | "x.html")`. HoloViews is imported here only, on first use, so
`import shardlab` stays fast.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from shardlab import compare as C
from shardlab.plan import bad_input
from shardlab.units import GIB, unit_for  # noqa: F401  (one home for picking KiB/MiB/GiB; plots.unit_for stays importable)

PHASE_COLORS = {"forward": "#4C78A8", "backward": "#F58518", "optimizer": "#54A24B"}
PART_COLORS = {"params": "#4C78A8", "grads": "#F58518", "optimizer": "#54A24B", "activations": "#B279A2", "buffers": "#9D755D"}
PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D"]
WIDTH, HEIGHT = 720, 300


def _hv():
    """holoviews with both plotting backends registered; bokeh stays the default for display."""
    import holoviews as hv
    import holoviews.plotting.bokeh  # noqa: F401  (registers the backend without notebook output)
    import holoviews.plotting.mpl  # noqa: F401

    if hv.Store.current_backend not in ("bokeh", "matplotlib"):
        hv.Store.set_current_backend("bokeh")
    return hv


def _o(el, bokeh: dict | None = None, mpl: dict | None = None, **both):
    """Options for both backends on one element (bokeh sizes in pixels, matplotlib in fig_size %)."""
    el = el.opts(backend="bokeh", **{"width": WIDTH, "height": HEIGHT, **both, **(bokeh or {})})
    return el.opts(backend="matplotlib", **{"fig_size": 200, "aspect": 2.4, **both, **(mpl or {})})


def _both(obj, **opts):
    """The same plot options (title, labels) for both backends."""
    return obj.opts(backend="bokeh", **opts).opts(backend="matplotlib", **opts)


def _frame(data: Any, builder, *args) -> pd.DataFrame:
    return data if isinstance(data, pd.DataFrame) else builder(data, *args)


def _empty(hv, title: str, why: str):
    return _o(hv.Text(0.5, 0.5, why), title=title, xaxis=None, yaxis=None)


# --------------------------------------------------------------------------------------------
# Memory over time


def memory_timeline(runs: Any, phases: pd.DataFrame | None = None, predicted: dict | None = None, gpu: str | None = None,
                    max_steps: int = 30, zoom_to_steps: bool = True):
    """Memory over time, one panel per run with a line per rank (in the unit that fits), forward/backward/optimizer
    as coloured bands (the lowest rank's), predicted peak as a line.

    `runs` is runs/run folders, or a timeline_frame() DataFrame (then `phases` is a phase_frame() and
    `predicted` maps run label -> predicted peak bytes). Only the last
    `max_steps` steps get bands, so long runs stay readable; `zoom_to_steps` opens the view on those
    steps (start-up is still there: pan or zoom out in the interactive figure).
    """
    hv = _hv()
    if isinstance(runs, pd.DataFrame):
        tl, ph, pred = runs, phases if phases is not None else pd.DataFrame(columns=["run", "rank", "phase", "start_s", "end_s", "step"]), predicted or {}
    else:
        rd = C.load_runs(runs)
        tl, ph = C.timeline_frame(rd), C.phase_frame(rd)
        pred = predicted if predicted is not None else _predicted_peaks(rd, gpu)
    panels = []
    key = "bands: forward blue, backward orange, optimizer green (lowest rank); dashed red: predicted peak per GPU"
    # One panel per run with its ranks as lines (one panel per rank made a 16-rank report thousands of px tall).
    for run, g in tl.groupby("run", sort=True):
        unit, size = unit_for(max(float(g["bytes"].max()), float(pred.get(run) or 0)))
        axis = f"memory ({unit})"
        over = []
        for (rank, source), s in g.groupby(["rank", "source"], sort=True):
            s = s.sort_values("seconds")
            over.append(_o(hv.Curve((s["seconds"], s["bytes"] / size), "seconds", unit, label=f"rank {rank} {source}"),
                           xlabel="seconds from start", ylabel=axis, color=PALETTE[int(rank) % len(PALETTE)],
                           bokeh=dict(tools=["hover"], line_width=2), mpl=dict(linewidth=2, aspect=3)))
        p = ph[ph["run"] == run]
        if len(p):
            p = p[p["rank"] == p["rank"].min()]
        top = max(float(g["bytes"].max()), float(pred.get(run) or 0)) / size * 1.05
        if len(p):
            p = p[p["step"] > p["step"].max() - max_steps]
            for name, color in PHASE_COLORS.items():
                spans = p[p["phase"] == name]
                if len(spans):
                    # Rectangles, not VSpans: matplotlib layouts lose axis labels next to spans.
                    boxes = [(a, 0.0, b, top) for a, b in zip(spans["start_s"], spans["end_s"])]
                    over.append(_o(hv.Rectangles(boxes, kdims=["seconds", unit, "x1", "y1"], label=name), alpha=0.3,
                                   bokeh=dict(color=color, line_alpha=0), mpl=dict(facecolor=color, edgecolor="none")))
        if pred.get(run):
            over.append(_o(hv.HLine(pred[run] / size, kdims=["seconds", unit], label="predicted peak per GPU"), color="#E45756",
                           bokeh=dict(line_dash="dashed"), mpl=dict(linestyle="dashed")))
        lim = {}
        if zoom_to_steps and len(p):
            a, b = float(p["start_s"].min()), float(p["end_s"].max())
            pad = max(0.1 * (b - a), 0.05)
            lim = dict(xlim=(max(0.0, a - pad), b + pad))
        ranks = g["rank"].nunique()
        panel = _both(hv.Overlay(over), title=f"{run} · {ranks} rank{'s' if ranks != 1 else ''}", xlabel="seconds from start", ylabel=axis, **lim)
        panels.append(panel)
    if not panels:
        return _empty(hv, "memory timeline", "no memory samples in these runs")
    layout = _both(hv.Layout(panels).cols(1), title=f"Memory per rank over time ({key})")
    return layout.opts(backend="bokeh", shared_axes=False).opts(backend="matplotlib", sublabel_format="", vspace=0.35, fig_size=250)


def _predicted_peaks(rd, gpu) -> dict:
    out = {}
    for r in rd:
        est, _ = C._try_predict(r, gpu)
        out[r.label] = float(est["per_gpu"]["total"]) if est else None
    return out


# --------------------------------------------------------------------------------------------
# Bars


def _stacked(hv, df: pd.DataFrame, cat: str, stack: str, title: str, colors: dict | None = None):
    """Horizontal stacked bars: one bar per `cat` label, stacked by `stack`, in a unit fitted to the data."""
    unit, size = unit_for(float(df.groupby(cat)["bytes"].sum().max() or 0))
    label = f"{unit} (2^{size.bit_length() - 1} bytes)"
    df = df.assign(**{label: df["bytes"] / size})
    order = list(dict.fromkeys(df[stack]))
    colors = {s: (colors or {}).get(s, PALETTE[i % len(PALETTE)]) for i, s in enumerate(order)}
    # Every bar gets every part (0 where absent): matplotlib colours a stack by position otherwise.
    full = pd.MultiIndex.from_product([list(dict.fromkeys(df[cat])), order], names=[cat, stack])
    df = df.groupby([cat, stack], sort=False)[label].sum().reindex(full, fill_value=0.0).reset_index()
    bars = hv.Bars(df, [cat, stack], label)
    height = max(HEIGHT, 40 * df[cat].nunique() + 80)
    # bokeh builds its legend from a categorical cmap; matplotlib takes the colours as a dim expression.
    return _o(bars, stacked=True, invert_axes=True, title=title,
              bokeh=dict(width=WIDTH + 180, height=height, tools=["hover"], legend_position="right", xlabel="", cmap=colors),
              mpl=dict(aspect=max(1.0, 2.4 * HEIGHT / height), legend_position="right", xlabel="",
                       color=hv.dim(stack).categorize(colors, default="#BAB0AC")))


def memory_breakdown(data: Any, gpu: str | None = None, parts: tuple[str, ...] = C.BREAKDOWN_PARTS):
    """Per-rank memory by part (params / grads / optimizer / activations / buffers), predicted and measured
    side by side for each run: the ZeRO paper's Figure 1, from this machine's runs.

    `data`: runs, or a compare.memory_breakdown() frame (run, kind, part, bytes). `parts` picks what is
    drawn: C.STATE_PARTS gives the model states alone, which the estimator's buffers (sized for a GPU)
    would otherwise dwarf for small models."""
    hv = _hv()
    df = _frame(data, C.memory_breakdown, gpu)
    df = df[df["part"].isin(parts)]
    if df.empty:
        return _empty(hv, "memory per rank", "no memory figures")
    df = df.assign(bar=df["run"] + " · " + df["kind"])
    what = "model states" if set(parts) <= set(C.STATE_PARTS) else "memory"
    return _stacked(hv, df, "bar", "part", f"{what.capitalize()} per rank by part: predicted vs measured", PART_COLORS)


def comm_bytes(data: Any, gpu: str | None = None):
    """Bytes per step per rank by collective (all_gather, reduce_scatter, all_reduce, ...), measured and
    predicted for each run (tensor bytes handed to the collectives). `data`: runs, or a compare.comm_frame() frame."""
    hv = _hv()
    df = _frame(data, C.comm_frame, gpu)
    df = df[df["bytes"] > 0]
    if df.empty:
        return _empty(hv, "communication", "no communication counted")
    df = df.assign(bar=df["run"] + " · " + df["kind"])
    return _stacked(hv, df, "bar", "collective", "Communication per step per rank, by collective")


_THROUGHPUT = (("tokens_per_s", "tokens/s per device", 1.0), ("tflops", "TFLOPS per device", 1.0), ("mfu", "MFU (%)", 100.0))


def throughput(data: Any, gpu: str | None = None):
    """tokens/s, TFLOPS and MFU per run as bars (MFU only where measured: it needs a GPU's peak).

    `data`: runs, or a compare() frame."""
    hv = _hv()
    df = data if isinstance(data, pd.DataFrame) else C.compare(data, gpu=gpu)
    panels = []
    for col, label, scale in _THROUGHPUT:
        if col not in df or not df[col].notna().any():
            continue
        d = pd.DataFrame({"run": df.index.astype(str), label: df[col].astype(float) * scale})
        panels.append(_o(hv.Bars(d, "run", label), invert_axes=True, title=label, color="#4C78A8",
                         bokeh=dict(height=max(160, 40 * len(d) + 60), tools=["hover"]),
                         mpl=dict(aspect=3.0, xlabel="")))
    if not panels:
        return _empty(hv, "throughput", "no throughput measured")
    missing = [lab for col, lab, _ in _THROUGHPUT if col not in df or not df[col].notna().any()]
    layout = hv.Layout(panels).cols(1).opts(backend="matplotlib", sublabel_format="", vspace=0.6, fig_size=150)
    if missing:
        layout = _both(layout, title=f"not measured here: {', '.join(missing)} (needs a GPU)")
    return layout


def loss_curves(data: Any):
    """Loss per step, one curve per run on the same axes: equal setups should lie on top of each other.

    `data`: runs, or a compare.loss_frame() frame (run, step, loss)."""
    hv = _hv()
    df = _frame(data, C.loss_frame)
    if df.empty:
        return _empty(hv, "loss", "no losses recorded")
    dashes = ["solid", "dashed", "dotted", "dashdot"]
    curves = {}
    for i, (run, g) in enumerate(df.groupby("run", sort=False)):
        g = g.sort_values("step")
        c = _o(hv.Curve((g["step"], g["loss"]), "step", "loss", label=run),
               bokeh=dict(line_dash=dashes[i % 4], tools=["hover"], line_width=2), mpl=dict(linestyle=dashes[i % 4], linewidth=2))
        pts = _o(hv.Scatter((g["step"], g["loss"]), "step", "loss", label=run), bokeh=dict(size=6), mpl=dict(s=25))
        curves[run] = c * pts
    return hv.Overlay([c for c in curves.values()]).opts(title="Loss per step", show_legend=True)


TUNE_COLORS = {"pick": "#E45756", "completed": "#4C78A8", "unrun": "#BBBBBB", "oom": "#000000", "failed": "#000000"}


def tune_pareto(df: pd.DataFrame):
    """Memory per GPU vs tokens/s for a tune's candidates that fit (TuneResult.pareto()): grey the
    predictions, blue the measured trials, red the pick, and the Pareto front as a line."""
    hv = _hv()
    if df.empty:
        return _empty(hv, "tune: memory vs speed", "no candidate fits")
    unit, div = unit_for(float(df["memory_bytes"].max()))
    d = df.assign(memory=df["memory_bytes"] / div, kind=df["status"].where(df["status"].isin(list(TUNE_COLORS)), "failed"))
    xlabel, ylabel = f"peak reserved per GPU ({unit})", "tokens/s per GPU"
    layers = []
    for kind, label in (("unrun", "predicted (not run)"), ("completed", "measured trial"), ("pick", "pick")):
        g = d[d["kind"] == kind]
        if len(g):
            layers.append(_o(hv.Scatter(g, "memory", ["tokens_per_s", "key"], label=label), color=TUNE_COLORS[kind],
                             bokeh=dict(size=10 if kind == "pick" else 6, tools=["hover"]), mpl=dict(s=60 if kind == "pick" else 20)))
    front = d[d["front"]].sort_values("memory")
    if len(front) > 1:
        layers.append(_o(hv.Curve((front["memory"], front["tokens_per_s"]), "memory", "tokens_per_s", label="Pareto front"),
                         color="#54A24B", bokeh=dict(line_dash="dashed"), mpl=dict(linestyle="dashed")))
    return _both(hv.Overlay(layers), title="tune: memory per GPU vs tokens/s", xlabel=xlabel, ylabel=ylabel, show_legend=True)


def figures(runs: Any, gpu: str | None = None) -> list[tuple[str, str, Any]]:
    """Every figure for a set of runs as (name, heading, figure): what `shardlab report` shows."""
    rd = C.load_runs(runs)
    breakdown = C.memory_breakdown(rd, gpu)
    return [
        ("memory_states", "Model states per rank: predicted vs measured (the ZeRO paper's Figure 1)",
         memory_breakdown(breakdown, parts=C.STATE_PARTS)),
        ("memory_breakdown", "All memory per rank: predicted vs measured", memory_breakdown(breakdown)),
        ("memory_timeline", "Memory over time per rank", memory_timeline(rd, gpu=gpu)),
        ("throughput", "Throughput", throughput(C.compare(rd, gpu=gpu))),
        ("comm_bytes", "Communication per step by collective", comm_bytes(C.comm_frame(rd, gpu))),
        ("loss_curves", "Loss curves", loss_curves(C.loss_frame(rd))),
    ]


def notebook() -> None:
    """Call once in a notebook: loads HoloViews' bokeh (and matplotlib) display so figures show inline.
    (In a panel app or with `pn.extension()` already loaded, `pn.panel(fig)` needs nothing more.)"""
    hv = _hv()
    hv.extension("bokeh", "matplotlib", logo=False)


# --------------------------------------------------------------------------------------------
# Saving


def save_figure(obj, path: str | Path) -> Path:
    """Write a figure: .png (matplotlib backend), .svg (matplotlib), or .html (bokeh, self-contained:
    the bokeh JavaScript is inlined, so the file opens offline)."""
    hv = _hv()
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".png", ".svg"):
        with warnings.catch_warnings():
            # matplotlib's note that a span's colour overrides its face colour: what we ask for.
            warnings.filterwarnings("ignore", message="Setting the 'color' property")
            hv.save(obj, str(path), backend="matplotlib", fmt=suffix[1:])
        _close_mpl()
    elif suffix == ".html":
        hv.save(obj, str(path), backend="bokeh", resources="inline")
    else:
        raise bad_input("path", f"path={str(path)!r} has suffix {suffix or '(none)'!r}; figures are saved as .png, .svg or .html. Use e.g. memory.png or memory.html.")
    return path


def _close_mpl() -> None:
    # hv.save leaves its matplotlib figures open; a report with many figures would pile them up.
    import matplotlib.pyplot as plt

    plt.close("all")


def render_bokeh(obj):
    """The bokeh model of a figure (for embedding in HTML pages and panel apps)."""
    hv = _hv()
    return hv.render(obj, backend="bokeh")


__all__ = ["tune_pareto", "memory_timeline", "memory_breakdown", "comm_bytes", "throughput", "loss_curves", "figures", "notebook",
           "save_figure", "render_bokeh"]
