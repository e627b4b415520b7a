#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline
.venv/bin/python -m lightning_smc.sample "$@"
