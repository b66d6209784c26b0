"""What the agent remembers of its predictions: a ring of recent answers, and a sampled debug log.

- ``RecentPredictions``: the last ``capacity`` answers in numpy arrays, indexed by prediction
  number, so delayed labels (``:feedback``) find their prediction without any I/O.
- ``PredictionLog``: SQLite, written by the background thread in batches: one row in
  ``sample_every`` with its full input, answer and time, but no more than ``max_per_second`` rows a
  second of traffic, ring-buffered at ``capacity`` rows, plus every row that received a label. Logging
  every row would cost more than the model itself; one row in a hundred still did at a thousand-row
  batch a millisecond (JSON of the sampled rows: 0.35 ms per 1,000 rows against 0.39 ms of inference),
  so past ten rows a second the log keeps a steady trickle, not a share. The sampled rows go into
  SQLite in one transaction at most once a second (``WRITE_EVERY_SECONDS``; a transaction cost as much
  as filing a thousand one-row requests), and the ring takes a request as one slice copy.
"""

from __future__ import annotations

import base64
import json
import math
import sqlite3
import threading
import time
from collections import deque
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    boot TEXT NOT NULL, n INTEGER NOT NULL, ts REAL NOT NULL, input TEXT,
    prediction TEXT NOT NULL, label TEXT, PRIMARY KEY (boot, n)
);
"""


class RecentPredictions:
    """The last ``capacity`` answers by prediction number, in an array of the answers' own type: storing a
    request is one slice copy, and only an answer that is looked up becomes a Python value. Beside each, what
    the caller said answered it (the agent: a weak reference to the model, so a label counts in its windows)."""

    def __init__(self, capacity: int = 10000) -> None:
        self.capacity = capacity
        self._answers: np.ndarray | None = None  # made on the first answers, of their dtype and row shape
        self._answered_by = np.full(capacity, None, dtype=object)
        self._labelled = np.zeros(capacity, dtype=bool)
        self._filled_to = 0  # one past the highest prediction number written

    def put(self, first: int, answers: np.ndarray) -> None:
        """Store ``answers[i]`` as prediction number ``first + i`` (older ones fall out of the ring)."""
        answers = np.asarray(answers)
        if len(answers) > self.capacity:
            first, answers = first + len(answers) - self.capacity, answers[-self.capacity :]
        if len(answers) == 0:
            return
        ring = self._ring_for(answers)
        start, n = first % self.capacity, len(answers)
        head = min(n, self.capacity - start)
        for ring_slice, part in ((slice(start, start + head), answers[:head]), (slice(0, n - head), answers[head:])):
            if ring.dtype == object and answers.dtype != object:
                _put_values(ring, ring_slice, part)
            else:
                ring[ring_slice] = part
            self._labelled[ring_slice] = False
        self._filled_to = max(self._filled_to, first + n)

    def _ring_for(self, answers: np.ndarray) -> np.ndarray:
        ring = self._answers
        if ring is None:
            numeric = answers.dtype.kind in "biuf"
            ring = np.empty((self.capacity, *answers.shape[1:]) if numeric else self.capacity, answers.dtype)
        elif ring.dtype != object and (
            ring.shape[1:] != answers.shape[1:]
            or answers.dtype.kind != ring.dtype.kind  # int labels in a float ring would read back as 3.0, not 3
            or not np.can_cast(answers.dtype, ring.dtype, "safe")
        ):  # a hot swap changed the answers' type or shape: Python values from now on (the old ones too)
            objects = np.empty(self.capacity, dtype=object)
            _put_values(objects, slice(0, self.capacity), ring)
            ring = objects
        self._answers = ring
        return ring

    def mark_labelled(self, n: int) -> bool:
        """True the first time prediction ``n`` gets a label; False for a repeat."""
        slot = n % self.capacity
        first = not self._labelled[slot]
        self._labelled[slot] = True
        return bool(first)

    def get(self, n: int) -> Any:
        if not (self._filled_to - self.capacity <= n < self._filled_to) or n < 0 or self._answers is None:
            return None
        return _python(self._answers[n % self.capacity])

    def note_answered_by(self, first: int, count: int, answered_by: Any) -> None:
        """What answered predictions ``first`` to ``first + count - 1`` (stored by ``put``)."""
        if count > self.capacity:
            first, count = first + count - self.capacity, self.capacity
        start = first % self.capacity
        head = min(count, self.capacity - start)
        self._answered_by[start : start + head] = answered_by
        self._answered_by[: count - head] = answered_by

    def answered_by(self, n: int) -> Any:
        """What ``note_answered_by`` said answered prediction ``n`` (None when not said, or ``n`` is not held)."""
        if not (self._filled_to - self.capacity <= n < self._filled_to) or n < 0:
            return None
        return self._answered_by[n % self.capacity]


def _put_values(ring: np.ndarray, where: slice, answers: np.ndarray) -> None:
    """Answers into an object ring as Python values, one by one (a row is a list, never broadcast)."""
    for i, value in zip(range(*where.indices(len(ring))), answers.tolist(), strict=True):
        ring[i] = value


def _python(value: Any) -> Any:
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


class PredictionLog:
    def __init__(
        self, path: str, *, capacity: int = 10000, sample_every: int = 100, max_per_second: float = 10.0
    ) -> None:
        self.capacity, self.sample_every, self.max_per_second = capacity, sample_every, max_per_second
        self._allowance, self._allowance_at = max_per_second, 0.0  # a token bucket, one second deep
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        # One flush at a time: a feedback's flush must wait for a batch the background thread has taken
        # off the queue but not yet put in ``recent``, or a just-answered id would be "unknown".
        self._flush_lock = threading.Lock()
        self._queue: deque = deque()  # appended on the request path without a lock
        self.recent = RecentPredictions(capacity)
        self._unwritten: list[tuple] = []  # sampled rows not yet in SQLite (``_write``)
        self._written_at = -math.inf  # time.monotonic() of the last write

    def add(
        self, boot: str, first: int, rows: np.ndarray | list[np.ndarray], answers: Any, answered_by: Any = None
    ) -> None:
        """Queue one request, or a run of requests with consecutive ids (``rows`` a list of their row arrays,
        never concatenated: only the sampled few are read); ``flush`` files it. A deque append. ``answered_by``
        is kept beside the answers for ``answered_by()``."""
        self._queue.append((boot, first, time.time(), rows, answers, answered_by))

    def flush(self) -> int:
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> int:
        queue = []
        while self._queue:
            queue.append(self._queue.popleft())
        records = []
        for boot, first, ts, rows, answers, answered_by in queue:
            answers = _answers_array(answers)
            self.recent.put(first, answers)
            self.recent.note_answered_by(first, len(answers), answered_by)
            for i in self._sampled(first, _count(rows), ts):
                records.append((boot, first + i, ts, _input_json(_row(rows, i)), json.dumps(_python(answers[i]))))
        self._unwritten.extend(records)
        # also with nothing new: the last rows before traffic stops are written a second later, not at close
        if self._unwritten and time.monotonic() - self._written_at >= WRITE_EVERY_SECONDS:
            self._write()
        return len(records)

    def _write(self) -> None:
        """The sampled rows into SQLite, in one transaction: at most one a ``WRITE_EVERY_SECONDS`` from
        ``flush`` (a transaction costs a millisecond, as much as logging a thousand one-row requests
        otherwise), and before anything reads the table (``count``, ``label``, ``close``)."""
        self._written_at = time.monotonic()
        records, self._unwritten = self._unwritten, []
        if not records:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO predictions (boot, n, ts, input, prediction) VALUES (?,?,?,?,?)", records
            )
            self._db.execute(
                "DELETE FROM predictions WHERE rowid <= (SELECT max(rowid) FROM predictions) - ?", (self.capacity,)
            )
            self._db.execute("COMMIT")

    def _sampled(self, first: int, count: int, ts: float) -> range:
        """The rows of a request to log: every ``sample_every``-th prediction number, as many as the bucket
        allows, spread over the request."""
        self._allowance = min(self.max_per_second, self._allowance + (ts - self._allowance_at) * self.max_per_second)
        self._allowance_at = ts
        start = (-first) % self.sample_every
        candidates = len(range(start, count, self.sample_every))
        allowed = min(candidates, int(self._allowance))
        if allowed <= 0:
            return range(0)
        self._allowance -= allowed
        stride = self.sample_every * (candidates // allowed)
        return range(start, count, stride)[:allowed]

    def label(self, boot: str, current_boot: str, n: int, label: Any) -> tuple[str, Any]:
        """Record a delayed label: ("accepted", the prediction it labels), ("duplicate", …) or ("unknown", None).

        Every one of the last ``capacity`` predictions of this run is found (the ring holds them all,
        not just the sampled rows); "unknown" means an id of another run (the agent restarted) or older."""
        with self._flush_lock:  # also makes look-up and marking one step: two labels for one id count once
            self._flush()
            self._write()  # a sampled row written after its label would replace the labelled row
            answer = self.recent.get(n) if boot == current_boot else None
            if answer is None:
                return "unknown", None
            if not self.recent.mark_labelled(n):
                return "duplicate", answer
        with self._lock:
            self._db.execute(
                "INSERT INTO predictions (boot, n, ts, prediction, label) VALUES (?,?,?,?,?) "
                "ON CONFLICT (boot, n) DO UPDATE SET label=excluded.label",
                (boot, n, time.time(), json.dumps(answer), json.dumps(label)),
            )
        return "accepted", answer

    def answered_by(self, n: int) -> Any:
        """What ``add`` was told answered prediction ``n`` of this run, while the ring holds it (else None)."""
        with self._flush_lock:
            return self.recent.answered_by(n)

    def count(self) -> int:
        with self._flush_lock:
            self._write()
        with self._lock:
            return self._db.execute("SELECT count(*) FROM predictions").fetchone()[0]

    def close(self) -> None:
        with self._flush_lock:
            self._flush()
            self._write()
        with self._lock:
            self._db.close()


WRITE_EVERY_SECONDS = 1.0  # the most a crash can lose of the sampled debug rows (labels are written at once)
# a logged tensor past this is named but not kept: 10,000 sampled 224x224x3 images would fill an SD card
MAX_LOGGED_TENSOR_BYTES = 16 << 10


def _input_json(row: np.ndarray) -> str:
    """One input as JSON: a row as its list of values; a small tensor (a spectrogram, a sensor window,
    a thumbnail) as its raw bytes in base64 with dtype and shape, a third of the size of its numbers
    written out; a larger one (a camera frame) by dtype and shape only."""
    if row.ndim <= 1:
        return json.dumps(row.tolist())
    if row.nbytes > MAX_LOGGED_TENSOR_BYTES:
        return json.dumps({"dtype": str(row.dtype), "shape": list(row.shape), "omitted": "over 16 KB"})
    data = base64.b64encode(np.ascontiguousarray(row).tobytes()).decode()
    return json.dumps({"dtype": str(row.dtype), "shape": list(row.shape), "b64": data})


def _count(rows: np.ndarray | list[np.ndarray]) -> int:
    return sum(len(r) for r in rows) if isinstance(rows, list) else len(rows)


def _row(rows: np.ndarray | list[np.ndarray], i: int) -> np.ndarray:
    """Row ``i`` of a request, or of a run of requests' row arrays."""
    if not isinstance(rows, list):
        return rows[i]
    for chunk in rows:
        if i < len(chunk):
            return chunk[i]
        i -= len(chunk)
    raise IndexError(i)


def _answers_array(answers: Any) -> np.ndarray:
    """A request's answers, one per row: a one-value row as that value."""
    answers = np.asarray(answers)
    if answers.ndim > 1 and answers.shape[1] == 1:
        answers = answers[:, 0]
    return answers
