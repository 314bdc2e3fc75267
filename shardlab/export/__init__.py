"""Plan -> the real tools' formats, one module per target. Pure functions, no I/O.

`export(plan, target)` is what `shardlab export PLAN --to TARGET` prints. The launch targets render
`launch_command` (the very builder the runner executes) with placeholders for what differs per node.
"""

from __future__ import annotations

from typing import Callable

from shardlab.plan import Plan, bad_input

TARGETS: tuple[str, ...] = ("deepspeed", "accelerate", "fsdp-code", "torchrun", "deepspeed-launch",
                            "accelerate-launch", "slurm")

PROGRAM = "train.py"


def program_note(plan: Plan) -> list[str]:
    """What every exported launch command says about PROGRAM: a stand-in, not a file shardlab ships."""
    start = ("shardlab export PLAN --to deepspeed -o ds_config.json is the config it passes to deepspeed.initialize"
             if plan.framework == "deepspeed" else "shardlab export PLAN --to fsdp-code -o train.py writes one that applies this plan")
    return [f"# {PROGRAM} is a placeholder: put your own training script (and its arguments) there; {start}."]
MASTER_PORT = 29500


def program_args(plan: Plan) -> list[str]:
    """The training program and its arguments (a DeepSpeed program is told where its config is)."""
    from shardlab.export.accelerate import DS_CONFIG_FILE

    return [PROGRAM, "--deepspeed_config", DS_CONFIG_FILE] if plan.framework == "deepspeed" else [PROGRAM]


def _how_to_run(plan: Plan, launcher: str) -> list[str]:
    n, g = plan.topology.nodes, plan.topology.gpus_per_node
    lines = [f"# {launcher}: {n} node(s) x {g} process(es) per node, {plan.framework} {plan.sharding}, {plan.precision}.",
             *program_note(plan)]
    if launcher == "deepspeed" and n > 1:
        lines += ["# Start once, on the first node; the launcher reaches the others over ssh (pdsh).",
                  f"# 'hostfile' lists one line per node: '<hostname> slots={g}'. Set MASTER_ADDR to the first node."]
    elif n > 1:
        lines += [f"# Run on every node with NODE_RANK=0..{n - 1}, MASTER_ADDR=<first node's address>, MASTER_PORT={MASTER_PORT}."]
    if launcher == "deepspeed" or plan.framework == "deepspeed" and launcher != "accelerate":
        lines.append("# ds_config.json: shardlab export PLAN --to deepspeed -o ds_config.json")
    if launcher == "accelerate":
        lines.append("# accelerate_config.yaml: shardlab export PLAN --to accelerate -o accelerate_config.yaml")
    return lines


def export_launch(plan: Plan, launcher: str) -> str:
    """A launch command for one node of the plan, with a comment saying how to use it."""
    from shardlab.export.deepspeed import require_deepspeed
    from shardlab.export.launch import launch_command, render_command

    if launcher == "deepspeed":
        require_deepspeed(plan, "deepspeed-launch")
    single = plan.topology.nodes == 1
    program = [PROGRAM] if launcher != "torchrun" else program_args(plan)
    argv, env = launch_command(plan, program, launcher=launcher,  # type: ignore[arg-type]
                               master_port=MASTER_PORT if single else "$MASTER_PORT")
    return "\n".join([*_how_to_run(plan, launcher), render_command(argv, env)]) + "\n"


def _exporters() -> dict[str, Callable[[Plan], str]]:
    from shardlab.export.accelerate import export_accelerate
    from shardlab.export.deepspeed import export_deepspeed
    from shardlab.export.fsdp_code import export_fsdp_code
    from shardlab.export.slurm import export_slurm

    return {
        "deepspeed": export_deepspeed,
        "accelerate": export_accelerate,
        "fsdp-code": export_fsdp_code,
        "torchrun": lambda p: export_launch(p, "torchrun"),
        "deepspeed-launch": lambda p: export_launch(p, "deepspeed"),
        "accelerate-launch": lambda p: export_launch(p, "accelerate"),
        "slurm": export_slurm,
    }


def export(plan: Plan, target: str) -> str:
    """The plan in `target`'s format (one of TARGETS), as text ready to write to a file."""
    if target not in TARGETS:
        raise bad_input("--to", f"--to {target!r} is not an export target. Use one of: {', '.join(TARGETS)}.")
    return _exporters()[target](plan)
