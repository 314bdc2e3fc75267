"""`shardlab diff A B`: two configs or plans, in any supported format, compared by what they mean.

A and B may each be a shardlab plan, a DeepSpeed JSON or an accelerate YAML. Both are read into
Plans (the importers apply each tool's defaults: a DeepSpeed file without `gradient_clipping` clips at
1.0, an accelerate file without `mixed_precision` runs in fp32), so two files that say the same thing
in different words, or with and without a default spelled out, show no difference. Then:

- every plan setting that differs is one row ("what changes if I move this FSDP1 YAML to FSDP2");
- keys the plan does not model but a file carried (passthrough) are compared with the tool's own
  defaults filled in where one side leaves a key out: DeepSpeed's pydantic config models and its
  constants table, accelerate's `ClusterConfig` and `accelerate launch` option defaults.

`diff(a, b)` returns plain data (the `--json` output); `format_table` renders it for a terminal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shardlab.plan import Plan, config_kind, field_descriptions, load_plan

NOT_SET = "(not set)"


def load_any(source: str | Path | Plan) -> tuple[Plan, str]:
    """(Plan, what it was: plan | deepspeed | accelerate) for a plan, DeepSpeed JSON or accelerate YAML."""
    from shardlab.load import import_config
    from shardlab.load.common import parse_data, read_source

    if isinstance(source, Plan):
        return source, "plan"
    text, name, _ = read_source(source)
    data = parse_data(text, name)
    kind = config_kind(data) if isinstance(data, dict) else "deepspeed"
    if kind == "plan":
        return load_plan(data, check=False), "plan"
    plan, _ = import_config(source)
    return plan, kind


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _same(a: Any, b: Any) -> bool:
    if a in (None, NOT_SET) or a == [] or a == {}:
        return b in (None, NOT_SET) or b == [] or b == {}  # an empty value and no value say the same
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)  # 1 and 1.0 mean the same to every tool here
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()  # 'AdamW' and 'adamw', 'cpu' and 'CPU'
    return a == b


def _settings(plan: Plan, ds_defaults: bool) -> dict[str, Any]:
    """The plan's settings, dotted; a setting left to the training script reads 'auto'."""
    flat = _flat(plan.modelled())
    del flat["auto"]
    if ds_defaults:  # two DeepSpeed setups: a bucket the tool chooses is DeepSpeed's default size
        from shardlab.export import keys as K

        for k in K.DEEPSPEED_KEYS:
            if k.field.startswith("buckets.") and flat.get(k.field) == "auto":
                flat[k.field] = _default("deepspeed", k.key, plan)
    for name in plan.auto:
        if name == "optimizer":
            flat = {k: v for k, v in flat.items() if not k.startswith("optimizer.")}
        flat[name] = "auto"
    return flat


def _setting_rows(pa: Plan, pb: Plan) -> list[dict]:
    both = pa.framework == pb.framework == "deepspeed"
    fa, fb = _settings(pa, both), _settings(pb, both)
    desc = field_descriptions()
    rows = []
    for key in list(fa) + [k for k in fb if k not in fa]:
        a, b = fa.get(key, NOT_SET), fb.get(key, NOT_SET)
        if not _same(a, b):
            rows.append({"key": key, "a": a, "b": b, "kind": "setting", "about": desc.get(key, "")})
    return rows


# ---------------------------------------------------------------------------------------------
# Carried keys with the tools' defaults


def _carried_keys(plan: Plan, tool: str) -> dict[str, Any]:
    """The carried keys the plan's settings do not already stand for."""
    from shardlab.export import keys as K

    modelled = ({k.key for k in K.DEEPSPEED_KEYS} | set(K.DEEPSPEED_COMPOSITE_KEYS)) if tool == "deepspeed" else set()
    return {k: v for k, v in _flat(getattr(plan.passthrough, tool)).items() if k not in modelled and k}


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def deepspeed_defaults_live(stage: int) -> dict[str, Any]:
    """DeepSpeed's own defaults: its pydantic ZeRO / fp16 / bf16 models and the KEY / KEY_DEFAULT constants.

    Importing DeepSpeed takes seconds, so `diff` reads the same table from shardlab/tooldefaults.py;
    tests/test_diff.py checks that table against this live reading."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime import constants as C
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    out = {getattr(C, n): getattr(C, n + "_DEFAULT") for n in dir(C)
           if isinstance(getattr(C, n), str) and hasattr(C, n + "_DEFAULT") and _scalar(getattr(C, n + "_DEFAULT"))}
    out.update(_flat(DeepSpeedZeroConfig(stage=stage).model_dump(by_alias=True, mode="json"), "zero_optimization"))
    out.update(_flat(DeepSpeedFP16Config().model_dump(by_alias=True, mode="json"), "fp16"))
    out.update(_flat(DeepSpeedBF16Config().model_dump(by_alias=True, mode="json"), "bf16"))
    return {k: v for k, v in sorted(out.items()) if _scalar(v)}


def accelerate_defaults_live() -> dict[str, Any]:
    """accelerate's defaults: ClusterConfig's fields (top level) and `accelerate launch`'s options (nested);
    stored in shardlab/tooldefaults.py like DeepSpeed's."""
    import dataclasses

    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    out = {f.name: f.default for f in dataclasses.fields(ClusterConfig) if f.default is not dataclasses.MISSING}
    for a in launch_command_parser()._actions:
        if a.default is not None and a.dest.startswith("fsdp_"):
            out[f"fsdp_config.{a.dest}"] = a.default
        elif a.default is not None and a.dest != "help":
            out.setdefault(f"deepspeed_config.{a.dest}", a.default)
    return {k: v for k, v in sorted(out.items()) if _scalar(v)}


def _default(tool: str, key: str, plan: Plan) -> Any:
    from shardlab import tooldefaults as T
    from shardlab.export import keys as K

    table = T.DEEPSPEED[K.DS_STAGE[plan.sharding]] if tool == "deepspeed" else T.ACCELERATE
    return table.get(key, NOT_SET)


def _carried_rows(pa: Plan, pb: Plan, tool: str, both: bool) -> list[dict]:
    """Rows for carried keys; `both`: A and B are both this tool's configs, so its defaults fill a missing key."""
    ca, cb = _carried_keys(pa, tool), _carried_keys(pb, tool)
    rows = []
    for key in list(ca) + [k for k in cb if k not in ca]:
        a = ca[key] if key in ca else _default(tool, key, pa) if both else NOT_SET
        b = cb[key] if key in cb else _default(tool, key, pb) if both else NOT_SET
        if not _same(a, b):
            where = "a" if key not in cb else "b" if key not in ca else None
            about = f"not modelled by shardlab; {tool}'s default applies on the side that leaves it out" if where else "not modelled by shardlab"
            rows.append({"key": f"{tool}:{key}", "a": a, "b": b, "kind": tool, "about": about})
    return rows


def diff(a: str | Path | Plan, b: str | Path | Plan) -> dict[str, Any]:
    """What differs in meaning between a and b (see the module docstring); one JSON-ready object."""
    pa, ka = load_any(a)
    pb, kb = load_any(b)
    rows = _setting_rows(pa, pb)
    rows += _carried_rows(pa, pb, "deepspeed", pa.framework == pb.framework == "deepspeed")
    rows += _carried_rows(pa, pb, "accelerate", ka == kb == "accelerate")
    return {"a": {"source": str(a) if not isinstance(a, Plan) else "plan", "format": ka, "framework": pa.framework},
            "b": {"source": str(b) if not isinstance(b, Plan) else "plan", "format": kb, "framework": pb.framework},
            "same": not rows, "differences": rows}


def _cell(v: Any, width: int) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(result: dict[str, Any]) -> str:
    """The diff as a fixed-width table for a terminal."""
    a, b = result["a"], result["b"]
    head = f"A: {a['source']} ({a['format']}, {a['framework']})\nB: {b['source']} ({b['format']}, {b['framework']})\n"
    if result["same"]:
        return head + "same meaning: no differences once each tool's defaults are applied.\n"
    rows = [(r["key"], _cell(r["a"], 28), _cell(r["b"], 28)) for r in result["differences"]]
    w = max(len(r[0]) for r in rows + [("setting", "", "")])
    lines = [f"{'setting':<{w}}  {'A':<28}  B", f"{'-' * w}  {'-' * 28}  {'-' * 28}"]
    lines += [f"{k:<{w}}  {x:<28}  {y}" for k, x, y in rows]
    return head + "\n".join(lines) + f"\n{len(rows)} difference(s) in meaning.\n"
