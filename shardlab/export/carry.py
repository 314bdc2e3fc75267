"""Carrying a file's own words through import and export, so a config that goes in comes back out the same.

An exporter first writes what the plan means in the tool's keys (its "natural" file). An imported plan
also keeps, per tool, what the original file said that the natural file would not: keys shardlab does
not model (schedulers, comms loggers, `overlap_comm`...), modelled keys spelled differently (`1` for
`1.0`, `OneBitAdam`, a static loss scale) and the keys the file left out (`omit`). `reconcile` finds
those at import; `carry` writes them back at export:

- while the plan is unchanged since import (its fingerprint matches), the file comes back as it was;
- once the plan is edited, each carried key is kept only if it does not change what the file means
  (the tool's own importer reads the file with and without it and must get the same plan), so an
  edit the user made always wins over the old file's spelling.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Callable, Iterator

from shardlab.export.keys import get_in

Path = tuple[str, ...]
_MISSING = object()


def leaves(data: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, value) for every leaf of a nested mapping; an empty mapping is a leaf of its own."""
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from leaves(v, path + (str(k),))
    elif path:
        yield path, data


def get_path(data: Any, path: Path) -> Any:
    """The value at `path` (its parts may hold dots), or _MISSING."""
    return get_in(data, path, _MISSING)


def set_path(data: dict, path: Path, value: Any) -> None:
    """data[a][b] = value, creating (or replacing non-mapping) levels in between."""
    cur = data
    for part in path[:-1]:
        if not isinstance(cur.get(part), dict):
            cur[part] = {}
        cur = cur[part]
    cur[path[-1]] = copy.deepcopy(value)


def remove_path(data: dict, path: Path) -> None:
    """Remove a leaf and every level above it that becomes empty by that."""
    chain, cur = [], data
    for part in path[:-1]:
        if not isinstance(cur.get(part), dict):
            return
        chain.append((cur, part))
        cur = cur[part]
    if path[-1] not in cur:
        return
    del cur[path[-1]]
    for parent, part in reversed(chain):
        if parent[part]:
            break
        del parent[part]


def same(a: Any, b: Any) -> bool:
    """Equal as written in a file: 1 and 1.0, or 1 and true, are different spellings."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def dotted(path: Path) -> str:
    return ".".join(path)


def undotted(key: str) -> Path:
    return tuple(key.split("."))


def reconcile(source: dict, natural: dict, keep: tuple[Path, ...] = ()) -> tuple[dict, list[str]]:
    """What `source` says that `natural` does not: (carried keys nested as in the file, dotted keys to omit).

    `keep` lists paths carried even where the natural file says the same (they steer the exporter)."""
    carried: dict = {}
    for path, value in leaves(source):
        if path in keep or not same(get_path(natural, path), value):
            set_path(carried, path, value)
    # Natural leaves the file lacks (also those under a file leaf that is not a mapping, e.g. `offload_param: null`).
    omit = [dotted(path) for path, _ in leaves(natural) if get_path(source, path) is _MISSING]
    return carried, omit


def _apply(natural: dict, carried: dict, omit: list[str]) -> dict:
    cfg = copy.deepcopy(natural)
    for key in omit:
        remove_path(cfg, undotted(key))
    for path, value in leaves(carried):
        set_path(cfg, path, value)
    return cfg


def carry(natural: dict, carried: dict, omit: list[str], meaning: Callable[[dict], Any], *, trust: bool) -> dict:
    """The natural file with the carried keys written back (see the module docstring for the rule)."""
    if not carried and not omit:
        return natural
    whole = _apply(natural, carried, omit)
    if trust:
        return whole
    base = _meaning(meaning, natural)
    if _meaning(meaning, whole) == base:
        return whole
    cfg = copy.deepcopy(natural)
    for key in omit:
        trial = copy.deepcopy(cfg)
        remove_path(trial, undotted(key))
        if _meaning(meaning, trial) == base:
            cfg = trial
    for path, value in leaves(carried):
        trial = copy.deepcopy(cfg)
        set_path(trial, path, value)
        if _meaning(meaning, trial) == base:
            cfg = trial
    return cfg


def _meaning(meaning: Callable[[dict], Any], cfg: dict) -> Any:
    try:
        return meaning(cfg)
    except Exception:  # noqa: BLE001 - a file the importer refuses means something else than one it reads
        return object()


def fingerprint(modelled: dict) -> str:
    """A short, stable fingerprint of a plan's modelled settings (survives a YAML/JSON round trip)."""
    return hashlib.sha256(json.dumps(modelled, sort_keys=True, default=str).encode()).hexdigest()[:16]
