"""DiffPanel: paste two configs (plans, DeepSpeed JSON or accelerate YAML) and see what differs in meaning.

Every row comes from `shardlab.diff.diff` (the same as `shardlab diff A B`); the panel only lays it out.
"""

from __future__ import annotations

import html
import json

import panel as pn

from shardlab.plan import PlanError


class DiffPanel:
    """Two text boxes, a Compare button and the differences as a table."""

    def __init__(self):
        self.a = pn.widgets.TextAreaInput(label="A", placeholder="plan, ds_config.json or accelerate YAML", height=160,
                                          sizing_mode="stretch_width", css_classes=["sl-diff-a"])
        self.b = pn.widgets.TextAreaInput(label="B", placeholder="the config to compare it with", height=160,
                                          sizing_mode="stretch_width", css_classes=["sl-diff-b"])
        self.button = pn.widgets.Button(label="Compare by meaning", css_classes=["sl-diff-button"])
        self.result = pn.pane.HTML("", css_classes=["sl-diff-result"], sizing_mode="stretch_width")
        self.button.on_click(lambda ev: self.compare())
        self.layout = pn.Card(
            pn.pane.Markdown("Two configs in any format, compared with each tool's defaults applied "
                             "(`shardlab diff A B`)."),
            pn.Row(self.a, self.b, sizing_mode="stretch_width"), self.button, self.result,
            title="Compare two configs", collapsed=True, sizing_mode="stretch_width", css_classes=["sl-diff"])

    def compare(self) -> dict | None:
        """Compare the two boxes; returns the diff (None, with the message shown, when a box cannot be read)."""
        from shardlab.diff import diff

        try:
            result = diff(self.a.value or "", self.b.value or "")
        except PlanError as e:
            self.result.object = f'<div class="sl-error" style="color:#b00020">✖ {html.escape(str(e))}</div>'
            return None
        self.result.object = _table(result)
        return result


def _cell(v) -> str:
    return html.escape(v if isinstance(v, str) else json.dumps(v, default=str))


def _table(result: dict) -> str:
    if result["same"]:
        return "<div class='sl-diff-same'>Same meaning: no differences once each tool's defaults are applied.</div>"
    rows = "".join(f"<tr><td><code>{html.escape(r['key'])}</code></td><td>{_cell(r['a'])}</td><td>{_cell(r['b'])}</td>"
                   f"<td>{html.escape(r['about'])}</td></tr>" for r in result["differences"])
    return ("<table class='sl-diff-table'><tr><th>setting</th><th>A</th><th>B</th><th>what it is</th></tr>"
            f"{rows}</table><div>{len(result['differences'])} difference(s) in meaning.</div>")
