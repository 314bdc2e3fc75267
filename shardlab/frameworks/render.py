"""Fill the FSDP script template (templates/train_fsdp.py) from an adapter's settings.

The template is a real Python file holding both FSDP versions. Rendering keeps the region of the
plan's version (`# region fsdp1` ... `# endregion fsdp1`), rewrites the `settings` region as one
constant per settings field, replaces the `from shardlab.frameworks.units import ...` line with those
functions' source (the exported script does not need shardlab, and wraps exactly the units shardlab
chooses), renames the demo block class to the plan's block class, and swaps in the plan's docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from importlib import resources

TEMPLATE = "train_fsdp.py"
FRAMEWORKS = ("fsdp1", "fsdp2")
_UNITS_IMPORT = "from shardlab.frameworks.units import module_tree, size_units\n"


def template_text() -> str:
    return resources.files("shardlab.frameworks").joinpath("templates", TEMPLATE).read_text()


def constants(settings) -> dict:
    """A settings dataclass as the template's constants (field name upper-cased)."""
    return {f.name.upper(): getattr(settings, f.name) for f in dataclasses.fields(settings)}


def _regions(text: str, keep: str) -> str:
    """Drop the other framework's regions, unwrap the kept one."""
    for fw in FRAMEWORKS:
        pattern = re.compile(rf"^# region {fw}\n(.*?)^# endregion {fw}\n", re.S | re.M)
        text = pattern.sub((lambda m: m.group(1)) if fw == keep else "", text)
    return text.replace("  # noqa: F811 (the template holds both FSDP versions)", "").replace("  # noqa: F811", "")


def _py(v) -> str:
    """A Python literal in the template's style (double-quoted strings)."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(map(_py, v)) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _settings_block(values: dict) -> str:
    head = f"# The plan's settings, as shardlab's {values['FRAMEWORK']} adapter resolved them (shardlab/frameworks/).\n"
    return head + "".join(f"{k} = {_py(v)}\n" for k, v in values.items())


def _units_source() -> str:
    from shardlab.frameworks import units

    parts = [f"NEVER_UNITS = {units.NEVER_UNITS!r}\nLEAVES = {units.LEAVES!r}\n\n\n"]
    parts += [inspect.getsource(obj) + "\n\n" for obj in (units.Node, units.size_units, units.module_tree)]
    return "# Size-based wrap units: the algorithm shardlab uses (shardlab/frameworks/units.py).\n" + "".join(parts)


def script_doc(plan, framework: str, how: str) -> str:
    """The exported script's docstring: `framework` ("FSDP1"), how it shards the plan's sharding
    (`how`, e.g. "FULL_SHARD"), precision, topology, and how to run it."""
    t = plan.topology
    return (f"{framework} training set-up exported by shardlab: {plan.sharding} ({how}), {plan.precision}, "
            f"{t.nodes} node(s) x {t.gpus_per_node} GPU(s).\n\n"
            f"Run on each node: torchrun --nnodes={t.nodes} --nproc-per-node={t.gpus_per_node} THIS_FILE [--steps N] [--save DIR]\n"
            "(CUDA + NCCL when GPUs are present, otherwise CPU + gloo). `shard_model(model, device)` applies the\n"
            "plan to any model; `main()` trains a tiny demo model with it. The constants below are the plan's settings.")


def render(settings, doc: str) -> str:
    """The script for `settings` (an fsdp1 or fsdp2 Settings) with module docstring `doc`."""
    values = constants(settings)
    framework = values["FRAMEWORK"]
    text = _regions(template_text(), framework)
    text = re.sub(r"^# region settings\n.*?^# endregion settings\n", lambda m: _settings_block(values), text, flags=re.S | re.M)
    text = re.sub(r'\A""".*?"""\n', lambda m: f'"""{doc}\n"""\n', text, flags=re.S)
    if _UNITS_IMPORT in text:
        uses_size = values["WRAP_POLICY"] == "size"
        text = text.replace(_UNITS_IMPORT, "from dataclasses import dataclass, field\n" if uses_size else "")
        if uses_size:
            text = text.replace("def wrap_units(model):", _units_source() + "def wrap_units(model):")
        else:
            text = text.replace('        return [model.get_submodule(path) for path, _ in size_units(module_tree(model), MIN_NUM_PARAMS)]\n',
                                '        raise ValueError("size-based units: export with wrap.policy size")\n')
    block = values["BLOCK_CLASS_NAMES"][0]
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.replace("class Block(nn.Module):", f"class {block}(nn.Module):").replace("[Block(WIDTH)", f"[{block}(WIDTH)")
