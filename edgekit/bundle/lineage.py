"""Where a bundle came from: the git commit of the working directory, if it is a repository, and the
sha256 of the data files it was built, trained and gated on."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any


def git_state(directory: str | Path = ".") -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def data_sha256(path: str | Path) -> str:
    """The sha256 a data file is known by in lineage: of its bytes, or for a folder of images, WAVs or
    ``.npy`` files, of each file's name and bytes in sorted order (``tensor_data``'s digest, so a folder
    given to ``--trained-on`` and to ``--data`` has one hash)."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from edgekit.errors import DataError

    if not path.is_dir():
        raise DataError("no such file or folder", "check the path", path=path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
