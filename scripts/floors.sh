#!/usr/bin/env bash
# The declared lower bounds: a second virtual environment, .venv-floors, with every dependency and
# extra of pyproject.toml at the release its `>=` names, then the test suite in it.
#   bash scripts/floors.sh [PYTEST ARGS]     (after `bash scripts/setup.sh test`: its Debian packages)
# torch and torchvision come from constraints.txt (the releases on disk), the dev tools at their newest
# that fit; a test that passes in .venv and fails here means a floor that does not work: raise it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-floors/bin/pip ]; then
  python3.11 -m venv .venv-floors
  .venv-floors/bin/pip install -q --upgrade pip
fi
# One `name==floor` line for each `name>=floor` of the dependencies and extras, read from pyproject.toml
# itself (dev tools, torch and torchvision left out).
.venv-floors/bin/python - >.venv-floors/floors.txt <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [r for extra, rs in project["optional-dependencies"].items() if extra != "dev" for r in rs]
for requirement in project["dependencies"] + extras:
    match = re.fullmatch(r"([\w.-]+)(\[[\w,]+\])?>=([\w.]+)", requirement)
    if match and match[1] not in ("torch", "torchvision"):
        print(f"{match[1]}=={match[3]}")
EOF
.venv-floors/bin/pip install -q -c constraints.txt -c .venv-floors/floors.txt -e ".[all,dev]"
.venv-floors/bin/python -m pytest -q -n "$(nproc)" --dist loadfile "$@"
