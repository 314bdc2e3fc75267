"""Sizes in units that fit them: the one place shardlab picks KiB / MiB / GiB for a number of bytes.

A 170-thousand-parameter model holds a few hundred KiB per rank; a 70B model holds tens of GiB. Showing
both in GiB prints 0.000 for the first, so every display that shows bytes picks its unit here, from the
largest value it shows (a table column, a figure axis), and says which unit it used. Binary units
throughout (KiB = 2^10, MiB = 2^20, GiB = 2^30 bytes), always labelled. The unit constants live here
too (GB = 10^9 for the figures papers and data sheets give in decimal units): import them, never retype them.
"""

from __future__ import annotations

import math

KIB = 2**10
MIB = 2**20
GIB = 2**30  # what torch.cuda and nvidia-smi count in
GB = 10**9  # what the ZeRO paper, GPU data sheets and network links count in

UNITS: tuple[tuple[str, int], ...] = (("GiB", GIB), ("MiB", MIB), ("KiB", KIB))


def unit_for(max_bytes: float) -> tuple[str, float]:
    """The binary unit that keeps the largest value readable: ('GiB', 2**30), ('MiB', 2**20) or ('KiB', 2**10)."""
    try:
        m = abs(float(max_bytes))
    except (TypeError, ValueError):
        m = 0.0
    if math.isnan(m):
        m = 0.0
    for name, size in UNITS[:-1]:
        if m >= size:
            return name, size
    return UNITS[-1]


def fmt_bytes(n: float | None, unit: tuple[str, float] | None = None, digits: int = 3) -> str:
    """'1.50 GiB', '412 KiB': `n` bytes in `unit` (default: the unit that fits `n`), `digits` significant figures."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    name, size = unit or unit_for(n)
    v = float(n) / size
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(v))))) if v else 0
    return f"{v:,.{decimals}f} {name}"
