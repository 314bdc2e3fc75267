"""A tune's result as one self-contained HTML page (report.py's page and figure machinery): what was
searched, the pick, the Pareto plot (memory per GPU vs tokens/s) and the ranked table with reasons."""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

from shardlab.report import _df_html, html_page, render_figures


def write_tune_report(result, out_html, png: bool = True, progress=None) -> Path:
    from shardlab import plots as P

    from .result import STOP_WHY

    out = Path(out_html)
    s = result.settings
    figs = [("tune_pareto", "Memory per GPU vs tokens/s (measured where run, else predicted)", P.tune_pareto(result.pareto()))]
    sections, head = render_figures(figs, out, png, progress or (lambda what: None))
    t = result.table()
    pick = result.pick
    apart = "".join(f"<p class='note'>Not told apart from <b>{html.escape(c.key)}</b>: their measured tokens/s intervals "
                    "(interquartile step periods) overlap.</p>" for c in result.not_told_apart)
    parts = [f"<h1>shardlab tune: {html.escape(str(s.get('model')))} on {s.get('nodes')} x {s.get('gpus')} {html.escape(str(s.get('target')))}</h1>",
             f"<p class='note'>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Goal <b>{html.escape(result.goal)}</b>, budget "
             f"{html.escape(str(s.get('budget')))}; {len(t)} candidates, {len(result.trials)} trial runs; stopped: "
             f"{html.escape(STOP_WHY.get(result.stop, result.stop))}; {result.wall_s:.1f} s. Tokens/s per GPU; memory in bytes "
             f"(peak reserved per GPU). Step-model error bound {s.get('step_error_bound'):.0%}, memory margin {s.get('memory_margin'):.0%}.</p>",
             "<h2>Pick</h2>" + (f"<p><b>{html.escape(pick.key)}</b> ({'measured' if pick.status == 'completed' else 'by estimate only'})</p>"
                                f"{apart}<pre>{html.escape(pick.plan.to_yaml(minimal=True) or '{}')}</pre>" if pick else "<p>none: nothing fits</p>")]
    parts += sections
    parts.append("<h2>Ranked candidates</h2>" + _df_html(t.set_index("rank"), "trials by measured score, then the unrun by prediction, then the rejected with why"))
    out.write_text(html_page("shardlab tune", head, parts), encoding="utf-8")
    return out
