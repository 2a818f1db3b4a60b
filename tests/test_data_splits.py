"""Stratified, deterministic splits, on synthetic datasets whose images carry their own index."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from capas.data import ArrayDataset, make_splits, splits
from capas.errors import CapasError

COUNTS = [50, 30, 20, 7, 3]  # images per class: deliberately unbalanced


def indexed(counts: list[int], offset: int = 0) -> ArrayDataset:
    """A dataset whose image i holds i in two pixels (high byte, low byte)."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = torch.arange(offset, offset + len(labels))
    images = torch.stack([ids // 256, ids % 256], 1).to(torch.uint8).view(-1, 1, 1, 2)
    return ArrayDataset(images.contiguous(), labels, tuple(f"c{i}" for i in range(len(counts))))


def ids(data: ArrayDataset) -> set[int]:
    return set((data.images[:, 0, 0, 0].long() * 256 + data.images[:, 0, 0, 1].long()).tolist())


@pytest.fixture
def source(monkeypatch):
    """make_splits("with-test") gets an official test split, make_splits("no-test") none."""
    datasets = {
        "with-test": (indexed(COUNTS), indexed([10, 6, 4, 2, 1], offset=1000)),
        "no-test": (indexed(COUNTS), None),
        "two-images": (indexed([1, 1]), None),
        "two-and-test": (indexed([1, 1]), indexed([1, 1], offset=1000)),
    }
    monkeypatch.setattr(splits, "load_dataset", lambda name, data_dir: datasets[name])


def assert_stratified(part: ArrayDataset, parent_counts: torch.Tensor) -> None:
    expected = len(part) * parent_counts / parent_counts.sum()
    counts = torch.bincount(part.labels, minlength=len(parent_counts))
    assert ((counts - expected).abs() < 1).all(), (counts, expected)


def test_held_out_test_split(source):
    s = make_splits("no-test", val_fraction=0.2, test_fraction=0.25, seed=3)
    n = sum(COUNTS)
    assert (len(s.test), len(s.val), len(s.train)) == (round(n * 0.25), round((n - 28) * 0.2), n - 28 - 16)
    assert ids(s.train) | ids(s.val) | ids(s.test) == set(range(n))
    assert not ids(s.train) & ids(s.val) and not ids(s.train) & ids(s.test) and not ids(s.val) & ids(s.test)
    counts = torch.tensor(COUNTS)
    assert_stratified(s.test, counts)
    rest = counts - torch.bincount(s.test.labels, minlength=5)
    assert_stratified(s.val, rest)
    assert_stratified(s.train, rest)
    assert s.info == {
        "dataset": "no-test",
        "seed": 3,
        "val_fraction": 0.2,
        "test_fraction": 0.25,
        "limit": None,
        "test_limit": None,
        "test_source": "held-out",
        "sizes": {"train": 66, "val": 16, "test": 28},
        "sha256": {
            "train": splits.digest(s.train),
            "val": splits.digest(s.val),
            "test": splits.digest(s.test),
        },
    }
    json.dumps(s.info)


def test_official_test_split_is_kept(source):
    s = make_splits("with-test")
    assert ids(s.test) == set(range(1000, 1023)) and s.info["test_source"] == "official"
    assert ids(s.train) | ids(s.val) == set(range(sum(COUNTS))) and not ids(s.train) & ids(s.val)
    assert_stratified(s.val, torch.tensor(COUNTS))


def test_deterministic_for_a_seed(source):
    a, b, c = (make_splits("no-test", seed=seed) for seed in (1, 1, 2))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).images, getattr(b, name).images)
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels)
    assert ids(a.val) != ids(c.val)


def test_limit_takes_stratified_subsets_of_the_full_splits(source):
    full = make_splits("with-test", seed=5)
    limited = make_splits("with-test", seed=5, limit=40)
    assert limited.info["sizes"] == {"train": 40, "val": 4, "test": 23}
    assert ids(limited.train) <= ids(full.train) and ids(limited.val) <= ids(full.val)
    assert_stratified(limited.train, torch.bincount(full.train.labels))
    assert make_splits("with-test", limit=10_000).info["sizes"] == full.info["sizes"]


def test_limit_keeps_the_whole_test_split_unless_test_limit_says_otherwise(source):
    full = make_splits("with-test", seed=5)
    limited = make_splits("with-test", seed=5, limit=40)
    assert ids(limited.test) == ids(full.test)  # the limit is on training images, not on the measurement
    with pytest.warns(
        UserWarning, match=r"1 class without a training image \('c4'\)"
    ):  # 20 of 5 unequal classes
        held_out = make_splits("no-test", seed=3, limit=20)
    assert ids(held_out.test) == ids(make_splits("no-test", seed=3).test)
    small = make_splits("with-test", seed=5, limit=40, test_limit=10)
    assert small.info["sizes"]["test"] == 10 and small.info["test_limit"] == 10
    assert ids(small.test) <= ids(full.test)
    assert_stratified(small.test, torch.bincount(full.test.labels))
    # the same test images with or without a limit: one generator drew the limit's subsets first, so
    # runs that differed in `limit` alone (even one above the whole split) were tested on other images
    for name in ("with-test", "no-test"):
        unlimited = make_splits(name, seed=5, test_limit=10)
        for limit in (40, 10**6):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a class left without a training image
                assert ids(make_splits(name, seed=5, limit=limit, test_limit=10).test) == ids(unlimited.test)


def test_stratified_split_is_within_one_image_per_class():
    data = indexed(COUNTS)
    generator = torch.Generator().manual_seed(0)
    for k in range(len(data) + 1):
        taken, rest = splits.stratified_split(data, k, generator)
        assert len(taken) == k and len(rest) == len(data) - k
        assert_stratified(taken, torch.tensor(COUNTS))
        assert_stratified(rest, torch.tensor(COUNTS))


def test_bad_fractions(source):
    with pytest.raises(CapasError, match="val_fraction"):
        make_splits("no-test", val_fraction=1.0)
    with pytest.raises(CapasError, match="limit"):
        make_splits("no-test", limit=0)
    with pytest.raises(CapasError, match="test_limit must be a positive"):
        make_splits("no-test", test_limit=0)


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        (
            "two-images",
            {},
            ["2 images", "train 2, validation 0, test 0", "val_fraction 0.1, test_fraction 0.2"],
        ),
        ("two-and-test", {"val_fraction": 0.9}, ["train 0, validation 2, test 2", "val_fraction 0.9"]),
        ("with-test", {"limit": 3}, ["train 3, validation 0, test 23", "limit 3"]),
    ],
)
def test_a_dataset_too_small_for_its_splits_is_refused(source, name, options, words):
    """An empty validation split trained, then crashed on torch.cat() after the first epoch."""
    with pytest.raises(CapasError, match=f"^{name}: ") as error:
        make_splits(name, **options)
    for word in words:
        assert word in str(error.value), str(error.value)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist"
)
def test_fashion_mnist_quick_run():
    s = make_splits("fashion-mnist", limit=1000)
    assert s.info["sizes"] == {"train": 1000, "val": 100, "test": 10_000}  # the whole official test split
    assert torch.bincount(s.train.labels).tolist() == [100] * 10


def test_a_class_left_without_a_training_image_is_said(monkeypatch):
    """Classes of one image each lost it to the held-out test split and trained without a word."""
    monkeypatch.setattr(
        splits, "load_dataset", lambda name, data_dir: (indexed([1, 1, 1, 6, 6, 6, 6, 6, 6, 6]), None)
    )
    with pytest.warns(UserWarning, match=r"^few: 2 classes without a training image \('c0', 'c1'\)"):
        parts = make_splits("few")
    assert torch.bincount(parts.train.labels, minlength=10)[:3].tolist() == [0, 0, 1]
