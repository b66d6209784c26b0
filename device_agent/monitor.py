"""Windows of traffic, sketched off the request path, closed by row count or by time.

The request path only appends references to its arrays (``record``); a background thread
(``Monitor.run`` via the agent, or ``process`` in tests) folds them into the window profile in
vectorized batches: one ``searchsorted`` per feature per batch instead of per row, which is what
keeps monitoring cheap next to a microsecond-scale model. A window closes after ``window_rows`` rows
(split exactly at the boundary) or ``window_seconds`` seconds, and is handed to ``on_window``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np

from .outputs import Prediction
from .profile import Profile


@dataclass
class ClosedWindow:
    profile: Profile
    start: float
    end: float
    latencies_ms: np.ndarray
    errors: dict[str, int]
    labelled: int = 0
    correct: int = 0

    @property
    def rows(self) -> int:
        return self.profile.rows


@dataclass
class _Batch:
    rows: np.ndarray
    prediction: Prediction
    latency_ms: Any  # per row: a float for one request, an array once requests are concatenated


def _concatenate(batches: list[_Batch]) -> _Batch:
    """Many requests as one batch, so the sketches are updated once per feature, not once per request."""
    if len(batches) == 1:
        b = batches[0]
        return _Batch(b.rows, b.prediction, np.full(len(b.rows), b.latency_ms))

    def join(attribute: str) -> np.ndarray | None:
        parts = [getattr(b.prediction, attribute) for b in batches]
        return None if parts[0] is None else np.concatenate(parts)

    prediction = Prediction(labels=join("labels"), probabilities=join("probabilities"), values=join("values"))
    latencies = np.repeat([b.latency_ms for b in batches], [len(b.rows) for b in batches])
    return _Batch(np.concatenate([b.rows for b in batches]), prediction, latencies)


@dataclass
class Monitor:
    baseline: Profile
    window_rows: int
    window_seconds: float
    on_window: Callable[[ClosedWindow], None]
    clock: Callable[[], float] = time.time
    _pending: deque = field(default_factory=deque)  # deque.append/popleft are atomic: no lock on the request path
    _errors: Counter = field(default_factory=Counter)
    _feedback: list[bool] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _process_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._start_window(self.clock())

    def _start_window(self, now: float) -> None:
        self._window = self.baseline.empty_like()
        self._window_start = now
        self._latencies: list[np.ndarray] = []
        self._window_errors: Counter = Counter()
        self._labelled = self._correct = 0

    # -- the request path: O(1), no numpy work ---------------------------------------------------
    def record(self, rows: np.ndarray, prediction: Prediction, latency_ms: float) -> None:
        self._pending.append(_Batch(rows, prediction, latency_ms))

    def record_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    def record_feedback(self, correct: bool) -> None:
        with self._lock:
            self._feedback.append(correct)

    # -- the background path ---------------------------------------------------------------------
    def process(self, now: float | None = None) -> int:
        """Fold pending batches into windows; close windows that are full or old. Returns windows closed."""
        with self._process_lock:
            pending = []
            while self._pending:
                pending.append(self._pending.popleft())
            with self._lock:
                errors, self._errors = self._errors, Counter()
                feedback, self._feedback = self._feedback, []
            self._window_errors.update(errors)
            self._labelled += len(feedback)
            self._correct += sum(feedback)
            closed = self._absorb(_concatenate(pending)) if pending else 0
            now = self.clock() if now is None else now
            if now - self._window_start >= self.window_seconds:
                if self._window.rows:
                    self._close(now)
                    closed += 1
                else:
                    self._window_start = now
            return closed

    def _absorb(self, batch: _Batch) -> int:
        closed, offset, total = 0, 0, len(batch.rows)
        while offset < total:
            room = self.window_rows - self._window.rows
            take = min(room, total - offset)
            part = slice(offset, offset + take)
            self._window.update_inputs(batch.rows[part])
            p = batch.prediction
            self._window.update_outputs(
                labels=None if p.labels is None else p.labels[part],
                probabilities=None if p.probabilities is None else p.probabilities[part],
                values=None if p.values is None else p.values[part],
            )
            latencies = batch.latency_ms[part]
            self._window.update_latency(latencies)
            self._latencies.append(latencies)
            offset += take
            if self._window.rows >= self.window_rows:
                self._close(self.clock())
                closed += 1
        return closed

    def _close(self, now: float) -> None:
        latencies = np.concatenate(self._latencies) if self._latencies else np.empty(0)
        window = ClosedWindow(self._window, self._window_start, now, latencies, dict(self._window_errors), self._labelled, self._correct)
        self._start_window(now)
        self.on_window(window)

    def flush(self, now: float | None = None) -> ClosedWindow | None:
        """Process everything and close the current window if it has rows (used on shutdown)."""
        self.process(now)
        with self._process_lock:
            if self._window.rows:
                captured: list[ClosedWindow] = []
                original, self.on_window = self.on_window, captured.append
                try:
                    self._close(self.clock() if now is None else now)
                finally:
                    self.on_window = original
                original(captured[0])
                return captured[0]
        return None

    def current(self) -> dict[str, Any]:
        return {"rows": self._window.rows, "started": self._window_start}
