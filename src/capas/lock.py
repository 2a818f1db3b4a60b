"""Exclusive locks on study and run directories: one writer at a time, and a clear message for the second.

The lock is an `fcntl.flock` on DIR/.capas.lock, held for the owner's lifetime. Commands that only
read a run directory, or add a file to it (export, compress), hold it shared: together with each
other, never with a training into the folder. The kernel releases it
when the process ends however it ends (SIGKILL, a crash), so a stale lock never blocks a rerun; the
file itself stays and only says who held it last. The holder writes its pid, host, command and start
time into the file, which the refused process quotes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from capas.errors import CapasError

LOCK = ".capas.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; directories are not locked there
    fcntl = None


def _holder(file: Path) -> str:
    try:
        info = json.loads(file.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} since {since}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
        return "another process"


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str, shared: bool = False) -> Iterator[None]:
    """Hold DIR/.capas.lock for the body; a CapasError naming the holder if another process has it.

    `what` names the directory in the message ("study directory", "run directory"). Folders this call
    made that hold nothing but the lock at the end (the command was refused before writing anything)
    are removed: a refused command leaves nothing behind. `shared`: other shared holders may hold it
    at the same time, an exclusive one may not; in a folder this user cannot write in (another user's
    run, a read-only disk) it holds nothing: the command reads the folder as it is.
    """
    directory = Path(directory)
    made = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CapasError(f"{directory}: a file, not a folder; the {what} must be a folder") from None
    except OSError as error:  # under a file, read-only, /proc…
        raise CapasError(f"{directory}: cannot create the {what} ({error.strerror or error})") from None
    if fcntl is None:
        yield
        return
    file = directory / LOCK
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        if not shared or error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            made = []  # the holder's folder, not this call's
            raise CapasError(
                f"{directory}: this {what} is in use by {_holder(file)}; wait for it to finish or stop it "
                "(its finished work is kept), then rerun"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": platform.node(),
            "command": " ".join(sys.argv),
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        if made and directory.is_dir() and [entry.name for entry in directory.iterdir()] == [LOCK]:
            file.unlink()
            for folder in made:  # innermost first; stops at one that holds something
                try:
                    folder.rmdir()
                except OSError:
                    break
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def holding(folder: Path) -> Iterator[None]:
    """A shared flock on `folder` itself (not a file in it) for the body: `staging` holds the hidden
    folder it writes a run in, so that `free` tells it from one that a killed command left."""
    fd = None if fcntl is None else os.open(folder, os.O_RDONLY)
    try:
        if fd is not None:
            with contextlib.suppress(OSError):  # a file system that cannot lock folders: `free` says no
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def free(folder: Path) -> bool:
    """Whether no process holds `folder` (`holding`); False where that cannot be told (Windows, a file
    system that cannot lock folders)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held
        return False
    finally:
        os.close(fd)
    return True
