"""How many of the suite's shared CPU training runs (tests/cpu_runs.py) to start at once on this machine.

Trains every setup of tests/cpu_runs.py once, `--at-once N` at a time, in this process (as a pytest
process does), and prints the wall time and the CPU time the runs used (getrusage of the waited-for
children: torchrun agents, ranks, watchdogs). On 2 cores, more runs at once than the cores can feed
spend CPU on waiting for each other; the figure chosen for _prestart.AT_ONCE is recorded in
docs/benchmarks.md with the command that measured it.

    .venv/bin/python benchmarks/suite_runs.py --at-once 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--at-once", type=int, default=2, help="runs going at the same time")
    a = ap.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    import _prestart
    import cpu_runs

    _prestart.AT_ONCE = a.at_once
    load, t0 = os.getloadavg()[0], time.monotonic()
    runs = cpu_runs.cpu_runs()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    bad = {n: r.status for n, r in runs.items() if r.status != "completed"}
    print(f"{len(runs)} runs, {a.at_once} at once: wall {time.monotonic() - t0:.1f} s, runs' CPU "
          f"{used.ru_utime + used.ru_stime:.1f} s, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after"
          + (f"; not completed: {bad}" if bad else ""))


if __name__ == "__main__":
    main()
