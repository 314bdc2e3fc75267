"""`shardlab estimate | calibrate`: what a plan costs on a model, and this GPU's rates for that.

`estimate` takes the model as --model (a preset, shape file or model source) or --params N and prints
the estimate's summary, or one JSON object with `--json` (memory and communication in bytes).
"""

from __future__ import annotations

import json

from shardlab.plan import load_plan

from .common import MODEL_HELP, PLAN_FILE_HELP, UsageError, describe_model, model_names, model_text, plan_arg, say_assumed


def model_arg(a):
    """The ModelSpec of --model or --params (exactly one of them)."""
    from shardlab.models import bare, resolve_model

    if (a.model is None) == (a.params is None):
        raise UsageError("give exactly one of --model PRESET|SHAPE_FILE|SOURCE or --params N (e.g. --model gpt-1.3b, --model hf:llama, or --params 7e9).")
    # --params is a count, never a model name: `--params abc` was refused as "--model='abc'"
    return resolve_model(model_text(a.model)) if a.model is not None else bare(a.params)


def _model_json(spec) -> dict:
    from shardlab.models import flops_per_token

    return {"source": spec.source, "wrap_class": spec.wrap_cls, "wrap_units": spec.wrap_unit_count,
            "flops_per_token": flops_per_token(spec)}


def _traced(plan, spec, gpu, cal):
    """estimate(method="trace"), its step's failure outside the model's code (trace.TraceFailed) as bad input:
    an estimate that cannot be made is a message and exit 2, not a traceback. What the step prints is held
    back until it ends: FSDP1's failed checks (torch.distributed.utils._p_assert) print their message and
    the stack before raising, which the message replaces; otherwise it is written out as it came."""
    import contextlib
    import io
    import sys

    from shardlab.estimate import estimate
    from shardlab.estimate.trace import TraceFailed
    from shardlab.plan import bad_input

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return estimate(plan, spec, gpu=gpu, method="trace", calibration=cal)
    except TraceFailed as e:
        out, err = io.StringIO(), io.StringIO()  # the message replaces what the failing check printed
        raise bad_input("--trace", str(e)) from None
    finally:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())


def cmd_estimate(a) -> int:
    from shardlab.estimate import estimate

    plan = load_plan(plan_arg(a.plan))
    spec = model_arg(a)
    cal = False if a.calibration == "none" else a.calibration
    if getattr(a, "trace", False):
        est = _traced(plan, spec, a.gpu, cal)
    else:
        est = estimate(plan, spec, gpu=a.gpu, calibration=cal)
    say_assumed(plan)
    if a.json:
        out = est.to_dict()
        out["model"].update(_model_json(spec))
        if plan.auto:
            out["assumed"] = plan.assumed()
        print(json.dumps(out))
    else:
        line = describe_model(spec)
        print(est.summary() + (f"\n{line}" if line else ""))
    return 0


def cmd_calibrate(a) -> int:
    from shardlab.estimate.calibrate import cli_calibrate

    return cli_calibrate(a)


def gpu_names() -> str:
    from shardlab.estimate.gpus import GPUS

    return ", ".join(GPUS)


def register(add) -> None:
    """Add this group's subcommands through `add(name, help, **kw)` (see shardlab.cli.build_parser)."""
    from shardlab.estimate.gpus import DEFAULT_GPU

    s = add("estimate", "memory, communication and step time of a plan",
            epilog=f"GPUs (--gpu): {gpu_names()}\nModel presets (--model): {model_names()}\n\n{PLAN_FILE_HELP}")
    s.add_argument("plan")
    s.add_argument("--model", nargs="+", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--params", help="bare parameter count, e.g. 7e9 (model states only)")
    s.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU name from the GPU table (listed below; default {DEFAULT_GPU})")
    s.add_argument("--calibration", default=None, help="a calibration file or folder; 'none' for the data sheet only (default: this machine's, if any)")
    s.add_argument("--trace", action="store_true", help="peak memory from one training step on fake tensors (seconds, no GPU) instead of the formulas")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_estimate)

    s = add("calibrate", "measure this GPU's rates for the step-time model (about a minute), or refit from runs")
    s.add_argument("--from-runs", nargs="+", metavar="DIR", help="refit from run folders (or run stores) instead of measuring")
    s.add_argument("--gpu", default=None, help="GPU table name to file the calibration under (default: detected)")
    s.add_argument("--calibration-dir", default=None, help="where calibrations live (default: $SHARDLAB_CALIBRATION_DIR or ~/.cache/shardlab/calibration)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_calibrate)
