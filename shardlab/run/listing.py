"""The run store as a table: `list_runs(dir)` (what `shardlab runs` prints) and `runs_in(paths)`.

One row per run folder, broken ones included: a folder whose status.json or plan.yaml cannot be read
is listed with status `unreadable` and the reason in `problem`, a run whose launcher died while
running as `orphaned`; every field is taken only when it has the type it should.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shardlab.run.files import is_run_folder, subdirs

LIST_COLUMNS = ["id", "status", "framework", "sharding", "precision", "model", "device", "world_size",
                "steps", "steps_done", "started_at", "duration_s", "failed_rank", "problem", "dir"]


def _typed(info: dict, key: str, kind) -> Any:
    v = info.get(key)
    return v if isinstance(v, kind) and not (kind is not bool and isinstance(v, bool)) else None


def _utc(t: float | None) -> str | None:
    try:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if t else None
    except (OverflowError, OSError, ValueError):
        return None


def _row(run) -> dict:
    info, status = run.info, run.status
    started, ended = _typed(info, "started_at", (int, float)), _typed(info, "ended_at", (int, float))
    problem = run.problem
    if status == "orphaned":
        problem = f"the launching process (pid {info.get('launcher_pid')}) is gone while status.json says running"
    row = {k: _typed(info, k, str) for k in ("framework", "sharding", "precision", "model", "device")}
    row.update({k: _typed(info, k, int) for k in ("world_size", "steps", "steps_done", "failed_rank")})
    row.update(id=run.id, status=status, started_at=_utc(started), problem=problem, dir=str(run.dir),
               duration_s=round(ended - started, 1) if started and ended else None)
    return row


def runs_in(paths) -> list:
    """The runs (store.Run) at `paths`, each a run folder or a run store holding run folders (in their order)."""
    from shardlab.run.store import Run

    out = []
    for d in paths:
        p = Path(d)
        if is_run_folder(p):
            out.append(Run(p))
        else:
            out += [Run(x) for x in subdirs(p) if is_run_folder(x)]
    return out


def list_runs(dir: str | Path | None = None):
    """The run store (default: default_runs_dir()) as a DataFrame, one row per run folder, oldest
    first (columns LIST_COLUMNS). Broken folders are listed with status `unreadable` and the reason
    in `problem`; runs whose launcher died while running, as `orphaned`."""
    import pandas as pd

    from shardlab.run.store import Run, default_runs_dir

    root = Path(dir if dir is not None else default_runs_dir())
    rows = [_row(Run(d).frozen()) for d in subdirs(root) if is_run_folder(d)]
    return pd.DataFrame(rows, columns=LIST_COLUMNS)
