"""What the importers share: reading a config file (path or text; JSON, hjson or YAML) into plain
data, and typed reads of its values that fail as a PlanError naming the key, never a TypeError from
deep inside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shardlab.plan import bad_input, names_file, parse_text, read_text
from shardlab.safe_input import check_data, short

_MISSING = object()

def _int(key: str, v: Any, *, auto: bool = False) -> Any:
    if auto and v == "auto":
        return "auto"
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise bad_input(key, f"{key}={short(v)} must be a whole number. Fix it in the file.")
    try:
        f = float(v)
        if f != int(f):
            raise ValueError
        return int(f)
    except (ValueError, OverflowError):
        raise bad_input(key, f"{key}={short(v)} must be a whole number{' or auto' if auto else ''}. Fix it in the file.") from None


def _float(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise bad_input(key, f"{key}={short(v)} must be a number. Fix it in the file.")
    try:
        return float(v)
    except ValueError:
        raise bad_input(key, f"{key}={short(v)} must be a number. Fix it in the file.") from None


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no"):
        return v.strip().lower() in ("true", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise bad_input(key, f"{key}={short(v)} must be true or false. Fix it in the file.")


def _choice(key: str, v: Any, choices: dict[str, Any]) -> Any:
    if isinstance(v, str) and v.strip().lower() in {c.lower(): c for c in choices}:
        return {c.lower(): val for c, val in choices.items()}[v.strip().lower()]
    raise bad_input(key, f"{key}={short(v)} is not one of {', '.join(choices)}. Use one of those.")


def _mapping(key: str, v: Any) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_input(key, f"{key} must be a mapping of keys (a nested block), got {type(v).__name__}. Fix its structure.")
    return v


# ---------------------------------------------------------------------------------------------
# Reading the file


def read_source(source: str | Path, *, name: str | None = None) -> tuple[str, str, Path | None]:
    """(text, name, folder that relative paths in it refer to, or None for an upload).

    A Path (or a one-line string naming a file) is read as a file; anything else is the config's
    text itself. `name` marks `source` as uploaded text: it is then never taken for a path, and
    files it refers to are not read (folder None)."""
    s = str(source)
    if name is None and (isinstance(source, Path) or ("\n" not in s and not s.lstrip().startswith("{") and (s.endswith((".json", ".yaml", ".yml")) or names_file(s)))):
        return read_text(s), s, Path(s).resolve().parent
    if name is not None:
        return s, name, None  # an upload: it came from no folder of ours, so nothing it names is read
    return s, "<text>", Path.cwd()


def parse_data(text: str, name: str) -> Any:
    """JSON (as DeepSpeed reads it: hjson, so comments are tolerated) or YAML -> plain data."""
    if text.lstrip().startswith("{") or name.endswith(".json"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            pass
        else:
            check_data(data, name)
            return data
        try:
            import hjson

            data = _plain(hjson.loads(text))
        except Exception:  # noqa: BLE001 - any hjson failure falls through to the precise YAML/JSON error
            pass
        else:
            check_data(data, name)
            return data
    return parse_text(text, name)


def _plain(data: Any) -> Any:
    """hjson's OrderedDicts -> dicts (so type checks see plain mappings)."""
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    return data
