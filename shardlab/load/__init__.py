"""The real tools' formats -> Plan (DeepSpeed JSON, accelerate YAML), and translate() between frameworks.

Importers read the same key table the exporters write (shardlab/export/keys.py) and apply each
tool's defaults (a DeepSpeed file without `gradient_clipping` clips at 1.0). Nothing is dropped: "auto"
(the HF Trainer's placeholder) puts the setting on the plan's `auto` list, and every key the plan does
not model, or that the file spells its own way, is carried in the plan's `passthrough` (export/carry.py)
so that import -> export to the same tool gives the file back key by key; the notes list both. A file that cannot be read, or that describes an impossible setup (e.g. DeepSpeed's
`offload_param` with stage 2, which DeepSpeed itself accepts), raises PlanError.
"""

from __future__ import annotations

from pathlib import Path

from shardlab.plan import Passthrough, Plan, bad_input, config_kind, plan_from_dict

from .accelerate import _from_accelerate
from .common import _plain, parse_data, read_source
from .deepspeed import _from_deepspeed
from .translate import translate

__all__ = ["import_config", "translate"]


def import_config(source: str | Path, *, name: str | None = None) -> tuple[Plan, list[str]]:
    """A DeepSpeed JSON or accelerate YAML (path or text) -> (Plan, notes on what did not carry over).

    With `name` (an upload's file name), `source` is the config's text and is never read as a path,
    and files it refers to (accelerate's deepspeed_config_file) are not followed."""
    text, name, folder = read_source(source, name=name)
    data = parse_data(text, name)
    if not isinstance(data, dict) or not data:
        raise bad_input(name, f"{name} is not a DeepSpeed JSON object or an accelerate YAML mapping (got {type(data).__name__}). Give a config file.")
    data = {str(k): v for k, v in data.items()}
    kind = config_kind(data)
    if kind == "plan":
        raise bad_input(name, f"{name} looks like a shardlab plan (it has framework/sharding), not a DeepSpeed or accelerate config. "
                        "Use it directly: shardlab validate / export / translate.")
    docs: dict = {}
    if kind == "accelerate":
        docs["accelerate"] = data = _plain(data)
        fields, notes = _from_accelerate(data, folder, docs)
    else:
        docs["deepspeed"] = data = _plain(data)
        fields, notes = _from_deepspeed(data)
    plan = plan_from_dict(fields)
    if plan.auto:
        notes.append("left to the training script ('auto', kept as 'auto' on export): " + ", ".join(plan.auto)
                     + "; estimates and runs assume " + ", ".join(f"{k}={v}" for k, v in plan.assumed().items()) + ".")
    return carry_into(plan, docs, notes), notes


def carry_into(plan: Plan, docs: dict, notes: list[str]) -> Plan:
    """The plan with what each imported file says beyond it (export/carry.py), and a note listing it."""
    from shardlab.export import accelerate, deepspeed
    from shardlab.export.carry import dotted, fingerprint, leaves, reconcile

    pt: dict = {"omit": {}}
    for tool, doc in docs.items():
        natural = (deepspeed.natural_config(plan) if tool == "deepspeed" else accelerate.natural_config(plan))
        keep = (("deepspeed_config", "deepspeed_config_file"),) if tool == "accelerate" else ()
        pt[tool], omit = reconcile(doc, natural, keep)
        if omit:
            pt["omit"][tool] = omit
        carried = [dotted(p) for p, _ in leaves(pt[tool]) if p not in keep]  # names only: a value may be a secret
        if carried:
            more = f" and {len(carried) - 12} more" if len(carried) > 12 else ""
            notes.append(f"{len(carried)} key(s) carried unchanged into the plan's passthrough.{tool} (written back on export to {tool}): "
                         f"{', '.join(carried[:12])}{more}.")
    pt["imported"] = fingerprint(plan.modelled())
    return plan.model_copy(update={"passthrough": Passthrough.model_validate(pt)})
