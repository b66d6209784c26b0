"""Windows of traffic, sketched off the request path, closed by row count or by time.

The request path only appends references to its arrays (``record``); a background thread
(``Monitor.run`` via the agent, or ``process`` in tests) folds them into the window profile in
vectorized batches: the requests waiting are joined into one batch, binned with one lookup table and
one count over all features (``binning.NumericBlock``), which is what keeps monitoring cheap next
to a microsecond-scale model. What costs per sketch rather than per value (the Python bookkeeping of 64
sketches' moments, a categorical update) is left pending and settled once, when the window closes, and a
request's latency is kept once with its row count and sketched when the window closes. A window closes after
``window_rows`` rows (split exactly at the boundary) or ``window_seconds`` seconds, and is handed to ``on_window``.

Under the CPU budget (``budget.CpuBudget``) a request is recorded with its sample (which rows, by id), taken
on the background thread; requests queued before the budget looked are sampled again at its rate (when
that rate's step is a multiple of theirs: the sample stays one by row id). The
agent's passes gather: a pass costs some thirty numpy calls whatever it sketches (200-300 µs once the
model's inference has emptied the caches), so fewer than ``GATHER_ROWS`` waiting rows wait for more, for
at most ``GATHER_SECONDS`` and never past the window's time.

The backlog is bounded: at most ``backlog_rows`` rows wait to be sketched. Rows beyond it (and rows
still waiting when ``stop`` is called) are served but not sketched; they are counted, never dropped
silently: ``unmonitored_rows`` (this monitor's total) and each window's ``unmonitored``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from .budget import CpuBudget
from .drift import drift_report
from .outputs import Prediction
from .profile import Profile

log = logging.getLogger("device_agent.monitor")
SIGNAL_CHUNK = 64
GATHER_ROWS = 256  # a gathering pass (``process(gather=True)``) leaves fewer waiting rows than this for later ...
GATHER_SECONDS = 1.0  # ... for at most this long


@dataclass
class ClosedWindow:
    profile: Profile
    start: float
    end: float
    latencies_ms: np.ndarray
    errors: dict[str, int]
    labelled: int = 0
    correct: int = 0
    unmonitored: int = 0  # rows predicted in this window's time but not sketched (backlog full, or the agent stopping)
    drift: dict[str, Any] = field(default_factory=dict)  # the window against the baseline (drift.drift_report)
    sampled_out: int = 0  # rows served in this window's time and left out by the CPU budget's sample

    @property
    def sample_rate(self) -> float:
        """The share of the rows the sample kept (1.0: every row was sketched); the drift tests already
        count only the rows sketched, so their false-alarm rate holds at any rate."""
        kept = self.profile.rows
        return kept / (kept + self.sampled_out) if self.sampled_out else 1.0

    @property
    def rows(self) -> int:
        return self.profile.rows


class _Batch(NamedTuple):
    """One recorded request. A tuple: made on the request path and unpacked by the thousand on the
    background one (``zip(*batches)``), where a dataclass cost a microsecond a request."""

    rows: np.ndarray
    prediction: Prediction
    latency_ms: float  # per row
    kept: int = 0  # the rows the sample keeps: ``offset``, ``offset + step``, ... (``_every``), or all when step is 1
    offset: int = 0
    step: int = 1
    first: int = -1  # the first row's id (-1: a copied part, sampled already)


@dataclass
class _Joined:
    """Requests as one batch; each request's latency once, with its row count (a request's rows share it)."""

    rows: np.ndarray
    prediction: Prediction
    latencies_ms: np.ndarray  # per request
    bounds: np.ndarray  # request i is rows ``bounds[i]:bounds[i + 1]``

    def latencies(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The latencies of the requests rows ``start:stop`` belong to, and how many of those rows each has."""
        bounds = self.bounds
        if start == 0 and stop == bounds[-1]:  # the usual case: the whole batch in one window
            return self.latencies_ms, np.diff(bounds)
        first = int(np.searchsorted(bounds, start, side="right")) - 1
        last = int(np.searchsorted(bounds, stop, side="left"))
        rows = np.minimum(bounds[first + 1 : last + 1], stop) - np.maximum(bounds[first:last], start)
        return self.latencies_ms[first:last], rows


def _take(batch: _Batch, n: int) -> _Batch:
    """The first ``n`` rows of a request (sampled already), copied so the rest of a large request can be freed."""
    rows, p, latency_ms = batch[:3]

    def head(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[:n].copy()

    return _Batch(
        rows[:n].copy(),
        Prediction(
            labels=head(p.labels),
            probabilities=head(p.probabilities),
            values=head(p.values),
            embedding=head(p.embedding),
        ),
        latency_ms,
        n,
    )


def _every(batch: _Batch) -> _Batch:
    """The rows a request's sample keeps: ``offset``, ``offset + step``, ... (views, no copy). Done on the
    background thread: on the request path the views and their ``Prediction`` cost 3 µs a request."""
    rows, p, latency_ms, kept, offset, step, _ = batch
    if step == 1:
        return batch

    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[offset::step]

    return _Batch(
        rows[offset::step],
        Prediction(pick(p.labels), pick(p.probabilities), pick(p.values), pick(p.embedding)),
        latency_ms,
        kept,
    )


def _concatenate(batches: list[_Batch]) -> _Joined:
    """Many requests as one batch, so the sketches are updated once per feature, not once per request.
    Each request's sample is taken here as a slice of its arrays (no per-request ``Prediction``: under a
    small sample rate a pass joins hundreds of one-row slices)."""
    if len(batches) == 1:
        rows, prediction, latency_ms, kept = _every(batches[0])[:4]
        return _Joined(rows, prediction, np.asarray([latency_ms], dtype=np.float64), np.asarray([0, kept]))
    rows, predictions, latencies, kept, offsets, steps, _ = zip(*batches, strict=True)
    picks = list(map(slice, offsets, [None] * len(batches), steps))

    def join(parts: list[np.ndarray | None]) -> np.ndarray | None:
        return None if parts[0] is None else np.concatenate(list(map(np.ndarray.__getitem__, parts, picks)))

    prediction = Prediction(
        *(join(list(map(attrgetter(name), predictions))) for name in ("labels", "probabilities", "values", "embedding"))
    )
    bounds = np.cumsum([0, *kept])
    return _Joined(join(list(rows)), prediction, np.asarray(latencies, dtype=np.float64), bounds)


@dataclass
class Monitor:
    baseline: Profile
    window_rows: int
    window_seconds: float
    on_window: Callable[[ClosedWindow], None]
    clock: Callable[[], float] = time.time
    backlog_rows: int = 100_000  # most rows waiting to be sketched; the excess is counted in ``unmonitored_rows``
    drift_thresholds: dict[str, float] | None = None  # the bundle's, for each closed window's drift report
    # a tensor model's inputs as the rows its profile sketches (``TensorSignals.rows``), run off the request path
    signals: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None
    # the most time sketching may take, as a share of the time spent in inference (``budget.CpuBudget``);
    # 0, the default here, sketches every row (the agent passes [monitor] max_cpu_fraction, 0.1 by default)
    max_cpu_fraction: float = 0.0
    _pending: deque = field(
        default_factory=deque
    )  # appended after the backlog check under ``_lock`` (one uncontended lock per request)
    _errors: Counter = field(default_factory=Counter)
    _feedback: list[bool] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _process_lock: threading.Lock = field(default_factory=threading.Lock)
    _pending_rows: int = 0  # rows in ``_pending``; changed under ``_lock``
    _unmonitored: int = 0  # not yet attributed to a window; under ``_lock``
    _sampled_out: int = 0  # left out by the sample, not yet attributed to a window; under ``_lock``
    _inference_ms: float = 0.0  # inference time of the requests recorded since the budget last looked
    _sampled_carry: int = 0  # collected sampled-out rows not yet given to a window (background thread only)
    _gathered_since: float | None = None  # when a gathering pass first left rows waiting (``_gathering``)
    unmonitored_rows: int = 0  # all rows this monitor was given but did not sketch
    sampled_out_rows: int = 0  # all rows the CPU budget's sample left out (attributed to windows)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.budget = CpuBudget(self.max_cpu_fraction)
        self._start_window(self.clock())

    def _start_window(self, now: float) -> None:
        self._window = self.baseline.empty_like()
        self._window_start = now
        self._latencies: list[tuple[np.ndarray, np.ndarray]] = []  # (per request, rows of each) per part
        self._window_errors: Counter = Counter()
        self._labelled = self._correct = 0
        self._window_unmonitored = 0
        self._window_sampled_out = 0

    # -- the request path: O(1), no numpy work (unless the backlog is full) --------------------
    def record(self, rows: np.ndarray, prediction: Prediction, latency_ms: float, first: int = 0) -> None:
        """Hand one request's rows to the sketcher. ``first`` is the first row's id: under a CPU budget
        the sample keeps the rows whose id is a multiple of ``budget.every`` (so a one-row request is kept
        or skipped whole, and a large one becomes a strided view), whatever the rows hold."""
        n = len(rows)
        step = self.budget.every
        if step > 1:
            offset = (-first) % step
            kept = (n - offset + step - 1) // step if offset < n else 0
        else:
            offset, kept = 0, n
        with self._lock:
            self._inference_ms += latency_ms * n
            self._sampled_out += n - kept
            room = 0 if self.stopping else max(0, self.backlog_rows - self._pending_rows)
            take = min(kept, room)
            self._pending_rows += take
            if take < kept:
                self._unmonitored += kept - take
                self.unmonitored_rows += kept - take
        if take == kept:
            if take:
                self._pending.append(_Batch(rows, prediction, latency_ms, kept, offset, step, first))
        elif take:
            self._pending.append(_take(_every(_Batch(rows, prediction, latency_ms, kept, offset, step)), take))

    @property
    def backlog(self) -> int:
        """Rows waiting to be sketched."""
        return self._pending_rows

    def stop(self) -> None:
        """Sketch no more: a running ``process`` returns at the next window boundary, and rows still
        waiting (or recorded from now on) are counted as unmonitored. ``flush`` still closes the window.
        Rows a gathering pass left for later (fewer than ``GATHER_ROWS``, a moment's work) are sketched
        first: without the gathering they would have been already."""
        if self._gathered_since is not None and 0 < self._pending_rows < GATHER_ROWS:
            self.process()
        self.stopping = True

    def _unmonitor(self, n: int) -> None:
        if n:
            with self._lock:
                self._unmonitored += n
                self.unmonitored_rows += n

    def record_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    def record_feedback(self, correct: bool) -> None:
        with self._lock:
            self._feedback.append(correct)

    # -- the background path ---------------------------------------------------------------------
    def process(self, now: float | None = None, *, max_rows: int | None = None, gather: bool = False) -> int:
        """Fold pending batches (about ``max_rows`` rows of them, or all) into windows; close windows
        that are full or old. Returns windows closed. Once stopping, pending rows are counted as
        unmonitored instead of sketched.

        ``gather`` (the agent's background passes): fewer than ``GATHER_ROWS`` waiting rows are left for a
        later pass, for at most ``GATHER_SECONDS`` and never past the window's time. A pass costs some
        thirty numpy calls whatever it sketches, 200-300 µs once inference has emptied the caches: under a
        small sample rate, more than the rows it sketches, and more than the CPU budget allows."""
        with self._process_lock:
            pending = [] if gather and self._gathering(now) else self._take_pending(max_rows)
            taken = sum(batch.kept for batch in pending)
            if taken:
                with self._lock:
                    self._pending_rows -= taken
            if self.stopping:
                self._unmonitor(taken)
                pending = []
            elif pending and self.budget.every > 1:
                pending = self._resample(pending)
            self._collect()
            started = time.thread_time()  # this thread's CPU time: a preempted sketch is not a slow one
            closed = self._absorb(_concatenate(pending)) if pending else 0
            self._settle_sampled()
            with self._lock:
                inference_ms, self._inference_ms = self._inference_ms, 0.0
            self.budget.spent(time.thread_time() - started, inference_ms / 1e3)
            now = self.clock() if now is None else now
            if now - self._window_start >= self.window_seconds:
                if self._window.rows or self._window_unmonitored or self._window_sampled_out:
                    self._close(now)
                    closed += 1
                else:
                    self._window_start = now
            return closed

    def _resample(self, pending: list[_Batch]) -> list[_Batch]:
        """Requests recorded under a smaller ``every`` than the budget's now, sampled again: after an idle spell
        (or at start) a burst is recorded in full until the budget has seen what it costs, and the backlog it
        leaves would take far more than the budget's share. A step that divides the new one keeps a subset
        of the rows it kept, so the rest are counted as sampled out; the sample stays one by row id."""
        step, kept_batches, dropped = self.budget.every, [], 0
        for batch in pending:
            if batch.first >= 0 and batch.step < step and step % batch.step == 0:
                offset = (-batch.first) % step
                kept = len(range(offset, len(batch.rows), step))
                dropped += batch.kept - kept
                batch = batch._replace(kept=kept, offset=offset, step=step)
            if batch.kept:
                kept_batches.append(batch)
        if dropped:
            with self._lock:
                self._sampled_out += dropped
        return kept_batches

    def _gathering(self, now: float | None) -> bool:
        """Whether a gathering pass leaves the waiting rows for later (``process``)."""
        if self.stopping or not 0 < self._pending_rows < GATHER_ROWS:
            return False
        now = self.clock() if now is None else now
        if now - self._window_start >= self.window_seconds:
            return False
        if self._gathered_since is None:
            self._gathered_since = now
        return now - self._gathered_since < GATHER_SECONDS

    def _take_pending(self, max_rows: int | None) -> list[_Batch]:
        """The oldest pending requests, about ``max_rows`` rows of them (at least one request), or all."""
        self._gathered_since = None
        queue = self._pending
        if max_rows is None or self._pending_rows <= max_rows:
            return [queue.popleft() for _ in range(len(queue))]  # appended meanwhile: the next call's
        pending, taken = [], 0
        while queue and (not pending or taken + queue[0].kept <= max_rows):
            pending.append(queue.popleft())
            taken += pending[-1].kept
        return pending

    def _collect(self) -> None:
        with self._lock:
            errors, feedback = self._errors or None, self._feedback or None  # usually none: nothing new made
            if errors is not None:
                self._errors = Counter()
            if feedback is not None:
                self._feedback = []
            unmonitored, self._unmonitored = self._unmonitored, 0
            sampled_out, self._sampled_out = self._sampled_out, 0
        if errors is not None:
            self._window_errors.update(errors)
        if feedback is not None:
            self._labelled += len(feedback)
            self._correct += sum(feedback)
        self._window_unmonitored += unmonitored
        self._sampled_carry += sampled_out  # shared out among the windows the kept rows go to (``_absorb``)
        self.sampled_out_rows += sampled_out

    def _settle_sampled(self) -> None:
        self._window_sampled_out += self._sampled_carry
        self._sampled_carry = 0

    def _absorb(self, batch: _Joined) -> int:
        closed, offset, total = 0, 0, len(batch.rows)
        rows = batch.rows if self.signals is None else self._signal_rows(batch)
        if rows is None:
            return 0
        while offset < total:
            if self.stopping:  # between windows: the rest of the batch is counted, not sketched
                self._unmonitor(total - offset)
                self._collect()
                break
            room = self.window_rows - self._window.rows
            take = min(room, total - offset)
            share = self._sampled_carry * take // (total - offset)  # the sample's skipped rows, pro rata
            self._window_sampled_out += share
            self._sampled_carry -= share
            part = slice(offset, offset + take)
            self._window.update_inputs(rows[part], settle=False)  # settled when the window closes
            p = batch.prediction
            self._window.update_outputs(
                labels=None if p.labels is None else p.labels[part],
                probabilities=None if p.probabilities is None else p.probabilities[part],
                values=None if p.values is None else p.values[part],
                settle=False,
            )
            self._latencies.append(batch.latencies(offset, offset + take))  # sketched when the window closes
            offset += take
            if self._window.rows >= self.window_rows:
                self._close(self.clock())
                closed += 1
        return closed

    def _signal_rows(self, batch: _Joined) -> np.ndarray | None:
        """A tensor batch reduced to its signals, ``SIGNAL_CHUNK`` examples at a time (their float32
        working copies stay small whatever the backlog). A batch that cannot be reduced is counted as
        unmonitored and logged, never dropped silently."""
        embedding = batch.prediction.embedding
        try:
            return np.concatenate(
                [
                    self.signals(
                        batch.rows[i : i + SIGNAL_CHUNK], None if embedding is None else embedding[i : i + SIGNAL_CHUNK]
                    )
                    for i in range(0, len(batch.rows), SIGNAL_CHUNK)
                ]
            )
        except Exception:  # a bug in a signal must not stop the monitor: the rows are counted, not sketched
            log.exception("could not reduce %d examples to their signals", len(batch.rows))
            self._unmonitor(len(batch.rows))
            self._collect()
            return None

    def _close(self, now: float) -> None:
        latencies = np.empty(0)
        if self._latencies:  # each request's latency once, with its rows in this window: one update a window
            values, rows = map(np.concatenate, zip(*self._latencies, strict=True))
            self._window.latency_ms.update_counted(values, rows)
            latencies = np.repeat(values, rows)  # one per row again
        self._window.settle()
        window = ClosedWindow(
            self._window,
            self._window_start,
            now,
            latencies,
            dict(self._window_errors),
            self._labelled,
            self._correct,
            self._window_unmonitored,
            drift_report(self.baseline, self._window, self.drift_thresholds),
            self._window_sampled_out,
        )
        self._start_window(now)
        self.on_window(window)

    def flush(self, now: float | None = None) -> ClosedWindow | None:
        """Process everything and close the current window if it has rows (used on shutdown)."""
        self.process(now)
        with self._process_lock:
            self._collect()
            self._settle_sampled()
            if self._window.rows or self._window_unmonitored or self._window_sampled_out:
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
        return {
            "rows": self._window.rows,
            "started": self._window_start,
            "backlog_rows": self._pending_rows,
            "unmonitored_rows": self._window_unmonitored + self._unmonitored,
            "sampled_out_rows": self._window_sampled_out + self._sampled_out,
            "sample_rate": 1.0 / self.budget.every,
        }
