"""The `shardlab` command (DESIGN.md's command-line contract): one parser, assembled from groups.

The subcommands live in `shardlab.commands` (configs: validate/export/diff/import/translate;
estimating: estimate/calibrate; running: run/runs/report/app/doctor; tuning: tune); a new subcommand goes into the
group it belongs to (or a new group module listed in GROUPS) with its handler and its arguments together.
Each subcommand is a thin shell over a library function; heavy modules are imported inside the
handler that needs them. Bad input of any kind (PlanError, or a ValueError raised for a bad flag
value) prints its message on stderr and exits 2, never a traceback. Output piped into a program that
stops reading (`shardlab runs | head`) ends quietly, as other command-line tools do.
"""

from __future__ import annotations

import argparse
import os
import sys

from shardlab.commands import configs, estimating, running, tuning
from shardlab.commands.common import PLAN_FILE_HELP, UsageError, check_output, say
from shardlab.constants import EXIT_BAD_INPUT
from shardlab.plan import PlanError

__all__ = ["GROUPS", "UsageError", "build_parser", "main"]

GROUPS = (configs, estimating, running, tuning)  # the order `shardlab --help` lists their subcommands in


def build_parser() -> argparse.ArgumentParser:
    from shardlab import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="shardlab", formatter_class=fmt,
                                description="Build, check, export, estimate, run and compare FSDP / DeepSpeed ZeRO setups.",
                                epilog=PLAN_FILE_HELP + "\n\nFirst time on a machine: shardlab doctor. Each command has --help.")
    p.add_argument("--version", action="version", version=f"shardlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help, **kw):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=fmt, **kw)

    for group in GROUPS:
        group.register(add)
    return p


def _quiet_broken_pipe() -> int:
    """The reader went away (`| head`): stop writing, without a traceback or a second error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # --help | head: a broken pipe here too
        check_output(getattr(args, "output", None))
        code = args.fn(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (PlanError, UsageError) as e:
        say(f"error: {e}")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
