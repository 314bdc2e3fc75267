#!/bin/bash
#SBATCH --job-name=shardlab
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
# shardlab: fsdp1 zero3, bf16, 1 node(s) x 8 GPU(s).
# train.py is a placeholder: put your own training script (and its arguments) there; shardlab export PLAN --to fsdp-code -o train.py writes one that applies this plan.
set -euo pipefail

# The first node of the allocation hosts the c10d rendezvous.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=29500

# One task per node; single quotes so each node expands its own SLURM_NODEID.
srun --kill-on-bad-exit=1 bash -c 'torchrun --nnodes=1 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID --max-restarts=0 train.py'
