"""MNIST and Fashion-MNIST: the IDX file format, where the files are looked for, and their download."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from capas.data.dataset import ArrayDataset
from capas.data.download import cache_root, download, search_dirs
from capas.errors import CapasError

# IDX type code (third byte of the magic number) -> big-endian numpy dtype
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
STEMS = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class IdxSource:
    """Where one IDX dataset comes from; `md5` holds the published digests of the `.gz` files."""

    name: str
    url: str
    md5: dict[str, str]
    classes: tuple[str, ...]
    system_dir: Path | None = None  # where a distribution package installs it
    install_hint: str = ""


SOURCES = {
    "fashion-mnist": IdxSource(
        name="fashion-mnist",
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        # from the zalandoresearch/fashion-mnist README (torchvision lists the same)
        md5={
            TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
            TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
            TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        system_dir=Path("/usr/share/datasets/fashion-mnist"),
        install_hint="install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or ",
    ),
    "mnist": IdxSource(
        name="mnist",
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror of LeCun's files
        md5={
            TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
            TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
            TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
        },
        classes=tuple(str(digit) for digit in range(10)),
    ),
}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed when its name ends in `.gz`).

    The header is read first and the data only as far as it declares, so that a wrong file, or a small
    .gz that inflates to gigabytes, is refused before its contents are inflated."""
    gz = path.suffix == ".gz"
    try:
        with gzip.open(path) if gz else path.open("rb") as stream:
            return _read_idx(path, stream, stored=path.stat().st_size, gz=gz)
    except (OSError, EOFError, zlib.error) as err:  # a truncated .gz raises EOFError
        raise CapasError(f"cannot read IDX file {path}: {err}") from err


def _read_idx(path: Path, stream: BinaryIO, stored: int, gz: bool) -> np.ndarray:
    # magic number: two zero bytes, the element type code, the number of dimensions
    magic = stream.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_DTYPES:
        raise CapasError(f"{path} is not an IDX file: bad magic number {magic.hex() or '(empty file)'}")
    header = 4 + 4 * magic[3]
    shape = stream.read(header - 4)
    if len(shape) < header - 4:
        raise CapasError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{magic[3]}I", shape)
    dtype = np.dtype(IDX_DTYPES[magic[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if not gz and stored != expected:
        problem = "truncated" if stored < expected else "longer than its header says"
        raise CapasError(f"IDX file {path} is {problem}: {stored} bytes, dims {dims} need {expected}")
    # deflate inflates a byte to 1032 at most: a .gz too small for its header's dims is refused unread
    if gz and expected > stored * 1032:
        raise CapasError(
            f"IDX file {path} is truncated: dims {dims} need {expected} bytes, "
            f"more than its {stored} compressed bytes can hold"
        )
    data = np.empty(expected - header, np.uint8)
    filled = 0
    while filled < data.size and (count := stream.readinto(memoryview(data)[filled:])):
        filled += count
    if filled < data.size:
        raise CapasError(
            f"IDX file {path} is truncated: {header + filled} bytes, dims {dims} need {expected}"
        )
    if stream.read(1):  # only this much more is inflated: a .gz bomb behind a valid header stops here
        raise CapasError(
            f"IDX file {path} is longer than its header says: more than {expected} bytes once inflated, "
            f"dims {dims} need {expected}"
        )
    return data.view(dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def load_idx(name: str, data_dir: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of an IDX dataset in `SOURCES`, found locally or downloaded into the cache."""
    source = SOURCES[name]
    dirs = search_dirs(name, data_dir, shared_root=False)  # MNIST's and Fashion-MNIST's files share names
    if source.system_dir is not None:
        dirs.insert(-1, source.system_dir)  # before the download cache
    # the download cache comes last and is _download's to complete
    files = next((found for d in dirs[:-1] if (found := _find(d))), None) or _download(source, dirs)
    train = _dataset(files[TRAIN_IMAGES], files[TRAIN_LABELS], source.classes)
    test = _dataset(files[TEST_IMAGES], files[TEST_LABELS], source.classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise CapasError(
            f"{files[TEST_IMAGES]}: test images are {tuple(test.images.shape[2:])} pixels, "
            f"the training images {tuple(train.images.shape[2:])}"
        )
    return train, test


def _find(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in `directory` (plain or .gz), None when it holds none of them.

    A folder with only some of them is an error: passed over, the run would train on another copy
    found later in the search order.
    """
    found = {
        stem: path
        for stem in STEMS
        if (path := next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None))
    }
    if found and len(found) < len(STEMS):
        missing = ", ".join(stem for stem in STEMS if stem not in found)
        raise CapasError(
            f"{directory} holds only some of the IDX files: {missing} missing (each optionally .gz)"
        )
    return found or None


def _download(source: IdxSource, looked: list[Path]) -> dict[str, Path]:
    """The four files in the cache folder, downloading each it lacks (plain or .gz: one placed there
    by hand, as the error below says to, is read as it is)."""
    target = cache_root() / source.name
    files: dict[str, Path] = {}
    try:
        for stem, md5 in source.md5.items():
            placed = (p for p in (target / stem, target / f"{stem}.gz") if p.is_file())
            files[stem] = next(placed, None) or download(
                f"{source.url}{stem}.gz", target / f"{stem}.gz", digest=md5, algorithm="md5"
            )
    except CapasError as err:
        raise CapasError(
            f"dataset {source.name!r} not found; looked in {', '.join(map(str, looked))}, "
            f"then tried to download it: {err}. To get it, {source.install_hint}place "
            f"{', '.join(STEMS)} (each optionally .gz) in {target}, in a folder given as data_dir, or "
            f"in {Path(os.environ.get('CAPAS_DATA') or '$CAPAS_DATA').expanduser() / source.name}"
        ) from err
    return files


def _dataset(images_path: Path, labels_path: Path, classes: tuple[str, ...]) -> ArrayDataset:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or 0 in images.shape[1:]:
        raise CapasError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.dtype.kind not in "iu":
        raise CapasError(f"{labels_path}: expected integer labels, got {labels.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise CapasError(f"{labels_path}: expected {len(images)} labels, got an array shaped {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(classes):
        raise CapasError(f"{labels_path}: labels must lie in 0..{len(classes) - 1}")
    return ArrayDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(), classes)
