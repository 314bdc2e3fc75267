"""Plan -> a SLURM batch script (sbatch) that starts the plan's run with torchrun on every node.

One SLURM task per node runs `launch_command(...)`'s torchrun line; the nodes meet through torchrun's
c10d rendezvous on the first node of the allocation, so no node needs to know its rank in advance
(torchrun assigns it; SLURM_NODEID is passed for logs). torchrun is used for every framework:
DeepSpeed programs read the same environment variables through `deepspeed.init_distributed`.
"""

from __future__ import annotations

import shlex

from shardlab.plan import Plan


def export_slurm(plan: Plan, *, job_name: str = "shardlab", time_limit: str = "01:00:00") -> str:
    """The sbatch script's text."""
    from shardlab.export import MASTER_PORT, program_args, program_note
    from shardlab.export.launch import launch_command, render_command

    t = plan.topology
    argv, env = launch_command(plan, program_args(plan), launcher="torchrun", nnodes=t.nodes,
                               node_rank="$SLURM_NODEID", master_addr="$MASTER_ADDR",
                               master_port="$MASTER_PORT", run_id="$SLURM_JOB_ID")
    line = render_command(argv, {})
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={t.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={t.gpus_per_node}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --output=%x-%j.out",
        f"# shardlab: {plan.framework} {plan.sharding}, {plan.precision}, {t.nodes} node(s) x {t.gpus_per_node} GPU(s).",
        *program_note(plan),
        *(["# ds_config.json: shardlab export PLAN --to deepspeed -o ds_config.json"] if plan.framework == "deepspeed" else []),
        "set -euo pipefail",
        "",
        "# The first node of the allocation hosts the c10d rendezvous.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        f"export MASTER_PORT={MASTER_PORT}",
        *exports,
        "",
        "# One task per node; single quotes so each node expands its own SLURM_NODEID.",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(line)}",
    ]
    return "\n".join(lines) + "\n"
