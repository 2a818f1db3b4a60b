#!/usr/bin/env bash
# The test suite: set up, then ruff and pytest (slow checks are excluded; `bash scripts/test.sh -m slow` runs them).
# pytest runs a worker process per core (pytest-xdist), each test file in one worker, each worker with
# its share of PyTorch threads (tests/conftest.py): most tests keep one core busy (small models, Python,
# subprocesses starting), so a single process left the other core idle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q -n "$(nproc)" --dist loadfile "$@"
