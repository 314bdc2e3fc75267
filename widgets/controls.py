"""Controls generated from the Plan model, so a new Plan field appears in the UI without UI code.

Each pydantic field becomes one control: Literal -> select, bool -> checkbox, int / float -> number
input, anything else ('auto' | int, optional numbers, paths) -> text input parsed by the field's own
type. Labels come from the field names, tooltips from the field `description`s, and nested models
become grouped cards. Beside every control sit two small lines: the validation message of any rule
whose `Finding.field` names it, and the options that cannot apply with the reason. Which options
cannot apply is found by trying each option on a copy of the plan and asking the rules, never by
hand-written UI conditions.

Values set from code (the plan shown, or `ConfigBuilder.set`) travel to the browser, and a browser
that is still busy rendering an earlier one can send that earlier value back afterwards: after
JupyterLab's "Run All" of lab 02 the builder ended on `hybrid`, a value the notebook had set and then
replaced. A change from the browser that repeats a value code set within the last ECHO_S seconds,
but not the latest one, is such an echo: the control is put back to the plan's value instead.
"""

from __future__ import annotations

import html
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union, get_args, get_origin

import panel as pn
from pydantic import BaseModel

from shardlab.plan import Finding, Plan, PlanError, plan_from_dict

NONE_TYPE = type(None)
ECHO_S = 10.0  # how long after code set a value a browser's stale copy of it is treated as an echo


# ------------------------------------------------------------------------------------------------
# The plan as data, and trying a value on a copy


def get_path(plan: BaseModel, path: str) -> Any:
    obj: Any = plan
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def with_value(plan: Plan, path: str, value: Any) -> Plan:
    """A copy of `plan` with the dotted field `path` set to `value` (PlanError if the type is wrong)."""
    data = plan.to_dict()
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return plan_from_dict(data, check=False)


def _blames(f: Finding, path: str) -> bool:
    """True when finding `f` points at `path` itself or at the group holding it ('offload' blames 'offload.params')."""
    return f.field == path or path.startswith(f.field + ".")


# The plan's two primary choices. An option whose error only these can clear "belongs to another
# framework or stage" and is greyed out; one that a neighbouring field can clear stays selectable
# and shows its message instead (FSDP offload wants optimizer and params set together, for example).
AXES = ("framework", "sharding")


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def unavailable_options(plan: Plan, path: str, options: list[Any], errors: list[Finding] | None = None,
                        choices: dict[str, list[Any]] | None = None) -> dict[Any, str]:
    """Options of field `path` that cannot apply under the plan's other choices, with the rule's message.

    Each option is tried on a copy of the plan. It cannot apply when it brings an error blamed on
    `path` (or on its group) that the plan does not already have, and no other value of a neighbouring
    field (same group, framework and sharding excepted; `choices` maps field -> its options) clears it.
    An error blamed on another field does not count: choosing nvme without a path is allowed, the
    missing path is the path field's problem.
    """
    current = get_path(plan, path)
    before = {(f.rule, f.field) for f in (errors if errors is not None else plan.errors())}
    neighbours = [(p, opts) for p, opts in (choices or {}).items()
                  if p != path and p not in AXES and _parent(p) == _parent(path)]
    out: dict[Any, str] = {}
    for opt in options:
        if opt == current:
            continue
        try:
            trial = with_value(plan, path, opt)
        except PlanError as e:
            out[opt] = str(e)
            continue
        new = [f for f in trial.errors() if _blames(f, path) and (f.rule, f.field) not in before]
        for f in new:
            if not _cleared_nearby(trial, f, neighbours):
                out[opt] = f.message
                break
    return out


def _cleared_nearby(trial: Plan, f: Finding, neighbours: list[tuple[str, list[Any]]]) -> bool:
    """True when changing one neighbouring field of `trial` makes finding `f` go away."""
    # The whole rule must go quiet: some rules only move their blame to the neighbour (two ZeRO++
    # switches, say), which is no fix.
    for p, opts in neighbours:
        have = get_path(trial, p)
        for o in opts:
            if o == have:
                continue
            if f.rule not in {g.rule for g in with_value(trial, p, o).errors()}:
                return True
    return False


# ------------------------------------------------------------------------------------------------
# One control per field


def _label(name: str) -> str:
    return name.replace("_", " ")


def _parse_text(text: str, optional: bool) -> Any:
    """Text box content -> the Python value the field's type will judge ('' -> None, '5e8' -> 500000000)."""
    s = text.strip()
    if s == "":
        return None if optional else s
    for conv in (int, float):
        try:
            v = conv(s)
        except ValueError:
            continue
        return int(v) if isinstance(v, float) and v.is_integer() and "e" in s.lower() else v
    return s


@dataclass
class FieldControl:
    """The widget for one dotted Plan field, plus its message and unavailable-options lines."""

    path: str
    kind: str  # select | bool | int | float | text
    options: list[Any]
    optional: bool
    description: str
    widget: Any = None
    message: pn.pane.HTML = None
    hint: pn.pane.HTML = None
    tooltip: Any = None
    layout: pn.Column = None
    shown: tuple = field(default_factory=tuple)
    unavailable: dict = field(default_factory=dict)  # option -> why it cannot apply, as last shown  # what message/hint last showed, to skip no-op updates
    pushed: list = field(default_factory=list)  # (monotonic time, widget value) that code set, newest last

    def remember(self, value: Any) -> None:
        now = time.monotonic()
        self.pushed = [(t, v) for t, v in self.pushed if now - t < ECHO_S] + [(now, value)]

    def is_echo(self, value: Any) -> bool:
        """True when `value` is one code set recently but has since replaced (see the module docstring)."""
        now = time.monotonic()
        recent = [v for t, v in self.pushed if now - t < ECHO_S]
        return len(recent) > 1 and value != recent[-1] and value in recent[:-1]

    def build(self) -> None:
        name = _label(self.path.rsplit(".", 1)[-1])
        css = ["sl-field", "sl-field-" + self.path.replace(".", "-")]
        common = dict(label=name, css_classes=css, sizing_mode="stretch_width")
        if self.kind == "select":
            labels = {str(o): o for o in self.options}
            self.widget = pn.widgets.Select(options=labels, description=self.description, **common)
        elif self.kind == "bool":
            self.widget = pn.widgets.Checkbox(**common)
            self.tooltip = pn.widgets.TooltipIcon(value=self.description, margin=(0, 0))
        elif self.kind == "int":
            self.widget = pn.widgets.IntInput(description=self.description, **common)
        elif self.kind == "float":
            self.widget = pn.widgets.FloatInput(description=self.description, format="0[.]0[00000]", **common)
        else:
            self.widget = pn.widgets.TextInput(description=self.description, placeholder="empty" if self.optional else "", **common)
        slug = self.path.replace(".", "-")
        self.message = pn.pane.HTML("", visible=False, css_classes=["sl-message", "sl-message-" + slug], margin=(0, 10), sizing_mode="stretch_width")
        self.hint = pn.pane.HTML("", visible=False, css_classes=["sl-hint", "sl-hint-" + slug], margin=(0, 10), sizing_mode="stretch_width",
                                 styles={"font-size": "0.8em", "color": "#666"})
        head = pn.Row(self.widget, self.tooltip, sizing_mode="stretch_width") if self.tooltip else self.widget
        self.layout = pn.Column(head, self.message, self.hint, width=300, margin=(0, 5))

    def to_widget(self, value: Any) -> Any:
        if self.kind == "text":
            return "" if value is None else str(value)
        return value

    def from_widget(self) -> Any:
        if self.kind == "text":
            return _parse_text(self.widget.value or "", self.optional)
        return self.widget.value

    def show(self, findings: list[Finding], unavailable: dict[Any, str]) -> None:
        """Put this field's findings beside it and grey out the options that cannot apply."""
        msg_html = "".join(
            f'<div class="sl-{f.level}" style="color:{"#b00020" if f.level == "error" else "#8a6d00"}">'
            f"{'✖' if f.level == 'error' else '⚠'} {html.escape(f.message)}</div>"
            for f in findings
        )
        hint_html = "".join(
            f'<div class="sl-unavailable">{html.escape(self._option_label(o))} unavailable: {html.escape(why)}</div>'
            for o, why in unavailable.items()
        )
        self.unavailable = dict(unavailable)
        state = (msg_html, hint_html)
        if state == self.shown:
            return
        self.shown = state
        self.message.param.update(object=msg_html, visible=bool(msg_html))
        self.hint.param.update(object=hint_html, visible=bool(hint_html))
        if self.kind == "select":
            self.widget.disabled_options = [o for o in self.options if o in unavailable]
        elif self.kind == "bool":
            self.widget.disabled = bool(unavailable)

    def _option_label(self, o: Any) -> str:
        if self.kind == "bool":
            return f"{self.path}={'true' if o else 'false'}"
        return f"{self.path.rsplit('.', 1)[-1]}={o}"


def classify(annotation: Any) -> tuple[str, list[Any], bool]:
    """A field's type -> (control kind, options, optional)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "select", list(get_args(annotation)), False
    if annotation is bool:
        return "bool", [True, False], False
    if annotation is int:
        return "int", [], False
    if annotation is float:
        return "float", [], False
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        rest = [a for a in args if a is not NONE_TYPE]
        return "text", [], len(rest) < len(args)
    return "text", [], False


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


# ------------------------------------------------------------------------------------------------
# The whole form


class PlanForm:
    """Controls for every field of a pydantic model, grouped by nested model.

    `on_change(path, value)` is called when a person changes a control; `on_bad_text(path, message)`
    when a text box holds something its field's type refuses. The form holds no plan: the caller
    pushes one in with `show_plan`.
    """

    def __init__(self, model: type[BaseModel], on_change: Callable[[str, Any], None], prefix: str = ""):
        self.on_change = on_change
        self.controls: dict[str, FieldControl] = {}
        self.group_messages: dict[str, pn.pane.HTML] = {}
        self._syncing = False
        self._from_code = 0
        self._shown_plan = None
        self.layout = self._build(model, prefix)
        self.choices = {p: c.options for p, c in self.controls.items() if c.options}

    def _build(self, model: type[BaseModel], prefix: str) -> pn.viewable.Viewable:
        scalars, cards = [], []
        for name, f in model.model_fields.items():
            path = prefix + name
            sub = _submodel(f.annotation)
            if sub is not None:
                msg = pn.pane.HTML("", visible=False, css_classes=["sl-message"], margin=(0, 10))
                self.group_messages[path] = msg
                inner = self._build(sub, path + ".")
                title = f"{_label(name)} — {f.description}" if f.description else _label(name)
                cards.append(pn.Card(msg, inner, title=title, css_classes=["sl-group", "sl-group-" + path.replace(".", "-")],
                                     sizing_mode="stretch_width", margin=(5, 5)))
                continue
            kind, options, optional = classify(f.annotation)
            c = FieldControl(path, kind, options, optional, f.description or "")
            c.build()
            c.widget.param.watch(lambda ev, c=c: self._changed(c), "value")
            self.controls[path] = c
            scalars.append(c.layout)
        box = pn.FlexBox(*scalars, sizing_mode="stretch_width") if scalars else None
        return pn.Column(*([box] if box else []), *cards, sizing_mode="stretch_width", margin=0)

    def _changed(self, c: FieldControl) -> None:
        if self._syncing:
            return
        if not self._from_code and self._shown_plan is not None and c.is_echo(c.widget.value):
            self._syncing = True  # a stale value back from the browser: show the plan's own again
            try:
                c.widget.value = c.to_widget(get_path(self._shown_plan, c.path))
            finally:
                self._syncing = False
            return
        self.on_change(c.path, c.from_widget())

    def push(self, path: str, value: Any) -> None:
        """Set a control from code, as a person would (its change goes to on_change)."""
        c = self.controls[path]
        c.remember(value)
        self._from_code += 1
        try:
            c.widget.value = value
        finally:
            self._from_code -= 1

    def show_plan(self, plan: Plan) -> None:
        """Make every control show the plan's value (without echoing changes back)."""
        self._syncing = True
        self._shown_plan = plan
        try:
            for path, c in self.controls.items():
                want = c.to_widget(get_path(plan, path))
                if c.kind == "text" and c.from_widget() == get_path(plan, path):
                    continue  # keep the person's spelling ('5e8') when it means the same value
                if c.widget.value != want:
                    if c.kind == "select" and want in c.widget.disabled_options:
                        # The plan (imported, or changed elsewhere) holds it: it must be showable.
                        c.widget.disabled_options = [o for o in c.widget.disabled_options if o != want]
                    c.remember(want)
                    c.widget.value = want
        finally:
            self._syncing = False

    def show_findings(self, plan: Plan, findings: list[Finding], bad_text: dict[str, str] | None = None) -> list[Finding]:
        """Put findings beside their controls and disable options that cannot apply; return findings no control took."""
        errors = [f for f in findings if f.level == "error"]
        by_field: dict[str, list[Finding]] = {}
        for f in findings:
            by_field.setdefault(f.field, []).append(f)
        for path, text in (bad_text or {}).items():
            by_field.setdefault(path, []).insert(0, Finding("error", "bad_value", path, text))
        placed = set()
        for path, c in self.controls.items():
            unavailable = unavailable_options(plan, path, c.options, errors, self.choices) if c.options else {}
            c.show(by_field.get(path, []), unavailable)
            placed.add(path)
        for path, pane in self.group_messages.items():
            fs = by_field.get(path, [])
            body = "".join(f'<div class="sl-{f.level}" style="color:{"#b00020" if f.level == "error" else "#8a6d00"}">'
                           f"{'✖' if f.level == 'error' else '⚠'} {html.escape(f.message)}</div>" for f in fs)
            if pane.object != body:
                pane.param.update(object=body, visible=bool(body))
            placed.add(path)
        return [f for f in findings if f.field not in placed]
