"""Where datasets are looked for, and a checksummed, atomic download into the cache."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

from capas import atomic
from capas.errors import CapasError

CHUNK = 1 << 20  # bytes read per step while hashing or downloading


def cache_root() -> Path:
    """`$CAPAS_CACHE`, else `~/.cache/capas`: downloads and decoded image folders go here."""
    try:
        return Path(os.environ.get("CAPAS_CACHE") or "~/.cache/capas").expanduser()
    except RuntimeError:  # HOME unset and no passwd entry for the user (a container's --user)
        raise CapasError(
            "no home folder for capas' cache (HOME is not set and the user has none): "
            "set CAPAS_CACHE (or HOME) to a writable folder"
        ) from None


def search_dirs(name: str, data_dir: str | Path | None, *, shared_root: bool = True) -> list[Path]:
    """Folders to look for dataset `name` in, in order: `data_dir`, then `$CAPAS_DATA` (each as
    `<dir>/<name>/` and `<dir>/` itself), then the download cache.

    shared_root=False leaves out `$CAPAS_DATA` itself, for datasets whose files have another's names
    (MNIST's and Fashion-MNIST's): in a folder of datasets, only `<name>/` says which one they are."""
    if data_dir is not None and not (str(data_dir) and Path(data_dir).expanduser().is_dir()):
        # looked past, it would leave the run on other files than the ones the user named; '' is no
        # folder, though Path('') is the current one
        what = (
            "a file, not a folder"
            if str(data_dir) and Path(data_dir).expanduser().exists()
            else "no such folder"
        )
        raise CapasError(f"data_dir (--data-dir) {str(data_dir) or repr('')}: {what}")
    dirs = []
    for base, root in ((data_dir, True), (os.environ.get("CAPAS_DATA"), shared_root)):
        if base:
            base = Path(base).expanduser()
            dirs += [base / name, base] if root else [base / name]
    return [*dirs, cache_root() / name]


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes (`algorithm` as hashlib names it: "md5", "sha256")."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def download(url: str, dest: Path, *, digest: str, algorithm: str = "sha256", timeout_s: float = 60) -> Path:
    """Fetch `url` to `dest`, checking its `algorithm` digest; `dest` appears only once verified.

    The bytes go to a temporary file in a hidden folder beside `dest`, flushed and renamed over it
    (capas.atomic), so an interrupted or corrupt download never leaves a file that looks complete.
    """
    hasher = hashlib.new(algorithm)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CapasError(f"cannot write to {dest.parent}: {err}") from err

    def fetch(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            while chunk := response.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != digest.lower():
            raise CapasError(
                f"checksum mismatch for {url}: {algorithm} is {hasher.hexdigest()}, expected {digest}; "
                "the download is corrupt or the file changed upstream, nothing was kept"
            )

    try:
        atomic.write_with(dest, fetch)
    # urllib's URLError is an OSError too; a connection cut inside a chunked response is an
    # http.client.IncompleteRead, which is not
    except (OSError, http.client.HTTPException) as err:
        raise CapasError(f"could not download {url}: {err}") from err
    return dest
