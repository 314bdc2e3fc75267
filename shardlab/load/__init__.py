"""The real tools' formats -> Plan (DeepSpeed JSON, accelerate YAML), and translate() between frameworks.

Importers read the same key table the exporters write (shardlab/export/keys.py), so export ->
import -> export gives the same file. Nothing is dropped silently: every key that does not map to a
Plan field comes back as a note, and every "auto" (the HF Trainer's placeholder) says what shardlab
used instead. A file that cannot be read, or that describes an impossible setup (e.g. DeepSpeed's
`offload_param` with stage 2, which DeepSpeed itself accepts), raises PlanError.
"""

from __future__ import annotations

from pathlib import Path

from shardlab.plan import Plan, bad_input, plan_from_dict

from .accelerate import _from_accelerate
from .common import parse_data, read_source
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
    if "framework" in data or "sharding" in data:
        raise bad_input(name, f"{name} looks like a shardlab plan (it has framework/sharding), not a DeepSpeed or accelerate config. "
                        "Use it directly: shardlab validate / export / translate.")
    if "distributed_type" in data or "compute_environment" in data or "fsdp_config" in data:
        fields, notes = _from_accelerate(data, folder)
    else:
        fields, notes = _from_deepspeed(data)
    return plan_from_dict(fields), notes
