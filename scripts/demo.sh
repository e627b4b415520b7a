#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on the embedded default:
# train the amortized LoRA proposal of the embedded MDLM towards positive sentiment and
# compare best-of-N, SMCbase and SMCamot at each validation (configs/quickstart.yaml).
# Extra arguments are passed to the CLI (e.g. --trainer.max_steps 50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline
.venv/bin/python -m lightning_smc.fit --config configs/quickstart.yaml "$@"
