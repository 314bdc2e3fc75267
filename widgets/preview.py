"""Live export previews: one tab per real tool's format, each with copy and download.

Only the visible tab is re-exported when the plan changes (the others are marked stale and rendered
when shown), so a control change costs one export, not five. The visible tab follows the plan's
framework: a tab that has no export for it (DeepSpeed JSON for an FSDP plan, FSDP code for a DeepSpeed
plan) gives way to the framework's own (FSDP code, DeepSpeed JSON). The text is whatever
`shardlab.export.export(plan, target)` returns; when the plan cannot be exported the tab says why.
"""

from __future__ import annotations

import html
import io
from typing import Callable

import panel as pn

from shardlab.plan import Plan, PlanError

# (tab title, export target or None for the launcher choice, download file name)
TABS = (
    ("DeepSpeed JSON", "deepspeed", "ds_config.json"),
    ("accelerate YAML", "accelerate", "accelerate_config.yaml"),
    ("FSDP code", "fsdp-code", "train_fsdp.py"),
    ("Launch command", None, "launch.sh"),
    ("SLURM script", "slurm", "job.slurm"),
)
LAUNCHERS = ("auto", "torchrun", "deepspeed-launch", "accelerate-launch")
DS_TAB, FSDP_TAB = 0, 2
PREVIEW_HEIGHT = 420  # px


def home_tab(framework: str, shown: int) -> int:
    """The tab to show for a plan of `framework` when `shown` is visible: `shown`, unless it has no export
    for this framework, then the framework's own tab."""
    if framework == "deepspeed":
        return DS_TAB if shown == FSDP_TAB else shown
    return FSDP_TAB if shown == DS_TAB else shown


def export_text(plan: Plan, target: str) -> str:
    """The exporter's text, or a comment saying why this plan cannot be exported to `target`.

    A plan with errors is not exported, as `shardlab export` refuses it: some of those errors (a
    ZeRO-2 config with offload_param) the real tools would accept silently and then ignore.
    """
    errors = plan.errors()
    if errors:
        lines = "\n".join(f"#   {f.message}" for f in errors)
        return f"# cannot export to {target} until this is fixed:\n{lines}\n"
    try:
        from shardlab.export import export

        return export(plan, target)
    except ImportError:
        return f"# the {target} exporter is not installed in this build of shardlab"
    except PlanError as e:  # the exporter's own refusal, e.g. DeepSpeed JSON for an FSDP plan
        lines = "\n".join(f"#   {line}" for line in str(e).splitlines())
        return f"# no {target} export for this plan:\n{lines}\n"


class PreviewTabs:
    """Tabs of exported text for the plan that `plan_getter` returns."""

    def __init__(self, plan_getter: Callable[[], Plan]):
        self.plan_getter = plan_getter
        self.launcher = pn.widgets.RadioButtonGroup(options=list(LAUNCHERS), value="auto", color="light", css_classes=["sl-launcher-choice"])
        self.launcher.param.watch(lambda ev: self._render(3), "value")
        self._text: list[str] = [""] * len(TABS)
        self._stale = [True] * len(TABS)
        self._panes: list[pn.pane.HTML] = []
        self._raw: list[pn.widgets.TextAreaInput] = []
        tabs = []
        for i, (title, target, filename) in enumerate(TABS):
            slug = (target or "launch").replace("-", "")
            # A fixed height, whatever the text: a tab whose text grows must never push under (or be
            # covered by) what sits below the tabs, e.g. the import card.
            pane = pn.pane.HTML("", css_classes=["sl-preview", "sl-preview-" + slug], sizing_mode="stretch_width",
                                height=PREVIEW_HEIGHT, styles={"overflow": "auto"})
            # The raw text rides along hidden so the copy button's browser code can read it.
            raw = pn.widgets.TextAreaInput(value="", visible=False)
            copy = pn.widgets.Button(label="Copy", color="light", width=90, css_classes=["sl-copy"])
            copy.js_on_click(args={"raw": raw}, code="navigator.clipboard.writeText(raw.value)")
            download = pn.widgets.FileDownload(callback=lambda i=i: io.StringIO(self._current(i)), filename=filename,
                                               label=f"Download {filename}", embed=False, color="light", width=230,
                                               css_classes=["sl-download"])
            head = [copy, download] if target else [self.launcher, copy, download]
            tabs.append((title, pn.Column(pn.Row(*head), raw, pane, sizing_mode="stretch_width")))
            self._panes.append(pane)
            self._raw.append(raw)
        self.tabs = pn.Tabs(*tabs, dynamic=False, sizing_mode="stretch_width", css_classes=["sl-preview-tabs"])
        self.tabs.param.watch(lambda ev: self._render(ev.new), "active")
        self.layout = self.tabs

    def target(self, i: int) -> str:
        t = TABS[i][1]
        if t is not None:
            return t
        choice = self.launcher.value
        if choice == "auto":
            return "deepspeed-launch" if self.plan_getter().framework == "deepspeed" else "torchrun"
        return choice

    def text(self, target: str) -> str:
        """The preview text for an export target (computed now, whatever tab is shown)."""
        return export_text(self.plan_getter(), target)

    def refresh(self) -> None:
        """The plan changed: re-export the visible tab (moving to the framework's own tab where the
        visible one has no export for it), mark the others stale."""
        self._stale = [True] * len(TABS)
        home = home_tab(self.plan_getter().framework, self.tabs.active)
        if home != self.tabs.active:
            self.tabs.active = home  # its watcher renders it
        else:
            self._render(home)

    def _current(self, i: int) -> str:
        if self._stale[i]:
            self._render(i)
        return self._text[i]

    def _render(self, i: int) -> None:
        text = export_text(self.plan_getter(), self.target(i))
        self._stale[i] = False
        if text == self._text[i]:
            return
        self._text[i] = text
        self._raw[i].value = text
        self._panes[i].object = f"<pre style='margin:0;font-size:12px;white-space:pre'>{html.escape(text)}</pre>"

    def shown_text(self, i: int | None = None) -> str:
        """What the tab `i` (default: the visible one) shows right now."""
        return self._text[self.tabs.active if i is None else i]
