"""Summaries on disk until the broker acknowledges them, so a crash or an outage loses none.

``pending/<seq>.json`` is written (atomically) before a summary is published and moves to
``acked/`` on PUBACK; acknowledged summaries are kept for ``keep_seconds`` after their PUBACK so the
collector can ask for a resend: a PUBACK only says the broker has it, and a broker can still hand it
to a collector that dies, whose session it keeps until that expires (``session_expiry_seconds``,
120 s by default). So ``keep_seconds`` (agent.toml's ``[monitor] keep_acked_seconds``, an hour) must
outlast the collectors' session expiry plus a few of their gap retries (30 s each by default).

``seq`` numbers never skip and are never reused: the next one is one past both the counter file and
every summary on disk, and the counter moves only after the summary is written. A crash between the
two leaves the summary (the next number goes past it); a crash before the write leaves nothing
published under that number, which the next window then takes.

That holds while the state dir survives; a reflashed Pi, a new SD card or a wiped ``/var`` starts a fresh
spool, and a fresh spool numbering from 1 again would reuse the seqs its collector already stored under
``(device, seq)``: its windows taken for redeliveries until it passed its old numbering. So a fresh spool (no
counter, no summary, no ``base`` file) begins its numbering at the clock in milliseconds when its first window
closes (``base``, kept in the ``base`` file): an install that follows another one numbers above it, however
many windows either made (one a millisecond would be needed to catch up), and the summaries say where this
install's numbering began (``seq_base``), so the collector takes the jump for a new install, not for lost
windows. A spool that has numbered already (an agent upgraded in place) keeps its numbering, from 1, and
announces no base. The clock is read when the first window closes, not when the agent starts, so a Pi without
a real-time clock has had its first minute to set it by NTP.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .fsutil import write_atomic


class Spool:
    def __init__(
        self, directory: str | Path, *, keep_seconds: float = 3600.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.root = Path(directory)
        self.keep_seconds = keep_seconds
        self._clock = clock  # what a fresh spool's numbering begins at (in ms)
        self._pending_dir, self._acked_dir = self.root / "pending", self.root / "acked"
        self._pending_dir.mkdir(parents=True, exist_ok=True)
        self._acked_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def next_seq(self) -> int:
        """The number the next summary gets (nothing is reserved until ``put``); a fresh spool's first one
        is its ``base``, chosen (and kept) now."""
        with self._lock:
            last = self._last_seq()
            base = self._base()
            if base is None and last == 0:
                base = max(1, int(self._clock() * 1000))
                write_atomic(self.root / "base", str(base).encode())
            return max(last, (base or 1) - 1) + 1

    def seq_base(self) -> int | None:
        """Where this install's numbering began (the summaries' ``seq_base``), or None for a spool that numbered
        from 1 before bases existed (it announces none: the collector then treats its seqs as it always did)."""
        with self._lock:
            return self._base()

    def last_seq(self) -> int:
        """The newest summary's seq (0 before the first): what the device announces in its ``state``."""
        with self._lock:
            return self._last_seq()

    def _last_seq(self) -> int:
        try:
            last = int((self.root / "seq").read_text())
        except (FileNotFoundError, ValueError):
            last = 0
        return max(last, max(self._all_seqs(), default=0))

    def _base(self) -> int | None:
        try:
            base = int((self.root / "base").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return base if base >= 1 else None

    def put(self, seq: int, payload: bytes) -> None:
        with self._lock:
            write_atomic(self._pending_dir / _name(seq), payload)
            write_atomic(self.root / "seq", str(seq).encode())

    def pending(self) -> list[int]:
        return sorted(_seq(p) for p in self._pending_dir.glob("*.json"))

    def depth(self) -> int:
        return sum(1 for _ in self._pending_dir.glob("*.json"))

    def ack(self, seq: int) -> None:
        source, target = self._pending_dir / _name(seq), self._acked_dir / _name(seq)
        try:
            os.replace(source, target)
            # Kept from now, not from when it was written: a window spooled through a long outage would
            # otherwise be pruned the moment it is acknowledged, before any collector could ask for it.
            os.utime(target)
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
