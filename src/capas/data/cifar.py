"""CIFAR-10 from the official python release, read without running any of the pickle's code."""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capas.data.dataset import ArrayDataset
from capas.data.download import cache_root, download, search_dirs
from capas.errors import CapasError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE, FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH, META = "test_batch", "batches.meta"


class _ArrayStub:
    """Stands in for numpy.ndarray while unpickling: keeps the pickled state, runs nothing."""

    state: tuple = ()

    def __setstate__(self, state: object) -> None:
        self.state = state if isinstance(state, tuple) else ()


class _DtypeStub:
    """Stands in for numpy.dtype while unpickling: keeps the type code (b"u1")."""

    def __init__(self, code: bytes, align: int = 0, copy: int = 1) -> None:
        self.code = code

    def __setstate__(self, state: object) -> None:
        """Ignored: byte order and alignment don't matter for one-byte values."""


def _reconstruct(cls: type, shape: tuple, typecode: bytes) -> _ArrayStub:
    return _ArrayStub()


# The only globals a CIFAR batch names (numpy's array rebuilding), each mapped to an inert stub.
_STUBS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayStub,
    ("numpy", "dtype"): _DtypeStub,
}


class _BatchUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes and ints; any global other than numpy's array stubs is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _STUBS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return _STUBS[module, name]


def load_cifar10(data_dir: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of CIFAR-10, from an extracted `cifar-10-batches-py/` or the official tarball."""
    looked = search_dirs("cifar10", data_dir)
    found = next((found for d in looked if (found := _read_files(d))), None)
    if found is None:
        target = cache_root() / "cifar10"
        try:
            download(URL, target / ARCHIVE, digest=MD5, algorithm="md5")
        except CapasError as err:
            raise CapasError(
                f"dataset 'cifar10' not found; looked in {', '.join(map(str, looked))} for {FOLDER}/ or "
                f"{ARCHIVE}, then tried to download it: {err}. To get it, download {URL} (md5 {MD5}) "
                f"into {target}, or into a folder given as data_dir or $CAPAS_DATA"
            ) from err
        found = _read_files(target)
        assert found is not None  # the archive is there now: _read_files returns it or raises
    source, files = found  # messages name the file with its folder or archive: there are several places
    names = _unpickle(files[META], f"{source}/{META}").get(b"label_names")
    if not isinstance(names, list) or not all(isinstance(name, bytes) for name in names):
        raise CapasError(f"CIFAR-10 file {source}/{META} lacks the b'label_names' list")
    classes = tuple(name.decode() for name in names)
    train = [_batch(files[name], f"{source}/{name}", len(classes)) for name in TRAIN_BATCHES]
    test = _batch(files[TEST_BATCH], f"{source}/{TEST_BATCH}", len(classes))
    return _stack(train, classes), _stack([test], classes)


def _read_files(directory: Path) -> tuple[str, dict[str, bytes]] | None:
    """Where the batch files are (a folder, or a tarball's folder) and their bytes, from `directory`'s
    extracted batches or tarball; None if it has neither."""
    names = (*TRAIN_BATCHES, TEST_BATCH, META)
    for folder in (directory / FOLDER, directory):
        if (folder / META).is_file():
            try:
                return str(folder), {name: (folder / name).read_bytes() for name in names}
            except OSError as err:
                raise CapasError(f"incomplete CIFAR-10 folder {folder}: {err}") from err
    if not (directory / ARCHIVE).is_file():
        return None
    try:
        with tarfile.open(directory / ARCHIVE, "r:gz") as tar:
            # Members are read into memory, never extracted: no path in the archive touches the disk.
            files = {
                Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar
                if m.isfile() and Path(m.name).parent.name == FOLDER and Path(m.name).name in names
            }
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise CapasError(f"cannot read CIFAR-10 archive {directory / ARCHIVE}: {err}") from err
    if missing := sorted(set(names) - set(files)):
        raise CapasError(f"CIFAR-10 archive {directory / ARCHIVE} lacks {FOLDER}/{', '.join(missing)}")
    return f"{directory / ARCHIVE}:{FOLDER}", files


def _unpickle(raw: bytes, name: str) -> dict:
    try:
        # encoding="bytes": the batches were pickled by Python 2, whose str holds raw bytes
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a damaged or hostile pickle can fail in many ways; all mean "not a batch"
        raise CapasError(f"CIFAR-10 file {name} is not a valid batch: {err}") from err
    if not isinstance(obj, dict):
        raise CapasError(f"CIFAR-10 file {name} is not a valid batch: holds {type(obj).__name__}, not dict")
    return obj


def _batch(raw: bytes, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) of one batch file."""
    batch = _unpickle(raw, name)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if (
        not isinstance(data, _ArrayStub)
        or len(data.state) != 5
        or not isinstance(labels, list)
        or not all(type(label) is int for label in labels)
    ):
        raise CapasError(f"CIFAR-10 file {name} lacks the b'data' array or the b'labels' list")
    _, shape, dtype, fortran_order, pixels = data.state  # ndarray's pickled state
    n = len(labels)
    if (
        getattr(dtype, "code", None) != b"u1"
        or fortran_order
        or shape != (n, 3 * 32 * 32)
        or not isinstance(pixels, bytes)
        or len(pixels) != n * 3 * 32 * 32
    ):
        raise CapasError(f"CIFAR-10 file {name}: b'data' is not a {n}x3072 uint8 array")
    labels_array = np.array(labels, dtype=np.int64)
    if n and not 0 <= labels_array.min() <= labels_array.max() < num_classes:
        raise CapasError(f"CIFAR-10 file {name}: labels must lie in 0..{num_classes - 1}")
    # each row holds the red plane, then green, then blue, each 32x32 row-major: already (C, H, W)
    return np.frombuffer(pixels, np.uint8).reshape(n, 3, 32, 32), labels_array


def _stack(batches: list[tuple[np.ndarray, np.ndarray]], classes: tuple[str, ...]) -> ArrayDataset:
    images = np.concatenate([images for images, _ in batches])  # a writable copy
    labels = np.concatenate([labels for _, labels in batches])
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)
