"""One process at a time per study directory and per run directory: real `capas` processes, a real lock.

The second process is refused with a message naming the first (pid, host, command, since when), the
first goes on undisturbed, and the lock goes away with its holder, however it ends.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from capas.errors import CapasError
from capas.lock import LOCK, exclusive

SPEC = {
    "name": "busy",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-c", "from capas.cli import app; app()", *map(str, args)]


def _start(*args: str | Path) -> subprocess.Popen:
    # its own process group, so that the cleanup kills a study's worker processes too
    return subprocess.Popen(
        _cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _holder(directory: Path, process: subprocess.Popen) -> dict:
    """The lock file's contents once `process` holds the lock."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first process ended before taking the lock"
        try:
            return json.loads((directory / LOCK).read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("the first process never took the lock")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _refused(result: subprocess.CompletedProcess, first: subprocess.Popen, what: str) -> str:
    message = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert f"this {what} is in use by pid {first.pid} on {platform.node()} since " in message
    return message


@pytest.mark.slow  # run by `bash scripts/test.sh -m slow` (README): the suite stays under 10 minutes
def test_a_second_study_on_the_same_directory_is_refused_naming_the_first(tmp_path):
    doc = {
        "name": "busy",
        "base": {
            "spec": SPEC,
            "train": {"epochs": 100000, "batch_size": 32},
            "data": {"name": "fashion-mnist", "limit": 1000},
        },
        "seeds": 1,
        "variations": [{"name": "width", "alternatives": [{"name": "lr", "train": {"optimizer.lr": 0.01}}]}],
    }
    first_file, second_file = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first_file.write_text(yaml.safe_dump(doc))
    doc["base"]["train"]["epochs"] = 4  # what deleted the first one's runs before the lock existed
    second_file.write_text(yaml.safe_dump(doc))
    out = tmp_path / "study"
    first = _start("study", first_file, "--out", out, "--workers", "1")
    try:
        info = _holder(out, first)
        assert info["pid"] == first.pid and "study" in info["command"] and str(first_file) in info["command"]
        while not any((out / "runs").glob("*/seed-0/checkpoint.safetensors")):  # a run in progress
            assert first.poll() is None
            time.sleep(0.05)
        second = subprocess.run(
            _cli("study", second_file, "--out", out), capture_output=True, text=True, timeout=300
        )
        message = _refused(second, first, "study directory")
        assert str(first_file) in message
        assert first.poll() is None  # undisturbed: still training, its run directories in place
        assert any((out / "runs").glob("*/seed-0/checkpoint.safetensors"))
    finally:
        _stop(first)
    # SIGKILL released the lock with the process: the directory can be taken again at once
    with exclusive(out, "study directory"):
        pass


def test_a_second_train_into_the_same_run_directory_is_refused(tmp_path):
    spec = tmp_path / "busy.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    out = tmp_path / "run"
    common = ["train", spec, "--data", "fashion-mnist", "--limit", "1000", "--out", out]
    first = _start(*common, "--epochs", "100000")  # still training when the second starts, even on a GPU
    try:
        _holder(out, first)
        second = subprocess.run(
            _cli(*common, "--epochs", "2", "--restart"), capture_output=True, text=True, timeout=300
        )
        _refused(second, first, "run directory")
        assert first.poll() is None
        # the library refuses too
        with pytest.raises(CapasError, match=f"in use by pid {first.pid}"), exclusive(out, "run directory"):
            pass
    finally:
        _stop(first)
    with exclusive(out, "run directory"):
        pass


def test_a_refused_command_leaves_no_folder_behind(tmp_path):
    """A train refused after it locked its new --out (here: ema.every beyond its steps) left the folder
    holding only .capas.lock, and the folders above it that it made."""
    from capas.spec import DataConfig, ModelSpec, TrainConfig
    from capas.train import train

    spec = ModelSpec.from_dict(
        {"name": "tiny", "input_shape": [8, 8, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    )
    out = tmp_path / "runs" / "tiny"
    cfg = TrainConfig(epochs=1, ema={"every": 100000}, device="cpu")
    with pytest.raises(CapasError, match=r"^ema\.every is 100000 optimizer steps"):
        train(spec, DataConfig(name="digits"), cfg, out)
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"  # a folder that was there before stays, as do the files a command wrote
    kept.mkdir()
    with pytest.raises(CapasError, match="refused"), exclusive(kept, "run directory"):
        raise CapasError("refused")
    with exclusive(out, "run directory"):
        (out / "checkpoint.safetensors").write_bytes(b"")
    assert kept.is_dir() and (out / "checkpoint.safetensors").exists()
