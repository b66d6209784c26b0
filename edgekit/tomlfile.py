"""Every TOML file edgekit writes (agent.toml, alerts.toml, preprocessing tables) is a dict dumped here.

Values are paths, broker URLs with passwords and labels a user typed: a quote, a backslash, a newline or
non-ASCII text in one must neither break the file nor change what it says, so nothing builds TOML text by
hand. ``tomli_w`` (by tomli's author, the writer twin of the reader the agent uses) escapes every string;
this module adds what a writer here needs on top: a comment heading the file, ``None`` meaning "leave the
key out" (TOML has no null), and an atomic UTF-8 write.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgekit.errors import MissingDependencyError
from edgekit.fsutil import write_bytes_atomic


def dumps(doc: Mapping[str, Any], *, comment: str = "") -> str:
    """``doc`` as TOML text: keys in their order, tables after the top-level keys (TOML's rule), keys whose
    value is None left out at every level, and ``comment`` (any number of lines) as ``#`` lines on top."""
    try:
        import tomli_w
    except ImportError:
        raise MissingDependencyError("tomli-w", "host") from None
    heading = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    return heading + tomli_w.dumps(_without_none(doc))


def write(path: str | Path, doc: Mapping[str, Any], *, comment: str = "", mode: int | None = None) -> Path:
    """Write ``doc`` to ``path`` as UTF-8 TOML, atomically (a reader never sees half a file); return the path."""
    write_bytes_atomic(path, dumps(doc, comment=comment).encode("utf-8"), mode=mode)
    return Path(path)


def _without_none(table: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _without_none(value) if isinstance(value, Mapping) else value
        for key, value in table.items()
        if value is not None
    }
