"""RunCompare: pick runs from the run store and see them side by side.

The list is `shardlab.run.store.list_runs(dir)`, the table is `shardlab.compare.compare(runs)` styled
by `style_compare`, and the figures are whatever `shardlab.plots` draws for those runs; this file only
wires the selection to them.
"""

from __future__ import annotations

import html
import time
from typing import Any

import panel as pn

from shardlab.plan import PlanError
from shardlab.run.store import default_runs_dir

# (tab title, shardlab.plots function name); a name plots does not (yet) have is left out.
FIGURES = (
    ("Loss", "loss_curves"),
    ("Memory timeline", "memory_timeline"),
    ("Memory: measured vs predicted", "memory_breakdown"),
    ("Communication", "comm_bytes"),
    ("Throughput", "throughput"),
)


def _label(row: Any) -> str:
    parts = [str(row.get("id")), str(row.get("status")), f"{row.get('framework')}/{row.get('sharding')}",
             str(row.get("model")), f"{row.get('device')} x{row.get('world_size')}"]
    return "  ".join(p for p in parts if p and p != "None")


class RunCompare(pn.viewable.Viewer):
    """A run picker over the store, the comparison table and the figures for the picked runs."""

    def __init__(self, runs_dir: str | None = None, **params):
        super().__init__(**params)
        self.runs_dir = pn.widgets.TextInput(label="run store", value=runs_dir or default_runs_dir(), width=300, css_classes=["sl-cmp-dir"])
        self.picker = pn.widgets.MultiSelect(label="runs", options={}, size=8, sizing_mode="stretch_width", css_classes=["sl-cmp-picker"])
        self.refresh_button = pn.widgets.Button(label="Refresh list", width=110, css_classes=["sl-cmp-refresh"])
        self.compare_button = pn.widgets.Button(label="Compare", color="primary", width=110, css_classes=["sl-cmp-go"])
        self.message = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["sl-cmp-message"])
        self.table = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["sl-cmp-table"], styles={"overflow-x": "auto"})
        self.figures = pn.Tabs(dynamic=True, sizing_mode="stretch_width", css_classes=["sl-cmp-figures"])
        self.frame = None  # the last comparison DataFrame
        self.refresh_button.on_click(lambda ev: self.refresh())
        self.compare_button.on_click(lambda ev: self.compare())
        self.runs_dir.param.watch(lambda ev: self.refresh(), "value")
        self.refresh()
        self._layout = pn.Column(
            pn.pane.Markdown("## Compare runs", margin=(0, 10)),
            pn.Row(self.runs_dir, self.refresh_button, self.compare_button),
            self.picker, self.message, self.table, self.figures,
            sizing_mode="stretch_width", css_classes=["sl-compare"],
        )

    def __panel__(self):
        return self._layout

    def refresh(self) -> None:
        """Re-read the run store; keeps the picked runs that still exist."""
        from shardlab.run.store import list_runs

        df = list_runs(self.runs_dir.value)
        options = {_label(row): row["dir"] for row in df.to_dict("records")} if len(df) else {}
        keep = [v for v in self.picker.value if v in options.values()]
        self.picker.param.update(options=options, value=keep)
        self.message.object = "" if options else f"no runs in {html.escape(self.runs_dir.value)} yet"

    def select(self, ids_or_dirs: list[str]) -> None:
        """Pick runs by id or folder (Python-level driving)."""
        chosen = [d for d in self.picker.options.values() if any(str(d) == x or str(d).rstrip("/").endswith("/" + x) for x in ids_or_dirs)]
        self.picker.value = chosen

    def compare(self):
        """Build the table and the figures for the picked runs; returns the comparison DataFrame."""
        from shardlab.compare import compare, style_compare

        runs = list(self.picker.value)
        if not runs:
            self.message.object = "pick one or more runs first"
            return None
        try:
            df = compare(runs)
        except PlanError as e:
            self.message.object = f'<span style="color:#b00020">✖ {html.escape(str(e))}</span>'
            return None
        self.frame = df
        self.table.object = style_compare(df).to_html()
        self.figures.clear()
        # The figures take seconds per run on a small machine: say so, spin, and (in a served page)
        # let the table reach the browser first by building them on the next tick.
        self.message.object = f'<span class="sl-cmp-building">building the figures for {len(runs)} run(s)…</span>'
        self.figures.loading = True
        doc = pn.state.curdoc
        if doc is not None and getattr(doc, "session_context", None) is not None:
            doc.add_next_tick_callback(lambda: self._fill_figures(runs))
        else:
            self._fill_figures(runs)
        return df

    def _fill_figures(self, runs: list[str]) -> None:
        started = time.monotonic()
        built = 0
        try:
            for title, fig in self._figures(runs):
                self.figures.append((title, fig))
                built += 1
        finally:
            self.figures.loading = False
            # The spinner can come and go between two looks of a user (or a test): the outcome stays.
            self.message.object = (f'<span class="sl-cmp-built">built {built} figure(s) for {len(runs)} run(s) '
                                   f'in {time.monotonic() - started:.1f} s</span>')

    def _figures(self, runs: list[str]) -> list[tuple[str, Any]]:
        try:
            from shardlab import plots
        except ImportError:
            return []
        out = []
        for title, name in FIGURES:
            fn = getattr(plots, name, None)
            if fn is None:
                continue
            try:
                out.append((title, pn.panel(fn(runs), sizing_mode="stretch_width")))
            except (PlanError, ValueError, KeyError) as e:
                out.append((title, pn.pane.HTML(f"<i>{html.escape(str(e))}</i>")))
        return out
