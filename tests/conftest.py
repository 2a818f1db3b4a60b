"""Shared fixtures: a small spec and a run directory trained on real Fashion-MNIST images."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from capas.spec import DataConfig, ModelSpec, TrainConfig

# Decoded folders and cached backbone features go to a fresh folder per test session (and to the
# subprocesses tests start), so no test depends on what an earlier session left in ~/.cache/capas.
os.environ["CAPAS_CACHE"] = tempfile.mkdtemp(prefix="capas-test-cache-")
atexit.register(shutil.rmtree, os.environ["CAPAS_CACHE"], ignore_errors=True)

TINY = {
    "name": "tiny",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
        {"MaxPooling2D": {"pool_size": 2}},
        {"Conv2D": {"filters": 16, "kernel_size": 3, "activation": "relu"}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return ModelSpec.from_dict(TINY)


@pytest.fixture(scope="session")
def tiny_data() -> DataConfig:
    """2,000 training images of the real Fashion-MNIST (Debian's dataset-fashion-mnist)."""
    return DataConfig(name="fashion-mnist", limit=2000)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_spec, tiny_data):
    """A run directory of the tiny model after 2 epochs; shared by tests that only read it."""
    from capas.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_spec, tiny_data, TrainConfig(epochs=2, batch_size=64, optimizer={"lr": 3e-3}), out)
    return out
