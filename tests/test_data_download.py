"""The checksummed, atomic download, exercised on local files through file:// URLs."""

import hashlib
import pwd
import socket
import threading

import pytest

from capas.data.download import cache_root, download, file_digest, search_dirs
from capas.errors import CapasError


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "served" / "blob.bin"
    path.parent.mkdir()
    path.write_bytes(b"capas" * 100_000)  # several download chunks' worth
    return path


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_download_verifies_and_writes(tmp_path, source, algorithm):
    digest = hashlib.new(algorithm, source.read_bytes()).hexdigest()
    dest = download(source.as_uri(), tmp_path / "cache" / "blob.bin", digest=digest, algorithm=algorithm)
    assert dest.read_bytes() == source.read_bytes()
    assert file_digest(dest, algorithm) == digest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]  # no temporary file left


def test_wrong_checksum_keeps_nothing(tmp_path, source):
    dest = tmp_path / "cache" / "blob.bin"
    with pytest.raises(CapasError, match="checksum mismatch"):
        download(source.as_uri(), dest, digest="0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_wrong_checksum_leaves_an_existing_file_alone(tmp_path, source):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"old")
    with pytest.raises(CapasError):
        download(source.as_uri(), dest, digest="0" * 64)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "served"]


def test_unreachable_url(tmp_path):
    dest = tmp_path / "cache" / "blob.bin"
    with pytest.raises(CapasError, match="could not download"):
        download((tmp_path / "missing.bin").as_uri(), dest, digest="0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_a_connection_cut_mid_chunk_is_one_error(tmp_path):
    # a server sending chunked transfer encoding that hangs up mid-chunk: http.client raises
    # IncompleteRead, which is no OSError
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n10\r\n0123"
            )

    thread = threading.Thread(target=serve)
    thread.start()
    dest = tmp_path / "cache" / "blob.bin"
    url = f"http://127.0.0.1:{server.getsockname()[1]}/blob.bin"
    with server, pytest.raises(CapasError, match=f"could not download {url}.*IncompleteRead"):
        download(url, dest, digest="0" * 64, timeout_s=5)
    thread.join()
    assert list(dest.parent.iterdir()) == []


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPAS_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "arg").mkdir()
    assert search_dirs("cifar10", tmp_path / "arg") == [
        tmp_path / "arg" / "cifar10",
        tmp_path / "arg",
        tmp_path / "env" / "cifar10",
        tmp_path / "env",
        tmp_path / "cache" / "cifar10",
    ]
    assert search_dirs("mnist", tmp_path / "arg", shared_root=False) == [
        tmp_path / "arg" / "mnist",
        tmp_path / "arg",
        tmp_path / "env" / "mnist",
        tmp_path / "cache" / "mnist",
    ]


def test_a_user_without_a_home_is_told_to_set_capas_cache(monkeypatch):
    """HOME unset and a user id without a passwd entry (`docker run --user 4242`): pathlib's
    RuntimeError("Could not determine home directory.") was a traceback of every command with data."""

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("CAPAS_CACHE", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(CapasError, match=r"no home folder for capas' cache .*set CAPAS_CACHE"):
        cache_root()
