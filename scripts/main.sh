#!/usr/bin/env bash
# The main job: set up, then train the Keras MNIST example on Fashion-MNIST for a few epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/capas train examples/keras-mnist.yaml --data fashion-mnist --epochs 3 --out runs/keras-mnist "$@"
