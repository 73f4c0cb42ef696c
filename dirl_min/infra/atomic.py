"""Atomic writes of files and folders: built next to the destination, then renamed into place.

A reader (or a resumed run) sees the old version or the new one, never a half-written one:
a failure before the final rename leaves the destination untouched and removes the temporary;
a crash (power loss, SIGKILL) can leave a hidden ``.NAME.tmp-*`` sibling, which
:func:`is_temporary` recognises so that scans of a folder skip it. Standard library only,
so every layer (model, loops, evaluation) can use it without importing torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_dir", "atomic_write", "is_temporary"]


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
