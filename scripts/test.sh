#!/usr/bin/env bash
# The test suite: set up, then ruff and pytest (slow checks are excluded; `bash scripts/test.sh -m slow` runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
