"""The `shardlab` command (DESIGN.md's command-line contract).

Each subcommand is a thin shell over a library function; heavy modules are imported inside the
handler that needs them. Bad input of any kind (PlanError, or a ValueError raised for a bad flag
value) prints its message on stderr and exits 2, never a traceback. Output piped into a program that
stops reading (`shardlab runs | head`) ends quietly, as other command-line tools do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from shardlab.constants import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from shardlab.plan import PlanError, load_plan

PLAN_FILE_HELP = """\
A plan file is YAML or JSON naming only what differs from the defaults, e.g.

    framework: deepspeed      # fsdp1 | fsdp2 | deepspeed
    sharding: zero3           # ddp | zero1 (DeepSpeed) | zero2 | zero3 | hybrid
    precision: bf16           # fp32 | bf16 | fp16
    offload: {optimizer: cpu} # none | cpu | nvme (params: zero3 only)
    topology: {nodes: 1, gpus_per_node: 8}

Other fields: activation_checkpointing, micro_batch_size, grad_accum_steps, zeropp. `shardlab validate
PLAN` checks one; `shardlab import ds_config.json` makes one from a DeepSpeed or accelerate config."""

EXPORT_TARGETS = ("deepspeed", "accelerate", "fsdp-code", "torchrun", "deepspeed-launch", "accelerate-launch", "slurm")


class UsageError(ValueError):
    """A bad flag or argument value: printed and exit 2."""


def _check_output(out: str | None) -> None:
    """Refuse an output path that cannot be written before any work is done (exit 2, no traceback)."""
    if not out:
        return
    from shardlab.safe_input import label

    p = Path(out)
    if p.is_dir() or out.endswith(("/", "\\")):
        raise UsageError(f"-o {label(out)} is a directory; give a file name, e.g. -o {label(str(p / 'out.yaml'))}.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {label(out)}: the folder {label(str(parent))} does not exist. Create it first (mkdir -p {label(str(parent))}) or write elsewhere.")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"-o {label(out)} cannot be written (no permission). Choose a path you can write.")


def _plan(path: str):
    """The plan file named on the command line (always a path, never YAML text)."""
    return load_plan(Path(path), check=False)


def _write(text: str, out: str | None) -> None:
    if out:
        try:
            Path(out).write_text(text)
        except OSError as e:
            raise UsageError(f"-o {out}: cannot write it ({e.strerror}). Choose another path.") from None
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _print_findings(findings) -> None:
    for f in findings:
        print(str(f), file=sys.stderr)


def _say_assumed(plan) -> None:
    """Settings left to the training script ('auto'): which value an estimate or run assumed."""
    if plan.auto:
        said = ", ".join(f"{k}={v}" for k, v in plan.assumed().items())
        print(f"note: 'auto' (left to the training script) assumed as {said}", file=sys.stderr)


def cmd_validate(a) -> int:
    plan = _plan(a.plan)
    found = plan.findings()
    _print_findings(found)
    if any(f.level == "error" for f in found):
        return EXIT_BAD_INPUT
    print(f"{a.plan}: valid ({plan.framework}, {plan.sharding}, {plan.precision}, world size {plan.world_size})")
    return 0


def cmd_export(a) -> int:
    from shardlab.export import export

    plan = load_plan(_plan(a.plan))
    _print_findings(plan.warnings())
    _write(export(plan, a.to, resolve=a.resolve), a.output)
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
    from shardlab.load import import_config

    plan, notes = import_config(Path(a.file))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    _write(plan.to_yaml(minimal=True) or "{}\n", a.output)
    return 0


def cmd_translate(a) -> int:
    from shardlab.load import translate

    plan, notes = translate(_plan(a.plan), a.to)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    _write(plan.to_yaml(minimal=True) or "{}\n", a.output)
    return 0


MODEL_HELP = ("preset (gpt-tiny, gpt-1.3b, llama-8b, ...), a YAML/JSON shape file, or your own model: "
              "hf:<model_type> [key=value ...] (e.g. hf:llama hidden_size=2048 num_hidden_layers=16 seq_len=1024), "
              "a Hugging Face config.json [key=value ...], or module:function (a factory returning an nn.Module)")


def _model_text(words: list[str] | None) -> str | None:
    """--model's words as one source text (`--model hf:llama hidden_size=64` needs no quotes)."""
    if words is None:
        return None
    import shlex

    return words[0] if len(words) == 1 else " ".join(shlex.quote(w) for w in words)


def _model_arg(a):
    from shardlab.models import resolve_model

    if (a.model is None) == (a.params is None):
        raise UsageError("give exactly one of --model PRESET|SHAPE_FILE|SOURCE or --params N (e.g. --model gpt-1.3b, --model hf:llama, or --params 7e9).")
    return resolve_model(_model_text(a.model) if a.model is not None else a.params)


def _describe_model(spec) -> str | None:
    """One line about a model built from a source (Hugging Face config or factory), for stderr."""
    if spec.source is None:
        return None
    from shardlab.models import flops_per_token

    unit = (f"wrap unit {spec.wrap_cls} x {spec.wrap_unit_count} (found in the model)" if spec.wrap_cls else
            "no repeated block found (name one in wrap.transformer_layer_cls)")
    return f"model {spec.name}: {spec.params:,} parameters, {unit}, {flops_per_token(spec) / 1e6:,.2f} MFLOP per token"


def _model_json(spec) -> dict:
    from shardlab.models import flops_per_token

    return {"source": spec.source, "wrap_class": spec.wrap_cls, "wrap_units": spec.wrap_unit_count,
            "flops_per_token": flops_per_token(spec)}


def cmd_estimate(a) -> int:
    from shardlab.estimate import estimate

    plan = load_plan(_plan(a.plan))
    spec = _model_arg(a)
    cal = False if a.calibration == "none" else a.calibration
    est = estimate(plan, spec, gpu=a.gpu, method="trace" if getattr(a, "trace", False) else "analytic", calibration=cal)
    _say_assumed(plan)
    if a.json:
        out = est.to_dict()
        out["model"].update(_model_json(spec))
        if plan.auto:
            out["assumed"] = plan.assumed()
        print(json.dumps(out))
    else:
        line = _describe_model(spec)
        print(est.summary() + (f"\n{line}" if line else ""))
    return 0


def cmd_calibrate(a) -> int:
    from shardlab.estimate.calibrate import cli_calibrate

    return cli_calibrate(a)


def cmd_run(a) -> int:
    from shardlab.models import resolve_model
    from shardlab.run.launcher import launch
    from shardlab.safe_input import finite_number

    plan = load_plan(_plan(a.plan))
    _say_assumed(plan)
    timeout = None if a.timeout is None else finite_number("--timeout", a.timeout, positive=True)
    model = _model_text(a.model)
    line = _describe_model(resolve_model(model))
    if line:
        print(line, file=sys.stderr)
    run = launch(plan, model=model, steps=a.steps, nproc=a.nproc, device=a.device, out=a.out,
                 progress=not a.json, timeout_s=timeout)
    if run.info.get("device") == "cuda" and not a.json:
        from shardlab.export.launch import RUNNER_ENV

        print("note: this run sets " + " ".join(f"{k}={v}" for k, v in RUNNER_ENV.items()) + " for this machine's GPUs "
              "(recorded in launch.json); exported commands leave them out.", file=sys.stderr)
    # `timeout`, `docker stop`, a SLURM cancel (SIGTERM) and a closed terminal (SIGHUP) stop the run
    # as Ctrl-C does; a SIGKILL cannot be caught: the run's watchdog ends it then (run/watchdog.py).
    with _signals_as_interrupt():
        try:
            status = run.wait()
        except KeyboardInterrupt:
            run.cancel()
            status = run.status
    info = run.info
    world, device = info.get("world_size"), info.get("device")
    if a.json:
        print(json.dumps({"id": run.id, "status": status, "dir": str(run.dir), "world_size": world, "device": device}))
    else:
        nodes, nproc = info.get("nodes"), info.get("nproc_per_node")
        print(f"run {run.id}: {status}, world size {world} ({nodes} node(s) x {nproc} process(es)) on {device} ({run.dir})")
    return EXIT_OK if status == "completed" else EXIT_FAILED


def cmd_tune(a) -> int:
    import threading

    from shardlab.tune import tune

    model = _model_text(a.model)
    _check_dir(a.out, "--out")
    cancel = threading.Event()

    def say(ev: dict) -> None:
        if ev.get("type") == "trial" and not a.json:
            meas = ev.get("measured", {}).get("tokens_per_s")
            tail = f": {meas:,.0f} tokens/s measured" if meas else (f": {ev.get('reason')}" if ev.get("reason") else "")
            print(f"trial {ev['trial']} {ev['status']:<9} {ev['key']}{tail}", file=sys.stderr, flush=True)

    kw = dict(gpus=a.gpus, nodes=a.nodes, gpu=a.gpu, goal=a.goal, budget=a.budget, frameworks=a.frameworks,
              dry_run=a.dry_run, out=a.runs, device=a.device, global_batch=a.global_batch, steps=a.steps, on_event=say,
              cancel=cancel)
    result: dict = {}
    with _signals_as_interrupt():
        worker = threading.Thread(target=lambda: result.update(r=_catch(lambda: tune(model, **kw))), daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
        except KeyboardInterrupt:
            cancel.set()  # the current trial run is cancelled (no process left) and the search stops
            worker.join()
    r = result["r"]
    if isinstance(r, BaseException):
        raise r
    paths = r.write(a.out, report=not a.no_report) if a.out else {}
    if a.json:
        print(json.dumps({**r.to_dict(), "files": paths}, default=str))
    else:
        print(r.summary())
        if r.pick is not None:
            print("\n# the pick as a plan file" + (f" ({paths['plan']}; shardlab export {paths['plan']} --to ...)" if paths.get("plan") else ""))
            print(r.pick.plan.to_yaml(minimal=True) or "{}")
        for k, v in paths.items():
            print(f"wrote {k}: {v}", file=sys.stderr)
    if r.stop == "cancelled":
        return EXIT_FAILED
    return EXIT_OK if r.pick is not None else EXIT_FAILED


def _catch(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed back to the main thread, which raises it
        return e


def _check_dir(path: str | None, flag: str) -> None:
    """A folder the command will write into: refused before any work if it is a file or cannot be made."""
    if not path:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder (it is created if missing), e.g. {flag} tune-out.")
    parent = p if p.exists() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path} cannot be written (no permission). Choose a folder you can write.")


@contextlib.contextmanager
def _signals_as_interrupt():
    """SIGTERM / SIGHUP raise KeyboardInterrupt in the main thread while the block runs."""
    def handler(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # once: the cancel that follows must not be interrupted
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def cmd_runs(a) -> int:
    from shardlab.run.store import default_runs_dir, list_runs

    where = a.dir or default_runs_dir()
    df = list_runs(where)
    print(df.to_string(index=False) if len(df) else f"no runs in {where}")
    return 0


def cmd_report(a) -> int:
    from shardlab.report import write_report

    print(f"writing a report of {len(a.run_dirs)} run(s): tables, figures and their PNGs (tens of seconds on a small machine)...",
          file=sys.stderr, flush=True)
    path = write_report(a.run_dirs, a.output, progress=_stderr_step)
    print(f"wrote {path}")
    return 0


def _stderr_step(what: str) -> None:
    print(f"  {what}", file=sys.stderr, flush=True)


def cmd_app(a) -> int:
    from shardlab.run.host import check_port

    check_port(a.port)
    from shardlab_widgets.app import serve

    serve(port=a.port, show=False, runs_dir=a.runs, token=a.token)
    return 0


def cmd_doctor(a) -> int:
    from shardlab.doctor import main as doctor

    return doctor(warm=not a.no_build)


def _gpu_names() -> str:
    from shardlab.estimate.gpus import GPUS

    return ", ".join(GPUS)


def _model_names() -> str:
    from shardlab.models import PRESETS

    return ", ".join(PRESETS)


def build_parser() -> argparse.ArgumentParser:
    from shardlab import __version__
    from shardlab.estimate.gpus import DEFAULT_GPU

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="shardlab", formatter_class=fmt,
                                description="Build, check, export, estimate, run and compare FSDP / DeepSpeed ZeRO setups.",
                                epilog=PLAN_FILE_HELP + "\n\nFirst time on a machine: shardlab doctor. Each command has --help.")
    p.add_argument("--version", action="version", version=f"shardlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help, **kw):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=fmt, **kw)

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
    s.add_argument("--to", required=True, choices=("fsdp1", "fsdp2", "deepspeed"))
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_translate)

    s = add("estimate", "memory, communication and step time of a plan",
            epilog=f"GPUs (--gpu): {_gpu_names()}\nModel presets (--model): {_model_names()}\n\n{PLAN_FILE_HELP}")
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

    s = add("run", "a real sharded training run on this machine (CPU processes over gloo, or the local GPUs)",
            epilog=f"Model presets (--model): {_model_names()}\nThe last line states the run's status, world size and device; "
                   "the run's files are in OUT/<id>/.\n\n{PLAN_FILE_HELP}")
    s.add_argument("plan")
    s.add_argument("--model", nargs="+", metavar="MODEL", required=True, help=MODEL_HELP)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--nproc", type=int, default=None, help="processes per node (default: the plan's gpus_per_node)")
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    s.add_argument("--out", default=None, help="run store directory (default: $SHARDLAB_RUNS_DIR, else ./runs)")
    s.add_argument("--timeout", type=float, default=None, help="seconds without progress before the run is stopped")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_run)

    s = add("tune", "search plans for a model on given GPUs: pruned by the estimates, confirmed by short real runs",
            epilog=f"GPUs (--gpu): {_gpu_names()}\nModel presets (--model): {_model_names()}\n\n"
                   "Candidates: framework x sharding x offload x activation checkpointing x micro-batch (x accumulation at a fixed\n"
                   "--global-batch) x torch.compile x bucket/prefetch knobs. Those that are invalid or do not fit (predicted peak\n"
                   "reserved + 10% margin, issue 13's bar) are rejected with the reason; the rest are ranked by the estimate and the\n"
                   "best few are run (each an ordinary run in the store) until the measured best beats every unrun candidate's\n"
                   "prediction + 25% (issue 14's bar) or the budget is spent. Without a GPU trials run on CPU processes (small models).")
    s.add_argument("--model", nargs="+", metavar="MODEL", required=True, help=MODEL_HELP)
    s.add_argument("--gpus", type=int, default=1, help="GPUs (or CPU processes) per node (default 1)")
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--gpu", default=None, help="GPU table name to price and fit against (default: this machine's GPU; required with --dry-run on a machine without one)")
    s.add_argument("--goal", default="fastest", choices=("fastest", "largest-batch", "least-memory"))
    s.add_argument("--budget", default="5", help="trial runs (e.g. 5) or minutes (e.g. 10m); 0 ranks by estimate only (default 5)")
    s.add_argument("--frameworks", default=None, help="comma-separated subset of fsdp1,fsdp2,deepspeed (default: all)")
    s.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step, fixed: accumulation = global / (micro-batch x GPUs)")
    s.add_argument("--steps", type=int, default=8, help="steps per trial, the first 3 not timed (default 8)")
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where trials run (default: cuda if present)")
    s.add_argument("--dry-run", action="store_true", help="rank by estimate only; run nothing (as --budget 0)")
    s.add_argument("--out", default=None, metavar="DIR", help="write pick.yaml, tune.json, table.csv and report.html here")
    s.add_argument("--runs", default=None, metavar="DIR", help="run store for the trials (default: $SHARDLAB_RUNS_DIR, else ./runs)")
    s.add_argument("--no-report", action="store_true", help="with --out: skip report.html (its figures take a while)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_tune)

    s = add("runs", "list the run store")
    s.add_argument("dir", nargs="?", default=None, help="run store directory (default: $SHARDLAB_RUNS_DIR, else ./runs)")
    s.set_defaults(fn=cmd_runs)

    s = add("report", "tables and figures of runs, as one HTML file")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(fn=cmd_report)

    s = add("app", "serve the dashboard at http://127.0.0.1:PORT/")
    s.add_argument("--port", type=int, default=5006)
    s.add_argument("--token", default=None,
                   help="the token a browser must present (?token=...); default: a random one, printed at start. "
                        "Use --token '' to serve without one (only on a machine nobody else can reach)")
    s.add_argument("--runs", default=None, metavar="DIR",
                   help="run store the Run and Compare tabs use (default: $SHARDLAB_RUNS_DIR, else ./runs)")
    s.set_defaults(fn=cmd_app)

    s = add("doctor", "first-run check: versions, C++ compiler, DeepSpeed's CPU ops built once, offline assets, machine facts")
    s.add_argument("--no-build", action="store_true", help="skip building DeepSpeed's CPU ops")
    s.set_defaults(fn=cmd_doctor)
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
        _check_output(getattr(args, "output", None))
        code = args.fn(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
