"""plots.py on real CPU runs: every figure builds, shows in bokeh, and saves to a PNG with real content
and to an HTML page that carries the bokeh plot. `import shardlab` must not pay for HoloViews."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from cpu_runs import ANALYSIS, label, needs, real_runs
from PIL import Image

from shardlab import compare as C
from shardlab import plots as P
from shardlab.plan import PlanError


@pytest.fixture(scope="session")
@needs(*ANALYSIS)
def runs():
    return real_runs()


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def _png_facts(path) -> dict:
    """Size, number of distinct colours, share of non-white pixels, and a colour lookup."""
    img = Image.open(path).convert("RGB")
    px = np.asarray(img).reshape(-1, 3)
    non_white = int((px.min(axis=1) < 245).sum())
    colours = {tuple(int(v) for v in p) for p in np.unique(px, axis=0)}
    return {"size": img.size, "colours": len(colours), "ink": non_white / len(px), "pixels": colours}


def _has_colour(facts: dict, hex_colour: str, tol: int = 12) -> bool:
    r, g, b = _rgb(hex_colour)
    return any(abs(p[0] - r) <= tol and abs(p[1] - g) <= tol and abs(p[2] - b) <= tol for p in facts["pixels"])


def _check_png(path, min_size=(400, 200)) -> dict:
    facts = _png_facts(path)
    assert facts["size"][0] >= min_size[0] and facts["size"][1] >= min_size[1], facts["size"]
    assert facts["colours"] > 20, "a blank or single-colour image"
    assert 0.01 < facts["ink"] < 0.95, facts["ink"]
    return facts


def _check_html(path, *texts: str) -> str:
    html = path.read_text()
    assert "Bokeh" in html and "cdn.bokeh.org" not in html  # bokeh JS inlined: opens offline
    docs = re.findall(r'<script type="application/json" id="[^"]+">\s*(.*?)\s*</script>', html, re.S)
    assert docs, "no bokeh document in the page"
    doc = json.dumps(json.loads(docs[0]), ensure_ascii=False)
    for t in texts:
        assert t in doc, t
    return doc


def test_memory_breakdown_predicted_and_measured(runs, tmp_path):
    fig = P.memory_breakdown(runs, parts=C.STATE_PARTS)
    facts = _check_png(P.save_figure(fig, tmp_path / "breakdown.png"))
    for part in C.STATE_PARTS:  # every part's colour is drawn
        assert _has_colour(facts, P.PART_COLORS[part]), part
    doc = _check_html(P.save_figure(fig, tmp_path / "breakdown.html"), "Model states per rank", f"{label('fsdp1', 'ddp')} · measured",
                      f"{label('fsdp1', 'ddp')} · predicted")
    assert "MiB (2^20 bytes)" in doc  # gpt-tiny's states are a few MiB: the unit follows the data
    assert '"LegendItem"' in doc  # the interactive figure has a legend of the parts too
    full = P.memory_breakdown(C.memory_breakdown(runs))  # the documented frame works as input too
    _check_png(P.save_figure(full, tmp_path / "breakdown_full.png"))


def test_memory_timeline_bands_and_predicted_peak(runs, tmp_path):
    fig = P.memory_timeline(runs)
    tl = C.timeline_frame(runs)
    assert len(fig) == tl["run"].nunique() and tl["rank"].nunique() > 1  # one panel per run, its ranks as lines
    facts = _check_png(P.save_figure(fig, tmp_path / "timeline.png"), min_size=(600, 400))
    assert any(r > 200 and r - g > 80 and r - b > 80 for r, g, b in facts["pixels"])  # the red predicted-peak line
    doc = _check_html(P.save_figure(fig, tmp_path / "timeline.html"), "forward", "backward", "optimizer", "predicted peak")
    assert "rank 0" in doc and "rank 1" in doc


def test_throughput_bars_skip_mfu_on_cpu(runs, tmp_path):
    fig = P.throughput(runs)
    titles = [p.opts.get().kwargs.get("title") for p in fig]
    assert titles == ["tokens/s per device", "TFLOPS per device"]  # MFU needs a GPU's peak
    _check_png(P.save_figure(fig, tmp_path / "throughput.png"))
    _check_html(P.save_figure(fig, tmp_path / "throughput.html"), "tokens/s per device", label("fsdp2", "zero3"))


def test_comm_bytes_by_collective(runs, tmp_path):
    fig = P.comm_bytes(runs)
    facts = _check_png(P.save_figure(fig, tmp_path / "comm.png"))
    assert sum(_has_colour(facts, c) for c in P.PALETTE[:3]) >= 2  # several collectives, several colours
    _check_html(P.save_figure(fig, tmp_path / "comm.html"), "all_gather", "reduce_scatter", "all_reduce")


def test_loss_curves_overlaid(runs, tmp_path):
    df = C.loss_frame(runs)
    fig = P.loss_curves(df)
    assert len(fig) == 3 * 2  # a curve and its points per run
    _check_png(P.save_figure(fig, tmp_path / "loss.png"))
    _check_html(P.save_figure(fig, tmp_path / "loss.html"), "Loss per step", label("deepspeed", "zero3"))


def test_figures_render_for_panel(runs):
    import panel as pn

    pane = pn.pane.HoloViews(P.loss_curves(runs), backend="bokeh")
    model = pane.get_root()
    assert model is not None
    assert type(P.render_bokeh(P.comm_bytes(runs))).__module__.startswith("bokeh.")


def test_save_figure_rejects_unknown_suffix(runs, tmp_path):
    with pytest.raises(PlanError, match=r"\.png, \.svg or \.html"):
        P.save_figure(P.loss_curves(runs), tmp_path / "loss.jpg")


def test_import_shardlab_does_not_import_holoviews():
    code = "import sys, shardlab, shardlab.compare, shardlab.tables; print(sorted(m for m in ('holoviews', 'bokeh', 'matplotlib', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
