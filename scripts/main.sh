#!/usr/bin/env bash
# The main job: set up, then run the global-pooling study of seeds 000/001 on Fashion-MNIST
# (Flatten vs GlobalMaxPooling2D vs GlobalAveragePooling2D, 3 seeds each, every run trained to its own
# convergence and tested on the whole 10,000-image test split: about 6 minutes on 2 cores
# of a CPU with AVX512-BF16 or AMX, 38 on 2 cores with AVX2 only: README, Studies).
# It prints the report table and where report.md / report.html are; rerunning resumes or reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh main
.venv/bin/capas study examples/studies/global-pooling.yaml "$@"
