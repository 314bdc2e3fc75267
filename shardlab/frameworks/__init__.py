"""One adapter per framework: fsdp1, fsdp2, deepspeed (in the spirit of torchtitan's parallelize.py).

Each adapter module owns, for its framework: `check(plan, device)` (what a valid plan still cannot
run here), `settings(plan)` (every Plan field it uses, resolved once), `apply(...)` (the runner builds
from the settings) and `render(plan)` (the export writes from the same settings). The runner
(run/wrap.py, the worker), the launcher's checks (run/host.py) and the exporters all come here, so
what is exported is what runs. No torch import at module level.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from shardlab.plan import Plan

NAMES: tuple[str, ...] = ("fsdp1", "fsdp2", "deepspeed")


def adapter(framework: str) -> ModuleType:
    """The adapter module for `framework` (one of NAMES)."""
    if framework not in NAMES:
        raise ValueError(f"no adapter for framework {framework!r}; one of {NAMES}")
    return importlib.import_module(f"shardlab.frameworks.{framework}")


def check_runnable(plan: Plan, device: str) -> None:
    """The one runnability check: a PlanError for a valid plan that `device` cannot run. The
    launcher calls it before starting any process; the worker calls it again before wrapping."""
    adapter(plan.framework).check(plan, device)
