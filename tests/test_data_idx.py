"""IDX files (MNIST, Fashion-MNIST): the reader, where they are found, and their download."""

import dataclasses
import gzip
import hashlib
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capas.data import idx, load_dataset
from capas.data.download import file_digest
from capas.errors import CapasError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPAS_DATA", raising=False)


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    raw = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_mnist(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), np.uint8)
        )
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10)


@pytest.mark.parametrize(
    ("dtype", "code", "name"),
    [
        (np.uint8, 0x08, "a.idx"),
        (np.int32, 0x0C, "b.idx.gz"),
        (np.float32, 0x0D, "c.idx"),
        (np.int16, 0x0B, "d.gz"),
    ],
)
def test_read_idx_round_trip(tmp_path, dtype, code, name):
    array = (
        (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype != np.uint8
        else np.arange(24, dtype=dtype)
    )
    out = idx.read_idx(write_idx(tmp_path / name, array, code))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(CapasError, match=f"{path}.*bad magic"):
        idx.read_idx(path)


@pytest.mark.parametrize("name", ["images", "images.gz"])
def test_read_idx_truncated(tmp_path, name):
    path = write_idx(tmp_path / name, np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CapasError, match=str(path)):
        idx.read_idx(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28), "longer than its header says"),  # a bomb
        (b"", "not an IDX file"),  # a .gz of something else
        (struct.pack(">BBBBIII", 0, 0, 8, 3, 60000, 280, 280), "more than its .* compressed bytes can hold"),
    ],
    ids=["bomb", "not-idx", "too-small-for-its-header"],
)
def test_a_gz_that_inflates_to_much_more_is_refused_before_it_is_inflated(tmp_path, header, message):
    """The whole file was decompressed before its header was read: a 40 kB .gz cost 40 MB (a 400 kB
    one 1.3 GB) before the one-line refusal."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(40 << 20), compresslevel=1))
    tracemalloc.start()
    try:
        with pytest.raises(CapasError, match=message):
            idx.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_mnist_from_data_dir(tmp_path):
    write_mnist(tmp_path / "data" / "mnist", gz=False)
    train, test = load_dataset("mnist", tmp_path / "data")
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous()
    assert test.labels.tolist() == list(range(10))
    assert train.classes == tuple("0123456789")


def test_data_dir_comes_before_capas_data(tmp_path, monkeypatch):
    write_mnist(tmp_path / "arg", n_train=3)
    write_mnist(tmp_path / "env" / "mnist", n_train=4)
    monkeypatch.setenv("CAPAS_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", tmp_path / "arg")[0]) == 3
    assert len(load_dataset("mnist")[0]) == 4


def test_idx_files_at_the_root_of_capas_data_are_no_dataset_in_particular(tmp_path, monkeypatch):
    """MNIST and Fashion-MNIST files have the same names: with one of them directly in $CAPAS_DATA
    (a folder of datasets, unlike --data-dir, which names one), asking for the other trained on it
    under the other's class names."""
    write_mnist(tmp_path / "env", n_train=3)
    monkeypatch.setenv("CAPAS_DATA", str(tmp_path / "env"))
    source = dataclasses.replace(idx.SOURCES["mnist"], url=(tmp_path / "nowhere").as_uri() + "/")
    monkeypatch.setitem(idx.SOURCES, "mnist", source)
    with pytest.raises(
        CapasError, match=f"in a folder given as data_dir, or in {tmp_path / 'env' / 'mnist'}"
    ):
        load_dataset("mnist")
    assert len(load_dataset("mnist", tmp_path / "env")[0]) == 3  # --data-dir names the files' folder


def test_labels_must_match_images(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(CapasError, match="expected 20 labels"):
        load_dataset("mnist", tmp_path)


def test_download_into_cache(tmp_path, monkeypatch):
    served = tmp_path / "served"
    write_mnist(served)
    md5 = {stem: hashlib.md5((served / f"{stem}.gz").read_bytes()).hexdigest() for stem in idx.STEMS}
    source = dataclasses.replace(idx.SOURCES["mnist"], url=served.as_uri() + "/", md5=md5)
    monkeypatch.setitem(idx.SOURCES, "mnist", source)
    train, test = load_dataset("mnist")
    assert (len(train), len(test)) == (20, 10)
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(
        f"{s}.gz" for s in idx.STEMS
    )
    # a download interrupted after some of the files is completed, not refused
    (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(load_dataset("mnist")[1]) == 10


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    source = dataclasses.replace(idx.SOURCES["mnist"], url=(tmp_path / "nowhere").as_uri() + "/")
    monkeypatch.setitem(idx.SOURCES, "mnist", source)
    (tmp_path / "data").mkdir()
    with pytest.raises(CapasError) as caught:
        load_dataset("mnist", tmp_path / "data")
    message = str(caught.value)
    assert str(tmp_path / "data" / "mnist") in message and str(tmp_path / "cache" / "mnist") in message
    assert "could not download" in message and "place train-images-idx3-ubyte" in message


def test_a_data_dir_that_is_no_folder_is_refused(tmp_path):
    """A misspelt --data-dir was passed over for Debian's copy (or a download), the run recording it."""
    for name in ("fashion-mnist", "cifar10"):
        with pytest.raises(
            CapasError, match=rf"^data_dir \(--data-dir\) {tmp_path / 'typo'}: no such folder$"
        ):
            load_dataset(name, tmp_path / "typo")
        # '' (an unset variable in --data-dir "$DIR") was the current folder, silently
        with pytest.raises(CapasError, match=r"^data_dir \(--data-dir\) '': no such folder$"):
            load_dataset(name, "")
        (tmp_path / "afile").write_text("")  # named as what it is
        with pytest.raises(
            CapasError, match=rf"^data_dir \(--data-dir\) {tmp_path / 'afile'}: a file, not a folder$"
        ):
            load_dataset(name, tmp_path / "afile")


def test_a_data_dir_is_said_to_be_unused_where_the_dataset_takes_none(tmp_path):
    """`capas evaluate RUN --data-dir nope` on a digits run went on without a word, as on a folder."""
    folder = tmp_path / "imgs"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        Image.new("L", (4, 4), 0).save(folder / label / "x.png")
    for name in ("digits", f"folder:{folder}"):
        with pytest.warns(
            UserWarning, match=rf"^data_dir \(--data-dir\) nope is not used: {re.escape(name)} "
        ):
            load_dataset(name, "nope")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(
        CapasError, match=r"unknown dataset 'fashion_mnist' \(did you mean 'fashion-mnist'\?\)"
    ):
        load_dataset("fashion_mnist")


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    train, test = load_dataset("fashion-mnist")
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


# Debian rebuilt the .gz files when packaging them (their gzip headers carry the 2020-06-05 build
# time), so they differ from the published files byte for byte though they decompress to the same
# data: these are the digests of package version 0.0~git20200523.55506a9-1.
DEBIAN_MD5 = {
    "train-images-idx3-ubyte": "cf8536b0aa1a6ac5fa3f23001093305c",
    "train-labels-idx1-ubyte": "10bea18fdb374794d4bb42e356e600c9",
    "t10k-images-idx3-ubyte": "f78720b4224f21cce2f2ccf2d7a94c9a",
    "t10k-labels-idx1-ubyte": "0d30e22e447f3c33dab9ed536400ac01",
}


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_files_match_published_or_debian_md5s():
    for stem, published in idx.SOURCES["fashion-mnist"].md5.items():
        assert file_digest(DEBIAN / f"{stem}.gz", "md5") in (published, DEBIAN_MD5[stem])


def test_digits_needs_scikit_learn():
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits")
    assert test is None
    assert train.images.shape == (1797, 1, 8, 8) and int(train.images.max()) == 255


def test_a_folder_with_some_of_the_files_is_named(tmp_path):
    """With one file missing the folder was passed over for Debian's copy, the run recording it."""
    write_mnist(tmp_path / "data")
    (tmp_path / "data" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CapasError, match=r"holds only some of the IDX files: t10k-labels-idx1-ubyte missing"):
        load_dataset("fashion-mnist", tmp_path / "data")


@pytest.mark.parametrize(
    ("stem", "array", "code", "message"),
    [
        ("train-labels-idx1-ubyte", np.arange(20, dtype=np.float32) % 10, 0x0D, "expected integer labels"),
        ("train-images-idx3-ubyte", np.zeros((20, 0, 28), np.uint8), 0x08, r"expected uint8 images"),
        ("t10k-images-idx3-ubyte", np.zeros((10, 32, 32), np.uint8), 0x08, r"test images are \(32, 32\)"),
    ],
)
def test_hand_made_files_that_cannot_be_mnist_are_refused(tmp_path, stem, array, code, message):
    write_mnist(tmp_path)
    write_idx(tmp_path / f"{stem}.gz", array, code)
    with pytest.raises(CapasError, match=message):
        load_dataset("mnist", tmp_path)


def test_files_placed_in_the_cache_as_the_message_says_are_read(tmp_path, monkeypatch):
    # offline, the error says to place the files (each optionally .gz) in the cache folder: plain ones too
    source = dataclasses.replace(idx.SOURCES["mnist"], url=(tmp_path / "nowhere").as_uri() + "/")
    monkeypatch.setitem(idx.SOURCES, "mnist", source)
    with pytest.raises(CapasError, match=f"optionally .gz\\) in {tmp_path / 'cache' / 'mnist'}"):
        load_dataset("mnist")
    write_mnist(tmp_path / "cache" / "mnist", n_train=6, gz=False)
    train, test = load_dataset("mnist")
    assert (len(train), len(test)) == (6, 10)
