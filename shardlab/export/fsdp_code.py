"""Plan -> a runnable PyTorch script that applies the plan with FSDP1 or FSDP2.

The script is the template shardlab/frameworks/templates/train_fsdp.py filled from the framework
adapter's settings (the same settings the runner applies): `shard_model(model, device)` is the part
to copy into a real project, `main()` trains a tiny demo model with it, so the export can be checked
by running it: `torchrun --nproc-per-node=2 train_fsdp.py --steps 3` (CUDA + NCCL, or CPU + gloo).
"""

from __future__ import annotations

from shardlab.frameworks.base import block_names
from shardlab.plan import Plan, bad_input

__all__ = ["block_names", "export_fsdp_code"]


def export_fsdp_code(plan: Plan) -> str:
    """The script's text for an fsdp1 or fsdp2 plan."""
    if plan.framework not in ("fsdp1", "fsdp2"):
        raise bad_input("framework", f"--to fsdp-code needs framework fsdp1 or fsdp2, but the plan's framework is {plan.framework}. "
                        "Translate it first (shardlab translate PLAN --to fsdp2), or export with --to deepspeed.")
    from shardlab.frameworks import adapter

    return adapter(plan.framework).render(plan)
