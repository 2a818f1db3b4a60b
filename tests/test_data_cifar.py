"""CIFAR-10 from synthetic files in the official format: Python 2 pickles inside a tarball."""

import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from capas.data import load_dataset
from capas.errors import CapasError

CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
BATCHES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPAS_DATA", raising=False)


def py2_pickle(obj) -> bytes:
    """Protocol 2 as Python 2's cPickle wrote the CIFAR batches: str as BINSTRING, numpy arrays
    rebuilt through numpy.core.multiarray._reconstruct."""

    def emit(x) -> bytes:
        if isinstance(x, dict):
            return b"}(" + b"".join(emit(k) + emit(v) for k, v in x.items()) + b"u"
        if isinstance(x, list):
            return b"](" + b"".join(emit(v) for v in x) + b"e"
        if isinstance(x, bytes):
            return (b"U" + bytes([len(x)]) if len(x) < 256 else b"T" + struct.pack("<I", len(x))) + x
        if isinstance(x, int):
            return b"K" + bytes([x]) if 0 <= x < 256 else b"J" + struct.pack("<i", x)
        if isinstance(x, np.ndarray):
            dtype = b"cnumpy\ndtype\n" + emit(b"u1") + emit(0) + emit(1) + b"\x87R"
            dtype += b"(" + emit(3) + emit(b"|") + b"NNN" + emit(-1) + emit(-1) + emit(0) + b"tb"
            array = (
                b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + emit(0) + b"\x85" + emit(b"b")
            )
            array += b"\x87R(" + emit(1) + b"".join(emit(d) for d in x.shape) + b"\x86"  # shape: a 2-tuple
            return array + dtype + b"\x89" + emit(x.tobytes()) + b"tb"
        raise TypeError(type(x))

    return b"\x80\x02" + emit(obj) + b"."


def cifar_files(n: int = 4) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {
        "batches.meta": py2_pickle({b"label_names": CLASSES, b"num_cases_per_batch": n, b"num_vis": 3072})
    }
    for i, name in enumerate(BATCHES):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        files[name] = py2_pickle({b"batch_label": name.encode(), b"labels": labels, b"data": data})
    return files


def write_tarball(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(directory / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return directory / "cifar-10-python.tar.gz"


def test_the_stub_pickles_match_real_numpy_arrays():
    import pickle

    array = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    loaded = pickle.loads(py2_pickle({b"data": array}), encoding="bytes")
    np.testing.assert_array_equal(loaded[b"data"], array)


def test_load_from_tarball(tmp_path):
    files = cifar_files()
    write_tarball(tmp_path / "data" / "cifar10", files)
    train, test = load_dataset("cifar10", tmp_path / "data")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.classes == tuple(c.decode() for c in CLASSES)
    assert train.labels[:8].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    assert test.labels.tolist() == [5, 6, 7, 8]


def test_pixel_layout(tmp_path):
    batch_dir = tmp_path / "cifar-10-batches-py"
    batch_dir.mkdir()
    data = np.zeros((1, 3072), np.uint8)
    data[0, 1024 + 2 * 32 + 3] = 200  # green, row 2, column 3
    for name, raw in cifar_files(1).items():
        (batch_dir / name).write_bytes(raw)
    (batch_dir / "test_batch").write_bytes(py2_pickle({b"labels": [7], b"data": data}))
    _, test = load_dataset("cifar10", tmp_path)
    assert test.images[0, 1, 2, 3] == 200 and int(test.images.sum()) == 200
    assert test.labels.tolist() == [7]


def test_extracted_folder_via_capas_data(tmp_path, monkeypatch):
    batch_dir = tmp_path / "env" / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)
    for name, raw in cifar_files(2).items():
        (batch_dir / name).write_bytes(raw)
    monkeypatch.setenv("CAPAS_DATA", str(tmp_path / "env"))
    train, test = load_dataset("cifar10")
    assert (len(train), len(test)) == (10, 2)


def test_a_hostile_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    files = cifar_files()
    command = f"touch {marker}".encode()
    # os.system(command): GLOBAL posix.system, the command as BINUNICODE, TUPLE1, REDUCE
    files["data_batch_3"] = (
        b"\x80\x02cposix\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    )
    write_tarball(tmp_path, files)
    with pytest.raises(
        CapasError,  # named with its archive: CIFAR-10 is looked for in up to five places
        match=r"cifar-10-python.tar.gz:cifar-10-batches-py/data_batch_3 is not a valid batch: refusing global posix",
    ):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_a_truncated_batch_in_a_folder_is_named_with_its_folder(tmp_path):
    batch_dir = tmp_path / "cifar-10-batches-py"
    batch_dir.mkdir()
    for name, raw in cifar_files(2).items():
        (batch_dir / name).write_bytes(raw[: len(raw) // 2] if name == "data_batch_3" else raw)
    with pytest.raises(CapasError, match=rf"CIFAR-10 file {batch_dir}/data_batch_3 is not a valid batch"):
        load_dataset("cifar10", tmp_path)


def test_damaged_archive_and_missing_member(tmp_path):
    files = cifar_files()
    del files["test_batch"]
    write_tarball(tmp_path / "a", files)
    with pytest.raises(CapasError, match="lacks cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", tmp_path / "a")
    archive = write_tarball(tmp_path / "b", cifar_files())
    archive.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(CapasError, match="cannot read CIFAR-10 archive"):
        load_dataset("cifar10", tmp_path / "b")


def test_missing_cifar_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("capas.data.cifar.URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(CapasError, match=r"dataset 'cifar10' not found; looked in .*could not download"):
        load_dataset("cifar10", tmp_path)
