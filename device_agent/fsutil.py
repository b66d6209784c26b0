"""Atomic file writes: a crash leaves the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_mode() -> int:
    """What ``open()`` would give a new file under the current umask (mkstemp always gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_special(path: Path) -> bool:
    """An existing non-regular target (/dev/null, a FIFO): written in place, never replaced."""
    return path.exists() and not path.is_file() and not path.is_dir()


def write_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    path = Path(path)
    if is_special(path):
        with open(path, "wb") as handle:
            handle.write(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
