"""Summaries on disk until the broker acknowledges them, so a crash or an outage loses none.

``pending/<seq>.json`` is written (atomically) before a summary is published and moves to
``acked/`` on PUBACK; acknowledged summaries are kept for ``keep_seconds`` so the collector can ask
for a resend. ``seq`` comes from a counter file updated before the summary is written, so numbers
are never reused after a restart.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .fsutil import write_atomic


class Spool:
    def __init__(self, directory: str | Path, *, keep_seconds: float = 3600.0) -> None:
        self.root = Path(directory)
        self.keep_seconds = keep_seconds
        self._pending_dir, self._acked_dir = self.root / "pending", self.root / "acked"
        self._pending_dir.mkdir(parents=True, exist_ok=True)
        self._acked_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def next_seq(self) -> int:
        with self._lock:
            counter = self.root / "seq"
            try:
                last = int(counter.read_text())
            except (FileNotFoundError, ValueError):
                last = max(self._all_seqs(), default=0)
            write_atomic(counter, str(last + 1).encode())
            return last + 1

    def put(self, seq: int, payload: bytes) -> None:
        write_atomic(self._pending_dir / _name(seq), payload)

    def pending(self) -> list[int]:
        return sorted(_seq(p) for p in self._pending_dir.glob("*.json"))

    def depth(self) -> int:
        return sum(1 for _ in self._pending_dir.glob("*.json"))

    def ack(self, seq: int) -> None:
        source = self._pending_dir / _name(seq)
        try:
            os.replace(source, self._acked_dir / _name(seq))
        except FileNotFoundError:
            pass  # acknowledged twice (a redelivery), or already pruned

    def get(self, seq: int) -> bytes | None:
        for directory in (self._pending_dir, self._acked_dir):
            try:
                return (directory / _name(seq)).read_bytes()
            except FileNotFoundError:
                continue
        return None

    def prune(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.keep_seconds
        removed = 0
        for path in self._acked_dir.glob("*.json"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def _all_seqs(self) -> list[int]:
        return [_seq(p) for d in (self._pending_dir, self._acked_dir) for p in d.glob("*.json")]


def _name(seq: int) -> str:
    return f"{seq:012d}.json"


def _seq(path: Path) -> int:
    return int(path.stem)
