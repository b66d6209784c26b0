"""Writing output files so that a failure never leaves a partial file behind.

Every output goes to a temporary file beside the target and is renamed over it on success; a target
that exists and is not a regular file (``-o /dev/null``) is written in place instead of replaced.
OS errors (a missing or read-only directory) become one ``OutputError`` line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from device_agent.fsutil import default_mode, is_special, write_atomic
from edgekit.errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``, else delete it."""
    path = Path(path)
    try:
        if not is_special(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=tempfile.gettempdir() if is_special(path) else path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise OutputError(
            f"cannot write here ({exc.strerror})", "choose a path in a directory you can write to", path=path
        ) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if is_special(path):
            with open(tmp_path, "rb") as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target)
        else:
            os.chmod(tmp_path, default_mode() if mode is None else mode)
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise OutputError(
            f"cannot write here ({exc.strerror})", "choose a path in a directory you can write to", path=path
        ) from exc
