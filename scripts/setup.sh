#!/usr/bin/env bash
# Set-up shared by the README's two commands: Debian packages, a virtual environment, capas and its extras.
#   bash scripts/setup.sh main   what the main job needs: the dataset, capas with the study extra
#   bash scripts/setup.sh test   everything: also chromium for the browser tests, g++ for train.compile
#                                (Inductor compiles C++ on a CPU), every extra, dev tools
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-test}"
case "$mode" in
  main) apt_packages=(python3-venv dataset-fashion-mnist); extras="study" ;;
  test) apt_packages=(python3-venv dataset-fashion-mnist chromium chromium-driver g++); extras="all,dev" ;;
  *) echo "usage: scripts/setup.sh main|test" >&2; exit 2 ;;
esac

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's python3 has no ensurepip (python3-venv): a venv made without it has bin/python and no pip
if [ ! -x .venv/bin/pip ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# pyproject.toml states the torch versions capas supports; constraints.txt pins the releases these
# machines hold on disk.
.venv/bin/pip install -q -c constraints.txt -e ".[$extras]"
