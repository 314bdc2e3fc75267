"""The run folder's file names and formats, and readers that survive any corruption of them.

This module and store.py are the only code that knows what a run folder (`runs/<id>/`) holds:
writers (launcher, worker, sampler) take the names from `RunFiles`, readers go through `shardlab.run.store`.

  plan.yaml        the Plan as it ran (topology adjusted to the process count actually started)
  run.json         what the worker reads besides the plan (model, steps, device, seed, ...)
  launch.json      the exact argv of every torchrun agent and the environment variables that matter
  status.json      running | completed | failed | oom | cancelled | timeout, exit codes, failing rank,
                   its last error lines, timings; rewritten atomically (tmp + rename)
  metrics.jsonl    one line per step per rank (written by the worker; schema in run/metrics.py)
  events.jsonl     start / oom / error / done per rank (worker), launch / end (launcher)
  timeline.jsonl   memory sampled by the launcher (see timeline.py)
  prediction.json  what the estimator predicted at launch (see prediction.py)
  cancel           empty; another process asked for the run to stop (Run.cancel). The launcher reads it
                   and never writes it, so the request cannot be lost to a status.json rewrite
  logs/            agent{n}.log (each torchrun agent's own output), node{n}/ (torchrun's per-rank
                   stdout.log / stderr.log tree) and rank{r}.stdout.log / rank{r}.stderr.log links to it

Every .jsonl file is append-only and flushed line by line, so a crash loses nothing written before it.
Readers never raise on what they find: a torn or garbled line (a crash mid-write, stray bytes) is
skipped, and a file that is missing, unreadable, not UTF-8 or not the JSON type expected reads as
absent, with the reason kept (`read_json_checked`) for those that must say why a run is unreadable.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from shardlab.units import MIB

# Reading a file that a writer garbled must not cost unbounded memory: run files are small (a metrics
# line is ~3 KB; 10^5 steps x 8 ranks of them is ~2.4 GB, far past any run shardlab starts on a lab machine).
MAX_JSON_BYTES = 16 * MIB


def _path(name: str) -> property:
    return property(lambda self: self.dir / name, doc=f"RUN_DIR/{name}")


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run folder's files."""

    dir: Path

    PLAN = "plan.yaml"
    CONFIG = "run.json"
    LAUNCH = "launch.json"
    STATUS = "status.json"
    METRICS = "metrics.jsonl"
    EVENTS = "events.jsonl"
    TIMELINE = "timeline.jsonl"
    PREDICTION = "prediction.json"
    CANCEL = "cancel"
    LOGS = "logs"
    APPEND_ONLY = (METRICS, EVENTS, TIMELINE)
    # any one of these makes a folder a run folder (possibly a broken one)
    MARKERS = (STATUS, PLAN, CONFIG, METRICS)

    plan, config, launch, status = _path(PLAN), _path(CONFIG), _path(LAUNCH), _path(STATUS)
    metrics, events, timeline = _path(METRICS), _path(EVENTS), _path(TIMELINE)
    prediction, logs, cancel = _path(PREDICTION), _path(LOGS), _path(CANCEL)

    def rank_log(self, rank: int, stream: str) -> Path:
        return self.logs / f"rank{rank}.{stream}.log"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so a reader sees the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: str | Path, obj: dict) -> None:
    """Append one JSON line and flush it (the file is shared with the workers: one write per line)."""
    line = json.dumps(obj, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def open_regular(path: str | Path, text: bool = False):
    """Open a regular file for reading; OSError for anything else. A FIFO would block a reader
    forever and a link to /dev/zero never ends, so neither is ever read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return io.TextIOWrapper(f, encoding="utf-8", errors="replace") if text else f


def read_text_checked(path: str | Path) -> tuple[str | None, str | None]:
    """(the text of a regular UTF-8 file, None) or (None, why not): missing, unreadable, not a
    regular file, over MAX_JSON_BYTES, not UTF-8. Never raises."""
    name = Path(path).name
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        return None, f"{name} is missing"
    except OSError as e:
        return None, f"{name} cannot be read ({e.strerror or 'not a regular file'})"
    if len(raw) > MAX_JSON_BYTES:
        return None, f"{name} is over {MAX_JSON_BYTES // MIB} MiB"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"{name} is not UTF-8 text"


def read_json_checked(path: str | Path, kind: type = dict) -> tuple[Any, str | None]:
    """(the JSON value, None) or (None, why it cannot be read): as read_text_checked, or not JSON,
    or not a `kind`. Never raises."""
    name = Path(path).name
    text, why = read_text_checked(path)
    if why:
        return None, why
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None, f"{name} is not valid JSON"
    if not isinstance(value, kind):
        return None, f"{name} holds a {type(value).__name__}, not a JSON {'object' if kind is dict else kind.__name__}"
    return value, None


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON value of a file, or `default` where it is missing or unreadable in any way."""
    value, why = read_json_checked(path, object)
    return default if why else value


def parse_lines(lines: Iterable[str]) -> list[dict]:
    """JSON objects from lines; a torn or garbled line (a crash mid-write) is skipped, not fatal."""
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON object line of a .jsonl file ([] where it is missing or unreadable); bytes that are
    not UTF-8 spoil only the lines they are in."""
    try:
        with open_regular(path, text=True) as f:
            return parse_lines(f)
    except OSError:
        return []


class JsonlTail:
    """Reads the complete lines appended to a .jsonl file since the last call (a partial line waits)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pos = 0
        self.buf = b""

    def new(self) -> list[dict]:
        try:
            with open_regular(self.path) as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except OSError:
            return []
        data = self.buf + chunk
        complete, _, self.buf = data.rpartition(b"\n")
        return parse_lines(complete.decode("utf-8", errors="replace").splitlines()) if complete else []


def read_text(path: str | Path, default: str = "") -> str:
    """A text file's content with undecodable bytes replaced ('' where it cannot be read)."""
    try:
        with open_regular(path, text=True) as f:
            return f.read()
    except (OSError, ValueError):
        return default


def is_run_folder(d: Path) -> bool:
    """Holds one of a run's files, or cannot be looked into (then it is listed, as unreadable)."""
    try:
        names = set(os.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return bool(names & set(RunFiles.MARKERS))


def subdirs(root: Path) -> list[Path]:
    """The folders in `root`, sorted (hidden ones left out); none where `root` cannot be read."""
    def is_dir(p: Path) -> bool:
        try:
            return p.is_dir()
        except OSError:
            return False
    try:
        return sorted(p for p in root.iterdir() if not p.name.startswith(".") and is_dir(p))
    except OSError:
        return []
