#!/usr/bin/env bash
# Train the amortized proposal of MDLM-OWT on 2 nodes x 4 GPUs under SLURM.
#   sbatch scripts/slurm_amortized.sh                        # the defaults below
#   sbatch --nodes=4 scripts/slurm_amortized.sh              # more nodes: the script follows SLURM
# One task per GPU, started by srun: Lightning's SLURMEnvironment reads SLURM_PROCID / LOCALID /
# NODEID / NTASKS and the first host of SLURM_NODELIST, so nothing else is launched by hand.
# Rollouts are seeded by their global index: with R rollouts per GPU, the run behaves like one
# process drawing R * (nodes x GPUs) rollouts per step. On SIGUSR1 (90 s before the time limit)
# Lightning saves a checkpoint and requeues the job; the requeued job resumes from it.
#SBATCH --job-name=lsmc-amortized
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --output=outputs/slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
CONFIG=${CONFIG:-configs/amortized/sentiment_owt_multinode.yaml}
export WANDB_MODE=${WANDB_MODE:-offline}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
srun .venv/bin/python -m lightning_smc.fit --config "$CONFIG" \
  --trainer.num_nodes "$SLURM_NNODES" \
  --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  "$@"
