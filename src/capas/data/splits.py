"""Train / validation / test splits: stratified, deterministic for a seed, recorded as JSON."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capas.data.dataset import ArrayDataset
from capas.data.sources import load_dataset
from capas.errors import CapasError, first_of

if TYPE_CHECKING:
    from capas.spec import DataConfig


@dataclass(frozen=True)
class Splits:
    """The three splits of one dataset and how they were made (`info` is JSON-able)."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    info: dict[str, Any]


def make_splits(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    test_limit: int | None = None,
) -> Splits:
    """Load dataset `name` and split it, each split keeping the class proportions.

    test: the dataset's own test split when it has one ("official"), else a `test_fraction` of
    its images held out first ("held-out"). val: a `val_fraction` of the remaining training images.
    limit: for quick runs, keep at most `limit` training images and round(limit * val_fraction)
    validation images; test_limit: at most this many test images, the same ones whatever `limit`.
    Each is a stratified subset of the full split (so a limited run never sees images outside the
    unlimited run's splits). The test
    split stays whole unless test_limit says otherwise: 1,200 test images add about ±2 pp of
    binomial noise (95%) at 80% accuracy, which no seed interval contains.

    `info["sha256"]` holds a digest of each split's images and labels: a run records them, so that
    scoring it again can tell whether its test split still holds the images it was tested on.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise CapasError(
            f"val_fraction and test_fraction must lie in (0, 1): got {val_fraction}, {test_fraction}"
        )
    for key, value in (("limit", limit), ("test_limit", test_limit)):
        if value is not None and value < 1:
            raise CapasError(f"{key} must be a positive number of images, got {value}")
    data, test = load_dataset(name, data_dir)
    total = len(data) + (0 if test is None else len(test))
    generator = torch.Generator().manual_seed(seed)
    test_source = "official" if test is not None else "held-out"
    if test is None:
        test, data = stratified_split(data, round(len(data) * test_fraction), generator)
    val, train = stratified_split(data, round(len(data) * val_fraction), generator)
    test_draws = torch.Generator().set_state(generator.get_state())  # the same test images whatever `limit`
    if limit is not None:
        train = stratified_split(train, min(limit, len(train)), generator)[0]
        val = stratified_split(val, min(round(limit * val_fraction), len(val)), generator)[0]
    if test_limit is not None:
        test = stratified_split(test, min(test_limit, len(test)), test_draws)[0]
    sizes = {"train": len(train), "validation": len(val), "test": len(test)}
    if not all(sizes.values()):
        # an empty split fails late: after an epoch of training (validation) or at its end (test)
        settings = [f"val_fraction {val_fraction}"]
        settings += [f"test_fraction {test_fraction}"] if test_source == "held-out" else []
        settings += [
            f"{key} {value}" for key, value in (("limit", limit), ("test_limit", test_limit)) if value
        ]
        raise CapasError(
            f"{name}: {total} images leave a split empty: "
            f"{', '.join(f'{split} {size}' for split, size in sizes.items())} ({', '.join(settings)}); "
            "every split needs at least one image: add images, or change the fractions or limits"
        )
    untrained = torch.bincount(train.labels.cpu(), minlength=len(train.classes)) == 0
    if untrained.any():  # a class of one image whose image the test split took: stratifying cannot split it
        names = [repr(train.classes[i]) for i in untrained.nonzero().squeeze(1).tolist()]
        warnings.warn(
            f"{name}: {len(names)} class{'es' if len(names) != 1 else ''} without a training image ({first_of(names, 5)}): "
            "the model cannot learn a class it never sees, yet its images in validation and test are scored; "
            "add images or raise the limit",
            stacklevel=2,
        )
    info = {
        "dataset": name,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "limit": limit,
        "test_limit": test_limit,
        "test_source": test_source,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "sha256": {"train": digest(train), "val": digest(val), "test": digest(test)},
    }
    return Splits(train, val, test, info)


def digest(data: ArrayDataset) -> str:
    """sha256 of a dataset's shape, images and labels (about 0.2 s for CIFAR-10's 60,000 images)."""
    sha = hashlib.sha256(str(tuple(data.images.shape)).encode())
    sha.update(data.images.cpu().contiguous().numpy())  # (N, C, H, W) uint8
    sha.update(data.labels.cpu().contiguous().numpy())
    return sha.hexdigest()


def splits_for(data: DataConfig) -> Splits:
    """Load the dataset a data config names and cut its splits as it says."""
    return make_splits(
        data.name,
        data_dir=data.data_dir,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        seed=data.split_seed,
        limit=data.limit,
        test_limit=data.test_limit,
    )


def stratified_split(
    data: ArrayDataset, k: int, generator: torch.Generator
) -> tuple[ArrayDataset, ArrayDataset]:
    """(k images drawn at random with the class proportions of `data`, the rest).

    Each class c of n_c images gives floor(k * n_c / n) images, and the leftover places go to the
    classes with the largest remainders (ties to the lower label): every class count is within one
    image of its exact share, in both parts. Both parts keep the original order of `data`.
    """
    labels = data.labels.cpu()
    n = len(labels)
    if not 0 <= k <= n:
        raise ValueError(f"cannot take {k} of {n} images")
    if k == 0:
        return data.subset(labels[:0]), data
    counts = torch.bincount(labels, minlength=len(data.classes))  # (K,)
    share = counts * k
    quota = share // n
    remainder = share % n
    # stable sort on -remainder: the largest remainders first, ties to the lower label
    extra = torch.argsort(-remainder, stable=True)[: k - int(quota.sum())]
    quota[extra] += 1
    # a random order, then grouped by class (stable): each image's rank among its class is random
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.argsort(labels[perm], stable=True)]
    starts = torch.cumsum(counts, 0) - counts  # (K,) position of each class's first image in `order`
    rank = torch.arange(n) - starts[labels[order]]
    taken = torch.zeros(n, dtype=torch.bool)
    taken[order[rank < quota[labels[order]]]] = True
    return data.subset(taken.nonzero().squeeze(1)), data.subset((~taken).nonzero().squeeze(1))
