"""scripts/setup.sh, run in a copy of the repository with the system's commands replaced by stubs that
record how they were called (no packages are installed, nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SETUP = Path(__file__).parent.parent / "scripts" / "setup.sh"

# dpkg-query: nothing installed; apt-get, sudo and pip: record the call; python3 -m venv: what Debian's
# does, bin/python and (python3-venv's ensurepip) bin/pip
STUBS = {
    "dpkg-query": "exit 1",
    "apt-get": 'echo "apt-get $*" >> "$LOG"',
    "sudo": '"$@"',
    "python3": 'echo "python3 $*" >> "$LOG"\nmkdir -p .venv/bin\nfor tool in python pip; do\n'
    '  printf \'#!/bin/sh\\necho "$0 $*" >> "$LOG"\\n\' > .venv/bin/$tool; chmod +x .venv/bin/$tool\ndone',
}


def _setup(tmp_path: Path, mode: str) -> list[str]:
    """Run setup.sh MODE in a copy of the repository; the stubs' calls, one a line."""
    tmp_path.mkdir(exist_ok=True)
    repo, stubs = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(SETUP, repo / "scripts" / "setup.sh")
    stubs.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "LOG": str(log)}
    subprocess.run(["bash", "scripts/setup.sh", mode], cwd=repo, env=env, check=True, timeout=30)
    return log.read_text().splitlines()


def test_a_fresh_debian_gets_the_venv_module(tmp_path):
    """Debian's python3 has no ensurepip (package python3-venv): `python3 -m venv` failed on a fresh
    machine, so neither of the README's two commands got past the set-up."""
    for mode in ("main", "test"):
        calls = _setup(tmp_path / mode, mode)
        install = next(call for call in calls if call.startswith("apt-get install"))
        assert "python3-venv" in install.split(), install


def test_a_venv_left_without_pip_is_made_again(tmp_path):
    """A `python3 -m venv` that failed for want of ensurepip leaves .venv/bin/python without pip; the
    set-up took that for a finished venv, and every rerun stopped at the missing .venv/bin/pip."""
    (tmp_path / "repo" / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / "repo" / ".venv" / "bin" / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    calls = _setup(tmp_path, "main")
    assert "python3 -m venv .venv" in calls
    assert any(call.endswith(".venv/bin/pip install -q -c constraints.txt -e .[study]") for call in calls)
