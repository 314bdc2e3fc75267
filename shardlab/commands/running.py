"""`shardlab run | runs | report | app | doctor`: real processes on this machine and the run store.

`run` launches through `shardlab.run.launcher.launch` (which refuses what the worker would refuse
before any process starts), waits, and turns SIGTERM / SIGHUP into a clean cancel as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys

from shardlab.constants import EXIT_FAILED, EXIT_OK
from shardlab.plan import load_plan

from .common import MODEL_HELP, PLAN_FILE_HELP, describe_model, model_names, model_text, plan_arg, say_assumed

RUNS_DIR_HELP = "run store directory (default: $SHARDLAB_RUNS_DIR, else ./runs)"


def cmd_run(a) -> int:
    from shardlab.models import resolve_model
    from shardlab.run.launcher import launch
    from shardlab.safe_input import finite_number

    plan = load_plan(plan_arg(a.plan))
    say_assumed(plan)
    timeout = None if a.timeout is None else finite_number("--timeout", a.timeout, positive=True)
    model = model_text(a.model)
    line = describe_model(resolve_model(model))
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
    with signals_as_interrupt():
        try:
            status = run.wait()
        except KeyboardInterrupt:
            run.cancel()
            status = run.status
    _say_run(run, status, as_json=a.json)
    return EXIT_OK if status == "completed" else EXIT_FAILED


def _say_run(run, status: str, as_json: bool) -> None:
    """The run's last line: id, status, world size and device (one JSON object with --json)."""
    info = run.info
    world, device = info.get("world_size"), info.get("device")
    if as_json:
        print(json.dumps({"id": run.id, "status": status, "dir": str(run.dir), "world_size": world, "device": device}))
    else:
        nodes, nproc = info.get("nodes"), info.get("nproc_per_node")
        print(f"run {run.id}: {status}, world size {world} ({nodes} node(s) x {nproc} process(es)) on {device} ({run.dir})")


@contextlib.contextmanager
def signals_as_interrupt():
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

    print(f"writing a report of {' '.join(a.run_dirs)}: tables, figures and their PNGs (tens of seconds on a small machine)...",
          file=sys.stderr, flush=True)
    path = write_report(a.run_dirs, a.output, progress=_stderr_step)
    print(f"wrote {path}")
    return 0


def _stderr_step(what: str) -> None:
    print(f"  {what}", file=sys.stderr, flush=True)


def cmd_app(a) -> int:
    from shardlab.run.host import check_port

    check_port(a.port)
    if a.runs is not None:
        from shardlab.run.store import ensure_store

        ensure_store(a.runs, "--runs")
    from shardlab_widgets.app import serve

    serve(port=a.port, show=False, runs_dir=a.runs, token=a.token)
    return 0


def cmd_doctor(a) -> int:
    from shardlab.doctor import main as doctor

    return doctor(warm=not a.no_build)


def register(add) -> None:
    """Add this group's subcommands through `add(name, help, **kw)` (see shardlab.cli.build_parser)."""
    s = add("run", "a real sharded training run on this machine (CPU processes over gloo, or the local GPUs)",
            epilog=f"Model presets (--model): {model_names()}\nThe last line states the run's status, world size and device; "
                   f"the run's files are in OUT/<id>/.\n\n{PLAN_FILE_HELP}")
    s.add_argument("plan")
    s.add_argument("--model", nargs="+", metavar="MODEL", required=True, help=MODEL_HELP)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--nproc", type=int, default=None, help="processes per node (default: the plan's gpus_per_node)")
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    s.add_argument("--out", default=None, help=RUNS_DIR_HELP)
    s.add_argument("--timeout", type=float, default=None, help="seconds without progress before the run is stopped")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_run)

    s = add("runs", "list the run store")
    s.add_argument("dir", nargs="?", default=None, help=RUNS_DIR_HELP)
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
