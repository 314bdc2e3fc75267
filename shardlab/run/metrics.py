"""The metrics schema: one typed record per step per rank, written by the worker, read through the store.

Named columns in the spirit of torchtitan's metrics module, serialised as DESIGN.md's metrics.jsonl
contract (one JSON object per line; keys below, nested dicts for the figures that come by part).
`StepRecord.to_json()` is what the worker appends; `clean_line()` is what every reader gets back: a
line whose step or rank is not an integer is dropped, and a figure of the wrong type becomes missing,
so a garbled file can never reach pandas arithmetic as strings.

Memory figures are bytes. Times are `time.time()` seconds (the timeline's clock).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

STATE_PARTS = ("params", "grads", "optimizer")


@dataclass
class StepRecord:
    """One rank's figures for one optimizer step."""

    step: int  # 1-based
    rank: int
    world_size: int
    loss: float  # the global mean over ranks and micro-batches: the same on every rank
    t_start: float
    t_fwd_end: float  # on CUDA the phase ends come from CUDA events
    t_bwd_end: float
    t_opt_end: float
    step_time_s: float
    tokens: int  # this rank's
    tokens_per_s: float  # this rank's (per device)
    instrumented: bool | None = None  # only in an alternating run: was this step measured
    # --- measured steps only
    tflops: float | None = None  # per device, from FLOPs per token (CUDA and CPU)
    mfu: float | None = None  # CUDA with a GPU from the table
    state_bytes: dict[str, int] | None = None  # {params, grads, optimizer} as the rank holds them
    state_measured_step: int | None = None  # the step those state figures were taken at
    comm_bytes: dict[str, int] | None = None  # payload bytes by collective family
    comm_count: dict[str, int] | None = None  # calls by collective family
    rss_bytes: int | None = None
    allocated_bytes: int | None = None  # CUDA allocator now / peaks since the step began
    reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    mem_phases: dict[str, int | None] | None = None  # CUDA: allocated after {fwd, bwd, opt}
    state_bytes_cpu: dict[str, int] | None = None  # CUDA: the offloaded share of state_bytes
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer writer added

    def add(self, **figures: Any) -> "StepRecord":
        """Set figures by name; a name the schema does not have yet goes to `extra` (kept in the line)."""
        for k, v in figures.items():
            if k in _FIELDS:
                setattr(self, k, v)
            else:
                self.extra[k] = v
        return self

    def to_json(self) -> dict:
        """The metrics line: the fields that have a value, then `extra`."""
        out = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        if self.state_bytes is not None:  # a measured step always says tflops / mfu, if only as null
            out.setdefault("tflops", None)
            out.setdefault("mfu", None)
        return {**out, **self.extra}


_FIELDS = {f.name: f for f in fields(StepRecord) if f.name != "extra"}
_INTS = {"step", "rank", "world_size", "tokens", "state_measured_step", "rss_bytes", "allocated_bytes",
         "reserved_bytes", "peak_allocated_bytes", "peak_reserved_bytes"}
_DICTS = {"state_bytes", "comm_bytes", "comm_count", "mem_phases", "state_bytes_cpu"}
REQUIRED = ("step", "rank")
COLUMNS = tuple(_FIELDS)


def _number(v: Any, integer: bool) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if integer:
        return v if isinstance(v, int) else (int(v) if math.isfinite(v) and v == int(v) else None)
    return v


def _by_part(v: Any) -> dict | None:
    if not isinstance(v, dict):
        return None
    return {str(k): x for k, x in v.items() if x is None or _number(x, False) is not None}


def clean_line(obj: Any) -> dict | None:
    """A metrics line as readers may trust it, or None when it is not one (no integer step / rank)."""
    if not isinstance(obj, dict) or any(_number(obj.get(k), True) is None for k in REQUIRED):
        return None
    out = {}
    for k, v in obj.items():
        if k in _DICTS:
            v = _by_part(v)
        elif k == "instrumented":
            v = v if isinstance(v, bool) else None
        elif k in _FIELDS:
            v = _number(v, k in _INTS)
        elif not isinstance(v, (str, int, float, bool, dict, type(None))):
            v = None  # an unknown key's list would not fit a table column
        if v is not None or k in ("tflops", "mfu"):
            out[k] = v
    return out


def clean_lines(lines: list[dict]) -> list[dict]:
    return [c for c in (clean_line(x) for x in lines) if c is not None]


def _finite_number(v: Any) -> bool:
    return _number(v, False) is not None and math.isfinite(v)


def clean_sample(obj: Any) -> dict | None:
    """A timeline sample (t, rank, source, bytes, gpu) or None when t, rank or bytes is not a number."""
    if not isinstance(obj, dict) or not all(_finite_number(obj.get(k)) for k in ("t", "rank", "bytes")):
        return None
    if not isinstance(obj.get("source", ""), str):
        return None
    return obj


def clean_event(obj: Any) -> dict | None:
    """An events.jsonl line: needs an `event` name."""
    return obj if isinstance(obj, dict) and isinstance(obj.get("event"), str) else None
