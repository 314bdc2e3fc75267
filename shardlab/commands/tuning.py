"""`shardlab tune`: search plans for a model on given GPUs (shardlab.tune), pruned by the estimates and
confirmed by short real runs; prints the ranked table and the pick, writes them with --out.

The search runs on a worker thread so the main thread can turn Ctrl-C, SIGTERM and SIGHUP into the
tune's cancel event (the trial running is cancelled, no process left) as `shardlab run` does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from shardlab.constants import EXIT_FAILED, EXIT_OK

from .common import MODEL_HELP, UsageError, model_names, model_text
from .running import signals_as_interrupt


def cmd_tune(a) -> int:
    import threading

    from shardlab.tune import tune

    model = model_text(a.model)
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
    with signals_as_interrupt():
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


def register(add) -> None:
    """Add `tune` through `add(name, help, **kw)` (see shardlab.cli.build_parser)."""
    from .estimating import gpu_names

    s = add("tune", "search plans for a model on given GPUs: pruned by the estimates, confirmed by short real runs",
            epilog=f"GPUs (--gpu): {gpu_names()}\nModel presets (--model): {model_names()}\n\n"
                   "Candidates: framework x sharding x offload x activation checkpointing x micro-batch (x accumulation at a fixed\n"
                   "--global-batch) x torch.compile x bucket/prefetch knobs. Those that are invalid or do not fit by the estimate\n"
                   "(peak allocated + what the caching allocator cannot give back at the limit, beside the CUDA context) are rejected\n"
                   "with the reason; 'tight' ones (within the estimate's 10% error of the limit) are kept and marked. The rest are\n"
                   "ranked by the estimate; one framework's predictions within 1% are twins (one group, 'grp'). The best few are run (each an\n"
                   "ordinary run in the store), at most one per group of twins, until the measured best beats every other unrun\n"
                   "candidate's prediction + 25% (issue 14's bar) or the budget is spent. Each trial times ~3 s of steps and\n"
                   "reports the median with its interquartile interval; two trials whose intervals overlap are not told apart:\n"
                   "the two best are run again when the budget allows. Without a GPU trials run on CPU processes (small models).")
    s.add_argument("--model", nargs="+", metavar="MODEL", required=True, help=MODEL_HELP)
    s.add_argument("--gpus", type=int, default=1, help="GPUs (or CPU processes) per node (default 1)")
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--gpu", default=None, help="GPU table name to price and fit against (default: this machine's GPU; required with --dry-run on a machine without one)")
    s.add_argument("--goal", default="fastest", help="fastest (default), largest-batch or least-memory")
    s.add_argument("--budget", default="5", help="trial runs, a whole number (e.g. 5), or minutes with an m (e.g. 10m, 2.5min); "
                   "0 ranks by estimate only (default 5). Checked with --dry-run too")
    s.add_argument("--frameworks", default=None, help="comma-separated subset of fsdp1,fsdp2,deepspeed (default: all)")
    s.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step, fixed: accumulation = global / (micro-batch x GPUs)")
    s.add_argument("--steps", type=int, default=None, help="steps per trial, the first 3 not timed (default: 3 + enough to time "
                   "3 s at the candidate's predicted step time, 5 to 60 timed steps)")
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where trials run (default: cuda if present)")
    s.add_argument("--dry-run", action="store_true", help="rank by estimate only; run nothing (as --budget 0)")
    s.add_argument("--out", default=None, metavar="DIR", help="write pick.yaml, tune.json, table.csv and report.html here")
    s.add_argument("--runs", default=None, metavar="DIR", help="run store for the trials (default: $SHARDLAB_RUNS_DIR, else ./runs)")
    s.add_argument("--no-report", action="store_true", help="with --out: skip report.html (its figures take a while)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_tune)
