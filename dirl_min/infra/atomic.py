"""Atomic writes of files and folders: built next to the destination, then renamed into place.

A reader (or a resumed run) sees the old version or the new one, never a half-written one:
a failure before the final rename leaves the destination untouched and removes the temporary;
a crash (power loss, SIGKILL) can leave a hidden ``.NAME.tmp-*`` sibling, which
:func:`is_temporary` recognises so that scans of a folder skip it, and :func:`remove_temporaries`
removes once the folder's lock (:func:`folder_lock`, one job per output folder) is held.
Standard library only, so every layer (model, loops, evaluation) can use it without importing torch.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dirl_min.infra.errors import DirlError

__all__ = ["atomic_dir", "atomic_write", "is_temporary", "remove_temporaries", "folder_lock", "FolderBusy", "LOCK_FILE"]

#: the lock file of an output folder (:func:`folder_lock`); it stays, only its lock comes and goes
LOCK_FILE = ".dirl_min.lock"


class FolderBusy(DirlError, RuntimeError):
    """Another job holds the output folder's lock; the message names its pid and host."""


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def is_temporary(path) -> bool:
    """Whether ``path`` is a temporary of :func:`atomic_dir` / :func:`atomic_write` (never a result)."""
    name = Path(path).name
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` by renames.

    An existing ``path`` is renamed aside first and deleted only after the new folder is in
    place (so there is always a complete version on disk). Any exception inside the block, or
    in the renames, removes the temporary and leaves ``path`` as it was.

    Raises:
        ValueError: ``path`` exists and is not a folder.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if path.exists():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path, data: str | bytes, *, encoding: str = "utf-8") -> None:
    """Write ``data`` (text or bytes) to the file ``path`` atomically.

    The data goes to a uniquely named temporary next to ``path``, is flushed to disk (fsync:
    a rename can otherwise reach the disk before the data does), and replaces ``path`` in one
    rename. A failure removes the temporary and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode(encoding) if isinstance(data, str) else data
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, 0o644)  # mkstemp makes 0600; the file is a result, readable as write_text's are
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def remove_temporaries(folder, *, recursive_into: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporaries (:func:`is_temporary`) that killed writes left in ``folder`` and in its
    subfolders named in ``recursive_into`` (e.g. ``checkpoints``); returns what was removed. Call it only
    while holding :func:`folder_lock`: then no live writer owns them."""
    folder = Path(folder)
    removed = []
    for where in [folder, *(folder / name for name in recursive_into)]:
        for p in sorted(where.iterdir()) if where.is_dir() else []:
            if is_temporary(p) or (where != folder and p.name.endswith(".tmp")):  # "x.tmp": before this module
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextmanager
def folder_lock(folder, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock (``flock`` on :data:`LOCK_FILE`, created with the folder) for the block.

    One job per output folder: the kernel releases the lock when its holder exits in any way
    (``kill -9`` included), so a lock left by a dead job never blocks. The holder's pid, host and
    ``what`` are written in the file for the refusal's message. On a file system without ``flock``
    a warning says so and the block runs unlocked.

    Raises:
        FolderBusy: another live process holds the lock.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
            raise FolderBusy(f"{folder} is in use by another job: {holder}. Wait for it to end or stop it; "
                             f"two jobs writing one folder would mix their outputs") from None
        except OSError as e:
            print(f"warning: cannot lock {folder / LOCK_FILE} ({e.strerror}); nothing stops a second job "
                  "from writing this folder", file=sys.stderr)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} ({what}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
