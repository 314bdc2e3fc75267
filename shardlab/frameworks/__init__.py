"""One adapter per framework: fsdp1, fsdp2, deepspeed (in the spirit of torchtitan's parallelize.py).

Each adapter module owns, for its framework: `check(plan, device)` (what a valid plan still cannot
run here), `settings(plan)` (every Plan field it uses, resolved once), `apply(...)` (the runner builds
from the settings), `render(plan)` (the export writes from the same settings) and
`translate_from(plan, d, notes)` (what `shardlab translate --to` it changes in a plan, with notes). The runner
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


def needs_block_classes(plan: Plan) -> bool:
    """Whether building `plan` looks up wrap.transformer_layer_cls in the model (FSDP's transformer
    wrap policy, or activation checkpointing in any framework)."""
    return plan.activation_checkpointing or (plan.framework != "deepspeed" and plan.wrap.policy == "transformer")


def check_model(plan: Plan, model) -> None:
    """A PlanError when the model (an nn.Module, or a shape / preset of shardlab's GPT, built on the
    meta device) lacks a class the plan wraps or checkpoints: what the worker would refuse at wrap time."""
    if not needs_block_classes(plan):
        return
    from shardlab.frameworks.base import block_classes, block_names

    names = block_names(plan)
    if not hasattr(model, "modules"):
        from shardlab.models import resolve_model
        from shardlab.run.gpt import build_model

        model = build_model(resolve_model(model), device="meta")
    block_classes(model, names)
