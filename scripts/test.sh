#!/usr/bin/env bash
# The test suite: set up, then run pytest (slow checks are excluded; they run in benchmarks/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
