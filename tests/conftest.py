"""Shared fixtures: the tiny spec, a run directory trained on real Fashion-MNIST images, and the tiny
study (a factory of study documents and the file writer every study test uses)."""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from capas.cpu import available_cores
from capas.spec import DataConfig, ModelSpec, TrainConfig

# Under pytest-xdist (scripts/test.sh: one worker per core) each worker, and what it starts, computes
# on its share of the cores: PyTorch's default of a thread per core in every worker made them wait
# for each other's threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, available_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
    return DataConfig(name="fashion-mnist", limit=2000, test_limit=400)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_spec, tiny_data):
    """A run directory of the tiny model after 2 epochs; shared by tests that only read it."""
    from capas.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_spec, tiny_data, TrainConfig(epochs=2, batch_size=64, optimizer={"lr": 3e-3}), out)
    return out


# The study tests' model: small enough that a run of 300 images takes about a second.
SMALL = {
    "name": "small",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
        {"MaxPooling2D": {"pool_size": 2}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


def _tiny_study(
    *, layers: list | None = None, train: dict | None = None, data: dict | None = None, **top
) -> dict:
    """Flatten (base) against GlobalAveragePooling2D, 2 seeds, 1 epoch on 300 Fashion-MNIST images.

    `layers` replaces the spec's layers, `train` and `data` update the base's, `top` the document's keys.
    """
    spec = copy.deepcopy(SMALL)
    if layers is not None:
        spec["layers"] = copy.deepcopy(layers)
    doc = {
        "name": "tiny",
        "base": {
            "name": "Flatten",
            "spec": spec,
            "train": {"epochs": 1, "batch_size": 64, **(train or {})},
            "data": {"name": "fashion-mnist", "limit": 300, "test_limit": 300, **(data or {})},
        },
        "seeds": 2,
        "variations": [
            {
                "name": "head",
                "alternatives": [
                    {"name": "GAP", "replace": {"layer": "flatten", "with": "GlobalAveragePooling2D"}}
                ],
            }
        ],
    }
    doc.update(copy.deepcopy(top))
    return doc


@pytest.fixture
def tiny_study() -> Callable[..., dict]:
    """The tiny study document factory (see _tiny_study): each call returns a fresh, editable dict."""
    return _tiny_study


@pytest.fixture(scope="session")
def small_spec() -> dict:
    """The study tests' model as a spec document, shared by the session: copy it before changing it."""
    return copy.deepcopy(SMALL)


@pytest.fixture
def study_file(tmp_path) -> Callable[..., Path]:
    """Write a study document as YAML into the test's folder: study_file(doc, name="study.yaml") -> path."""

    def write(doc: dict, name: str = "study.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


@pytest.fixture
def files_up_to_4k() -> Callable[[], contextlib.AbstractContextManager]:
    """A context in which writes past 4 KiB fail with EFBIG (RLIMIT_FSIZE), as they fail with ENOSPC
    on a full disk."""
    resource = pytest.importorskip("resource")
    import signal

    @contextlib.contextmanager
    def limited():
        previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous_handler)

    return limited
