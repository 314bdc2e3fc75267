"""The `shardlab` command (DESIGN.md's command-line contract).

Each subcommand is a thin shell over a library function; heavy modules are imported inside the
handler that needs them. Bad input of any kind (PlanError, or a ValueError raised for a bad flag
value) prints its message on stderr and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shardlab.plan import PlanError, load_plan

EXPORT_TARGETS = ("deepspeed", "accelerate", "fsdp-code", "torchrun", "deepspeed-launch", "accelerate-launch", "slurm")


class UsageError(ValueError):
    """A bad flag or argument value: printed and exit 2."""


def _write(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _print_findings(findings) -> None:
    for f in findings:
        print(str(f), file=sys.stderr)


def cmd_validate(a) -> int:
    plan = load_plan(a.plan, check=False)
    found = plan.findings()
    _print_findings(found)
    if any(f.level == "error" for f in found):
        return 2
    print(f"{a.plan}: valid ({plan.framework}, {plan.sharding}, {plan.precision}, world size {plan.world_size})")
    return 0


def cmd_export(a) -> int:
    from shardlab.export import export

    plan = load_plan(a.plan)
    _print_findings(plan.warnings())
    _write(export(plan, a.to), a.output)
    return 0


def cmd_import(a) -> int:
    from shardlab.load import import_config

    plan, notes = import_config(a.file)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    _write(plan.to_yaml(minimal=True) or "{}\n", a.output)
    return 0


def cmd_translate(a) -> int:
    from shardlab.load import translate

    plan, notes = translate(load_plan(a.plan, check=False), a.to)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    _write(plan.to_yaml(minimal=True) or "{}\n", a.output)
    return 0


def _model_arg(a):
    from shardlab.models import resolve_model

    if (a.model is None) == (a.params is None):
        raise UsageError("give exactly one of --model PRESET|SHAPE_FILE or --params N (e.g. --model gpt-1.3b or --params 7e9).")
    return resolve_model(a.model if a.model is not None else a.params)


def cmd_estimate(a) -> int:
    from shardlab.estimate import estimate

    plan = load_plan(a.plan)
    cal = False if a.calibration == "none" else a.calibration
    est = estimate(plan, _model_arg(a), gpu=a.gpu, calibration=cal)
    if a.json:
        print(json.dumps(est.to_dict()))
    else:
        print(est.summary())
    return 0


def cmd_calibrate(a) -> int:
    from shardlab.estimate.calibrate import cli_calibrate

    return cli_calibrate(a)


def cmd_run(a) -> int:
    from shardlab.run.launcher import launch

    plan = load_plan(a.plan)
    run = launch(plan, model=a.model, steps=a.steps, nproc=a.nproc, device=a.device, out=a.out,
                 progress=not a.json, timeout_s=a.timeout)
    try:
        status = run.wait()
    except KeyboardInterrupt:
        run.cancel()
        status = run.status
    if a.json:
        print(json.dumps({"id": run.id, "status": status, "dir": str(run.dir)}))
    else:
        print(f"run {run.id}: {status} ({run.dir})")
    return 0 if status == "completed" else 1


def cmd_runs(a) -> int:
    from shardlab.run.store import list_runs

    df = list_runs(a.dir)
    print(df.to_string(index=False) if len(df) else f"no runs in {a.dir}")
    return 0


def cmd_report(a) -> int:
    from shardlab.report import write_report

    path = write_report(a.run_dirs, a.output)
    print(f"wrote {path}")
    return 0


def cmd_app(a) -> int:
    from shardlab_widgets.app import serve

    serve(port=a.port, show=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardlab", description="Build, check, export, estimate, run and compare FSDP / DeepSpeed ZeRO setups.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="check a plan file")
    s.add_argument("plan")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("export", help="write a plan in a real tool's format")
    s.add_argument("plan")
    s.add_argument("--to", required=True, choices=EXPORT_TARGETS)
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("import", help="DeepSpeed JSON or accelerate YAML -> plan")
    s.add_argument("file")
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("translate", help="the same setup in another framework, with notes")
    s.add_argument("plan")
    s.add_argument("--to", required=True, choices=("fsdp1", "fsdp2", "deepspeed"))
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_translate)

    s = sub.add_parser("estimate", help="memory, communication and step time of a plan")
    s.add_argument("plan")
    s.add_argument("--model", help="preset name (e.g. gpt-tiny, gpt-1.3b, llama-8b) or a YAML/JSON shape file")
    s.add_argument("--params", help="bare parameter count, e.g. 7e9 (model states only)")
    s.add_argument("--gpu", default="h100-80gb", help="GPU name from the GPU table")
    s.add_argument("--calibration", default=None, help="a calibration file or folder; 'none' for the data sheet only (default: this machine's, if any)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_estimate)

    s = sub.add_parser("calibrate", help="measure this GPU's rates for the step-time model (about a minute), or refit from runs")
    s.add_argument("--from-runs", nargs="+", metavar="DIR", help="refit from run folders (or run stores) instead of measuring")
    s.add_argument("--gpu", default=None, help="GPU table name to file the calibration under (default: detected)")
    s.add_argument("--calibration-dir", default=None, help="where calibrations live (default: $SHARDLAB_CALIBRATION_DIR or ~/.cache/shardlab/calibration)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("run", help="a real sharded training run")
    s.add_argument("plan")
    s.add_argument("--model", required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--nproc", type=int, default=None, help="processes per node (default: the plan's gpus_per_node)")
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    s.add_argument("--out", default="runs", help="run store directory")
    s.add_argument("--timeout", type=float, default=None, help="seconds without progress before the run is stopped")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("runs", help="list the run store")
    s.add_argument("dir", nargs="?", default="runs")
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("report", help="tables and figures of runs, as one HTML file")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("app", help="serve the dashboard at http://127.0.0.1:PORT/")
    s.add_argument("--port", type=int, default=5006)
    s.set_defaults(fn=cmd_app)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
