"""`shardlab validate | export | diff | import | translate`: plan and config files in, files out.

None of these needs a model or a machine: they read a plan or a tool's config, check or convert it
through the library (`plan`, `export`, `load`, `diff`) and write the result to stdout or -o.
"""

from __future__ import annotations

import json
import sys

from shardlab.constants import EXIT_BAD_INPUT
from shardlab.plan import load_plan

from .common import PLAN_FILE_HELP, plan_arg, print_findings, print_notes, write_out

EXPORT_TARGETS = ("deepspeed", "accelerate", "fsdp-code", "torchrun", "deepspeed-launch", "accelerate-launch", "slurm")
FRAMEWORKS = ("fsdp1", "fsdp2", "deepspeed")


def cmd_validate(a) -> int:
    plan = plan_arg(a.plan)
    found = plan.findings()
    print_findings(found)
    if any(f.level == "error" for f in found):
        return EXIT_BAD_INPUT
    print(f"{a.plan}: valid ({plan.framework}, {plan.sharding}, {plan.precision}, world size {plan.world_size})")
    return 0


def cmd_export(a) -> int:
    from shardlab.export import export

    plan = load_plan(plan_arg(a.plan))
    print_findings(plan.warnings())
    write_out(export(plan, a.to, resolve=a.resolve), a.output)
    return 0


def cmd_diff(a) -> int:
    from shardlab.diff import diff, format_table

    result = diff(a.a, a.b)
    if a.json:
        print(json.dumps(result, default=str))
    else:
        sys.stdout.write(format_table(result))
    return 0


def cmd_import(a) -> int:
    from pathlib import Path

    from shardlab.load import import_config

    plan, notes = import_config(Path(a.file))
    print_notes(notes)
    write_out(plan.to_yaml(minimal=True) or "{}\n", a.output)
    return 0


def cmd_translate(a) -> int:
    from shardlab.load import translate

    plan, notes = translate(plan_arg(a.plan), a.to)
    print_notes(notes)
    write_out(plan.to_yaml(minimal=True) or "{}\n", a.output)
    return 0


def register(add) -> None:
    """Add this group's subcommands through `add(name, help, **kw)` (see shardlab.cli.build_parser)."""
    s = add("validate", "check a plan file", epilog=PLAN_FILE_HELP)
    s.add_argument("plan")
    s.set_defaults(fn=cmd_validate)

    s = add("export", "write a plan in a real tool's format")
    s.add_argument("plan")
    s.add_argument("--to", required=True, choices=EXPORT_TARGETS)
    s.add_argument("-o", "--output")
    s.add_argument("--resolve", action="store_true", help="write the values the plan assumes instead of 'auto' (to launch without the HF Trainer)")
    s.set_defaults(fn=cmd_export)

    s = add("diff", "two configs or plans (any format) compared by meaning, tool defaults applied")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_diff)

    s = add("import", "DeepSpeed JSON or accelerate YAML -> plan")
    s.add_argument("file")
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_import)

    s = add("translate", "the same setup in another framework, with notes")
    s.add_argument("plan")
    s.add_argument("--to", required=True, choices=FRAMEWORKS)
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_translate)
