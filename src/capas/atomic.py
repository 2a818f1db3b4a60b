"""Atomic, durable writes: a temporary file in a hidden folder beside the target, flushed to disk, then a
rename, so a crash or a power loss leaves either the old file or the new one, never half a file or an
empty one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capas.errors import CapasError
from capas.lock import free, holding

# what a destination that cannot take the file says: the user's to fix (free space, another folder)
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def umask() -> int:
    """The process' umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sync_folder(path: str | Path) -> None:
    """Flush a folder's entries to disk, so that a rename or a new file in it survives a power loss."""
    _fsync(Path(path), directory=True)


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # Windows cannot open a folder; its renames need no folder flush
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hidden_prefix(name: str) -> str:
    """'.NAME.', the start of a temporary folder's name beside NAME: cut to 200 bytes, so that mkdtemp's
    random part and a suffix still fit in the 255 bytes a file name may take."""
    while len(os.fsencode(name)) > 200:
        name = name[:-1]
    return f".{name}."


def write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)`, flush the file to disk, rename it onto `path`, then flush the folder.

    Without the first flush a power loss after the rename can leave an empty file under the new name;
    without the second, the rename itself may be lost. The file gets the permissions `open()` would
    give it (0666 less the umask), whatever the writer or mkdtemp's 0700 made.

    `tmp_path` has `path`'s name, in a hidden folder beside it (.NAME.XXXXXXXX.tmp) that this call holds
    (`capas.lock.holding`) and that also takes the temporaries the writer makes beside it (safetensors'
    own .tmpXXXXXX). What a killed write left (kill -9, a power loss, the OOM killer) is deleted by the
    next write of `path`: `_clear`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear(path)
    folder = Path(tempfile.mkdtemp(prefix=hidden_prefix(path.name), suffix=".tmp", dir=path.parent))
    tmp = folder / path.name
    with holding(folder):
        try:
            writer(tmp)
            # after the writer: some (safetensors) replace the file rather than write into it
            os.chmod(tmp, 0o666 & ~umask())
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException as error:
            shutil.rmtree(folder, ignore_errors=True)
            if (code := _errno(error)) in FULL:
                raise CapasError(f"{path}: cannot write it ({os.strerror(code)})") from None
            raise
        sync_folder(path.parent)
        shutil.rmtree(folder, ignore_errors=True)
    return path


def abandoned(path: Path, pattern: str) -> list[Path]:
    """The hidden folders beside `path` named `hidden_prefix` + `pattern` (mkdtemp's 8 random characters
    in it) that no live process holds (`capas.lock.free`): what a killed write or staging of `path`
    left. None where the name is cut short (`hidden_prefix`: other files' share it) or the folder
    cannot be listed."""
    prefix = hidden_prefix(path.name)
    if prefix != f".{path.name}.":
        return []
    try:
        entries = sorted(path.parent.iterdir())
    except OSError:  # no such folder, or one this user can write in but not list
        return []
    name = re.compile(re.escape(prefix) + pattern)
    return [
        entry
        for entry in entries
        if name.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink() and free(entry)
    ]


def _clear(path: Path) -> None:
    """Delete the hidden folders (`write_with`) that writes of `path` killed before they finished left."""
    for entry in abandoned(path, r"[a-z0-9_]{8}\.tmp"):
        shutil.rmtree(entry, ignore_errors=True)


def write_cache(path: str | Path, writer: Callable[[Path], None], what: str) -> bool:
    """`write_with` for a cache, which only saves time: a folder that cannot be written or a full disk
    is a warning naming `what`, not an error. Returns whether the file was written."""
    try:
        write_with(path, writer)
    except (OSError, CapasError) as error:  # CapasError: write_with's full disk
        warnings.warn(f"could not cache {what} at {path}: {error}", stacklevel=4)  # the cache's user
        return False
    return True


def _errno(error: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors' Rust I/O errors quote: "(os
    error 28)" in recent releases, "Os { code: 28, … }" in 0.4."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(error))
    return int(found[1] or found[2]) if found else None


def check_file_target(path: Path, what: str, example: str) -> None:
    """Refuse, before any work is done, a `path` that write_with cannot put a file at: a directory, or a
    path under something that is not a writable folder. `what` names the path for the user (an option
    such as --out); `example` is a file name to suggest inside a directory."""
    if path.is_dir():
        raise CapasError(f"{what} {path}: is a directory; give a file path (e.g. {path / example})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest folder that exists: write_with makes the ones below it
    if not folder.is_dir():
        raise CapasError(f"{what} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK):
        raise CapasError(f"{what} {path}: cannot write in {folder} (permission denied)")


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")
