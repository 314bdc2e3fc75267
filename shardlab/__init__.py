"""shardlab: build, check, export, estimate, run and compare FSDP / DeepSpeed ZeRO training setups.

`import shardlab` stays light (no torch, no deepspeed): the heavy parts are imported only by the
functions that need them, so the CLI and the widgets start fast.
"""

from shardlab.plan import Finding, Plan, PlanError, bad_input, load_plan, validate

__version__ = "0.1.0"

__all__ = ["Plan", "PlanError", "Finding", "bad_input", "load_plan", "validate", "launch", "tune", "__version__"]


def __getattr__(name: str):
    # Lazy entry points whose modules pull in more than the Plan needs.
    if name == "launch":
        from shardlab.run.launcher import launch

        return launch
    if name == "tune":  # the package shardlab.tune, callable as tune(...) (see its __init__)
        import shardlab.tune

        return shardlab.tune
    raise AttributeError(f"module 'shardlab' has no attribute {name!r}")
