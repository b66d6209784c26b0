"""A bundle's file on this collector, written from the database's copy the first time it is asked for.

Any collector sharing a fleet database serves any uploaded bundle: the upload keeps the bytes in the
database (``store/bundle_blobs.py``), and the collector a device downloads from writes them to its own
bundle directory on the first request, checking them against the sha256 they are named by before the
file gets its final name, so a corrupted copy is never served and a half-written one never seen.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from device_agent.bundle import BUNDLE_SUFFIX
from edgekit.errors import RolloutError

_writing = threading.Lock()  # one materialization at a time in this process: the second finds the file


def bundle_path(bundle_dir: Path, sha256: str) -> Path:
    return Path(bundle_dir) / f"{sha256}{BUNDLE_SUFFIX}"


def bundle_file(store: Any, bundle_dir: Path, sha256: str) -> Path | None:
    """The local file of bundle ``sha256``, written from the database if this collector has none yet; None
    when no such bundle was uploaded."""
    record = store.bundle(sha256=sha256)
    if record is None:
        return None
    path = bundle_path(bundle_dir, sha256)
    if path.exists():
        return path
    with _writing:
        if path.exists():
            return path
        if _materialize(store, path, sha256):
            return path
    if Path(record["path"]).exists():  # uploaded here before its bytes were kept in the database
        return Path(record["path"])
    raise RolloutError(
        f"bundle {sha256[:12]}… is recorded but its bytes are not in the fleet database",
        "upload it again (edgekit rollout start does)",
    )


def _materialize(store: Any, path: Path, sha256: str) -> bool:
    """Write the stored chunks to ``path``; False when none are stored. Raises when they do not hash to
    ``sha256`` (the file is not written then)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in store.bundle_chunks(sha256):
                digest.update(chunk)
                handle.write(chunk)
                size += len(chunk)
        if size == 0:
            return False
        if digest.hexdigest() != sha256:
            raise RolloutError(
                f"the fleet database's copy of bundle {sha256[:12]}… does not match its sha256 "
                f"(it hashes to {digest.hexdigest()[:12]}…)",
                "upload the bundle again",
            )
        os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)
