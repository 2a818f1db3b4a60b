"""`load_dataset(name)`: the one entry point from a dataset name to in-memory train and test sets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from capas.data.cifar import load_cifar10
from capas.data.dataset import ArrayDataset
from capas.data.folder import load_folder
from capas.data.idx import SOURCES, load_idx
from capas.errors import CapasError, closest

NAMES = (*SOURCES, "cifar10", "digits", "folder:PATH")


def load_dataset(name: str, data_dir: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset | None]:
    """Return (train, test); test is None when the source has no test split (image folders, digits).

    `data_dir` is searched first for downloadable datasets (then `$CAPAS_DATA`, then the cache);
    `folder:PATH` loads `PATH/<class>/<image>` instead.
    """
    if data_dir is not None and (name == "digits" or name.startswith("folder:")):
        what = "a folder names its own path" if name != "digits" else "digits comes with scikit-learn"
        warnings.warn(
            f"data_dir (--data-dir) {data_dir} is not used: {name} is read from no data folder ({what}); "
            f"--data-dir is for {', '.join(SOURCES)} and cifar10",
            stacklevel=2,
        )
    if name.startswith("folder:"):
        if not name.removeprefix("folder:").strip():  # '' would read the current folder
            raise CapasError("dataset 'folder:' needs a path: folder:PATH, with PATH/<class>/<image>")
        return load_folder(name.removeprefix("folder:")), None
    if name in SOURCES:
        return load_idx(name, data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "digits":
        return load_digits(), None
    raise CapasError(f"unknown dataset {name!r}{closest(name, NAMES)}; valid names: {', '.join(NAMES)}")


def load_digits() -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), pixels 0..16 scaled to 0..255."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise CapasError("the 'digits' dataset comes with scikit-learn: pip install scikit-learn") from None
    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(bunch.target).long(),
        tuple(str(c) for c in bunch.target_names),
    )
