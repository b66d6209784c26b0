"""Keeping LiteRT's start-up banner off the host CLI's stderr.

The first interpreter of a process makes LiteRT's C++ logger write ``INFO: Created TensorFlow Lite
XNNPACK delegate for CPU.`` straight to file descriptor 2. That logger (TFLite's minimal logger)
honours no environment variable: ``TF_CPP_MIN_LOG_LEVEL`` governs TensorFlow's other logger, and
setting it changes nothing (checked with ai-edge-litert 2.3); its severity setter is not exported.
So while an interpreter is made, fd 2 goes to a temporary file, and everything written there but
that one line is written back. Host side only: a device's log may keep the line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

BANNER = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@contextmanager
def without_banner() -> Iterator[None]:
    """Run the block with fd 2 captured; write back what it printed, less LiteRT's banner."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (a detached process), or stderr closed: nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            _restore(saved)
            captured.seek(0)
            _write_back(captured.read())


def _restore(saved: int) -> None:
    try:
        sys.stderr.flush()  # Python's own writes during the block belong in the capture, in order
    except (OSError, ValueError):
        pass
    os.dup2(saved, 2)
    os.close(saved)


def _write_back(output: bytes) -> None:
    kept = b"".join(line for line in output.splitlines(keepends=True) if line.strip() != BANNER)
    if kept:
        os.write(2, kept)
