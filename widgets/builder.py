"""ConfigBuilder: build a Plan with controls, see it checked, exported and estimated as you go.

The builder holds a Plan and nothing else of its own (the model and GPU selectors are inputs to the
estimate, not part of the plan). Every change goes: control -> new Plan -> findings beside the
controls, options that cannot apply greyed out, the visible preview tab re-exported, the memory bar
and step time re-estimated. All text and numbers come from shardlab (plan rules, exporters,
estimator); this file only arranges them. The same object displays in JupyterLab and in the served
app (it is a panel Viewer).
"""

from __future__ import annotations

import html
from typing import Any

import panel as pn
import param

from shardlab.estimate.gpus import DEFAULT_GPU
from shardlab.plan import Plan, PlanError, load_plan
from shardlab_widgets.controls import PlanForm, with_value
from shardlab_widgets.memory import MemoryPanel
from shardlab_widgets.preview import PreviewTabs


class ConfigBuilder(pn.viewable.Viewer):
    """Controls for every Plan field with live validation, export previews, import and a memory estimate."""

    plan = param.ClassSelector(class_=Plan, doc="The plan being built; the only state the builder owns.")

    def __init__(self, plan: Plan | dict | str | None = None, *, model: str = "gpt-1.3b", gpu: str = DEFAULT_GPU, **params):
        params["plan"] = load_plan(plan, check=False) if plan is not None else Plan()
        super().__init__(**params)
        self._bad_text: dict[str, str] = {}
        self.form = PlanForm(Plan, self._on_control)
        self.previews = PreviewTabs(lambda: self.plan)
        self.memory = MemoryPanel(model=model, gpu=gpu, plan_getter=lambda: self.plan)
        self.summary = pn.pane.HTML("", css_classes=["sl-summary"], sizing_mode="stretch_width")
        self.other_messages = pn.pane.HTML("", visible=False, css_classes=["sl-other-messages"], sizing_mode="stretch_width")
        self._build_import()
        self.param.watch(lambda ev: self._refresh(), "plan")
        self._refresh()
        self._layout = pn.Column(
            pn.pane.Markdown("## Plan builder", margin=(0, 10)),
            pn.Row(
                pn.Column(self.summary, self.other_messages, self.form.layout, sizing_mode="stretch_width"),
                pn.Column(self.memory.layout, self.previews.layout, self.import_box, width=620),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
            css_classes=["sl-builder"],
        )

    def __panel__(self):
        return self._layout

    # -------------------------------------------------------------------------------------------
    # Python-level driving (tests, notebooks)

    def control(self, path: str):
        """The panel widget for a dotted Plan field, e.g. builder.control('offload.params')."""
        return self.form.controls[path].widget

    def set(self, path: str, value: Any) -> None:
        """Change one field as a person would through its control."""
        c = self.form.controls[path]
        self.form.push(path, c.to_widget(value))

    def messages(self, path: str | None = None) -> list[str]:
        """Messages shown beside `path`'s control (all findings when None), as a person would read them."""
        if path is None:
            return [f.message for f in self.plan.findings()] + list(self._bad_text.values())
        found = [f.message for f in self.plan.findings() if f.field == path]
        return ([self._bad_text[path]] if path in self._bad_text else []) + found

    def disabled_options(self, path: str) -> list[Any]:
        """Options of `path` greyed out because they cannot apply (with reasons in `unavailable(path)`)."""
        return list(self.form.controls[path].unavailable)

    def unavailable(self, path: str) -> dict[Any, str]:
        return dict(self.form.controls[path].unavailable)

    def preview_text(self, target: str) -> str:
        return self.previews.text(target)

    # -------------------------------------------------------------------------------------------

    def _on_control(self, path: str, value: Any) -> None:
        try:
            new = with_value(self.plan, path, value)
        except PlanError as e:
            # The control holds something the field's type refuses; the plan keeps its last good value.
            self._bad_text[path] = str(e)
            self._refresh()
            return
        self._bad_text.pop(path, None)
        self.plan = new

    def _refresh(self) -> None:
        plan = self.plan
        self.form.show_plan(plan)
        findings = plan.findings()
        leftover = self.form.show_findings(plan, findings, self._bad_text)
        n_err = sum(f.level == "error" for f in findings) + len(self._bad_text)
        n_warn = sum(f.level == "warning" for f in findings)
        if n_err:
            text = f'<b style="color:#b00020">{n_err} error{"s" * (n_err != 1)}</b> — see the messages beside the controls.'
        elif n_warn:
            text = f'<b style="color:#8a6d00">valid, {n_warn} warning{"s" * (n_warn != 1)}</b>'
        else:
            text = '<b style="color:#1b7f3b">valid</b>'
        self.summary.object = f"{text} {plan.framework} · {plan.sharding} · {plan.precision} · world size {plan.world_size}"
        other = "".join(f"<div>{'✖' if f.level == 'error' else '⚠'} {f.field}: {f.message}</div>" for f in leftover)
        self.other_messages.param.update(object=other, visible=bool(other))
        self.previews.refresh()
        self.memory.refresh()

    # -------------------------------------------------------------------------------------------
    # Import

    def _build_import(self) -> None:
        # Uploads only: the page may be open to whoever reaches the server, so nothing typed or
        # uploaded is ever taken as a path on the server's disk (issue 19).
        self.upload = pn.widgets.FileInput(accept=".json,.yaml,.yml", css_classes=["sl-import-upload"])
        self.import_notes = pn.pane.HTML("", css_classes=["sl-import-notes"], sizing_mode="stretch_width")
        self.upload.param.watch(lambda ev: ev.new and self.import_config(ev.new, name=self.upload.filename or "upload"), "value")
        self.import_box = pn.Card(
            pn.pane.Markdown("Upload an existing DeepSpeed JSON or accelerate YAML to load it into the builder."),
            self.upload, self.import_notes,
            title="Import a config", collapsed=False, sizing_mode="stretch_width",
        )

    def import_config(self, source: str | bytes, name: str | None = None) -> list[str]:
        """Load a DeepSpeed JSON / accelerate YAML into the builder; returns the notes.

        `source` is the config's text (or uploaded bytes), never a path: to import a file from a
        notebook, read it yourself (`builder.import_config(Path(f).read_text(), name=f)`)."""
        from shardlab.load import import_config
        from shardlab.safe_input import decode

        try:
            text = decode(source, name or "upload", "config")
            plan, notes = import_config(text, name=name or "upload")
        except PlanError as e:
            self.import_notes.object = f'<div class="sl-error" style="color:#b00020">✖ {_esc(str(e))}</div>'
            return []
        self._bad_text.clear()
        self.plan = plan
        where = f" from {_esc(name)}" if name else ""
        items = "".join(f"<li>{_esc(n)}</li>" for n in notes) or "<li>everything carried over</li>"
        self.import_notes.object = f"<div class='sl-imported'>Imported{where}. Notes:</div><ul>{items}</ul>"
        return list(notes)


def _esc(s: str) -> str:
    return html.escape(s)

