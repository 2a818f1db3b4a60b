"""The source distribution carries what its test suite needs (MANIFEST.in): setuptools alone ships
tests/test_*.py without conftest.py, the fixtures or the examples the tests read, so an sdist's tests
could not run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
    "constraints.txt",
    "src",
    "tests",
    "examples",
    "scripts",
    "benchmarks",
]
SHIPPED = ["tests", "examples", "scripts", "benchmarks"]


def _files(root: Path, top: str) -> set[str]:
    return {
        str(path.relative_to(root))
        for path in (root / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def _build(tmp_path: Path, kind: str, sources: list[str]) -> Path:
    """Build an sdist or a wheel of a copy of `sources` (building writes an egg-info into the tree)."""
    copy = tmp_path / "capas"
    copy.mkdir()
    for name in sources:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, copy / name)
    build = f"import setuptools.build_meta as b, sys; print(b.build_{kind}(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=copy,
        capture_output=True,
        text=True,
        check=True,
    )
    return tmp_path / "dist" / done.stdout.strip().splitlines()[-1]


def test_the_sdist_holds_the_tests_with_their_fixtures_and_examples(tmp_path):
    with tarfile.open(_build(tmp_path, "sdist", SOURCES)) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
    wanted = {"constraints.txt"}.union(*(_files(tmp_path / "capas", name) for name in SHIPPED))
    assert wanted - names == set()
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def test_the_wheel_marks_the_package_as_typed(tmp_path):
    """capas' public functions and configs carry type hints, but without the py.typed marker (PEP 561)
    a user's mypy skipped the installed package ("missing library stubs or py.typed marker") and
    typed everything from it as Any."""
    with zipfile.ZipFile(_build(tmp_path, "wheel", ["pyproject.toml", "README.md", "src"])) as wheel:
        assert "capas/py.typed" in wheel.namelist()
