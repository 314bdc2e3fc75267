"""`shardlab report RUN_DIR... -o FILE.html`: the runs' tables and figures as one file to share.

The HTML is self-contained (bokeh's JavaScript inlined, no network needed to open it) and interactive;
every figure is also written as a PNG into `<stem>_files/` beside it, for slides and chat. Tables are
the measured-vs-predicted comparison, the runs' settings, and the framework comparison tables with the
claims that these runs and the estimator check.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from shardlab import compare as C
from shardlab.estimate.gpus import DEFAULT_GPU
from shardlab.plan import bad_input
from shardlab.run.store import Run

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:0.85em;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4} caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
.note{color:#555;font-size:0.9em} .fig{margin:12px 0}
"""


def _runs_table(rd: list[Run]) -> pd.DataFrame:
    rows = []
    for r in rd:
        st, cfg = r.info, r.config
        rows.append(dict(run=r.label, id=r.id, status=r.status, model=st.get("model") or cfg.get("model"), steps=cfg.get("steps"),
                         device=r.device, world_size=r.world_size, seed=cfg.get("seed"),
                         started=_utc(st.get("started_at")), ended=_utc(st.get("ended_at")), folder=str(r.dir),
                         problem=r.problem))
    return pd.DataFrame(rows).set_index("run")


def _utc(t) -> str | None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t:
        return None
    try:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return None


def _df_html(df: pd.DataFrame, caption: str) -> str:
    body = df.to_html(na_rep="–", escape=True, border=0)
    return f"<div><p class='note'><b>{html.escape(caption)}</b></p>{body}</div>"


def write_report(run_dirs: Iterable[Any], out_html: str | Path, gpu: str | None = None, png: bool = True,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Write one self-contained HTML report of `run_dirs` (run folders or Run objects) to `out_html`,
    with the figures also as PNGs in `<stem>_files/`. Returns the HTML path. `progress(what)` is
    called as each slow part starts (the CLI prints it: a report takes tens of seconds on 2 cores).

    Raises PlanError (bad input, exit 2 from the CLI) for a path that is not a run folder or a target
    that is not .html."""
    say = progress or (lambda what: None)
    out = Path(out_html)
    if out.suffix.lower() not in (".html", ".htm"):
        raise bad_input("--output", f"--output={str(out)!r} must end in .html (the report is one HTML page). Use e.g. -o report.html.")
    say("reading the runs")
    rd = C.load_runs(run_dirs)
    empty = [r.label for r in rd if r.metrics.empty]
    if len(empty) == len(rd):
        raise bad_input("run_dirs", f"none of the runs has recorded a step yet ({', '.join(str(r.dir) for r in rd)}); there is nothing to report. Wait for a run to train, or pick completed runs from `shardlab runs`.")

    from shardlab import plots as P
    from shardlab import tables as T

    say("building the figures")
    figs_html, head = render_figures(P.figures(rd, gpu), out, png, say)
    say("comparing with the estimator and the published tables")
    cmp = C.compare(rd, gpu=gpu)
    parts = [f"<h1>shardlab report: {len(rd)} run{'s' if len(rd) != 1 else ''}</h1>",
             f"<p class='note'>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Memory in GiB (2<sup>30</sup> bytes). "
             f"Predictions: shardlab's estimator for each run's plan, model and world size. Losses compared with <b>{html.escape(cmp.attrs.get('reference', ''))}</b>.</p>"]
    if empty:
        parts.append(f"<p class='note'>No steps recorded for: {html.escape(', '.join(empty))}.</p>")
    parts.append("<h2>Measured vs predicted</h2>" + C.style_compare(cmp).to_html())
    parts.append("<h2>Runs</h2>" + _df_html(_runs_table(rd), "settings and status"))
    parts += figs_html
    parts.append("<h2>Claims checked by these runs and the estimator</h2>" + _df_html(T.claims(runs=rd, gpu=gpu or DEFAULT_GPU), "published figure, shardlab's own figure, agreement"))
    for name, df in (("Features", T.features()), ("Offloading", T.offloading()), ("Precision", T.precision()),
                     ("Launchers", T.launchers()), ("When to use which", T.when_to_use())):
        parts.append(f"<h2>{name}</h2>" + _df_html(df, "FSDP1 / FSDP2 / DeepSpeed ZeRO"))
    out.write_text(html_page("shardlab report", head, parts), encoding="utf-8")
    return out


def render_figures(figs, out: Path, png: bool, say: Callable[[str], None]) -> tuple[list[str], str]:
    """Figures (name, heading, HoloViews object) as HTML sections with their bokeh script for the page
    head; with `png`, each also written as <out stem>_files/<name>.png and linked."""
    from bokeh.embed import components
    from bokeh.embed.bundle import bundle_for_objs_and_resources
    from bokeh.resources import INLINE

    from shardlab import plots as P

    out.parent.mkdir(parents=True, exist_ok=True)
    files = out.with_name(out.stem + "_files")
    models = []
    for i, (name, _, obj) in enumerate(figs, 1):
        say(f"rendering figure {i}/{len(figs)}: {name}")
        models.append(P.render_bokeh(obj))
    script, divs = components(models)
    bundle = bundle_for_objs_and_resources(models, INLINE)
    # Inline mode puts all of bokeh's code in js_raw; the files left are relative extension URLs (panel's
    # module shim, registered on import) that a page opened from disk cannot load and these plots never use.
    bundle.js_files = []
    if png:
        for i, (name, _, obj) in enumerate(figs, 1):
            say(f"writing PNG {i}/{len(figs)}: {files.name}/{name}.png")
            P.save_figure(obj, files / f"{name}.png")
    sections = []
    for (name, heading, _), div in zip(figs, divs):
        link = f" <a href='{files.name}/{name}.png'>PNG</a>" if png else ""
        sections.append(f"<h2>{html.escape(heading)}{link}</h2><div class='fig'>{div}</div>")
    return sections, bundle.scripts() + script


def html_page(title: str, head: str, parts: list[str]) -> str:
    """One self-contained page: the house style, `head` (figure scripts) and the body parts."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style>{head}</head><body>{''.join(parts)}</body></html>")


__all__ = ["write_report", "render_figures", "html_page"]
