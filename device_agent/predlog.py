"""What the agent remembers of its predictions: a ring of recent answers, and a sampled debug log.

- ``RecentPredictions``: the last ``capacity`` answers in numpy arrays, indexed by prediction
  number, so delayed labels (``:feedback``) find their prediction without any I/O.
- ``PredictionLog``: SQLite, written by the background thread in batches: one row in
  ``sample_every`` with its full input, answer and time, ring-buffered at ``capacity`` rows, plus every
  row that received a label. Logging every row would cost more than the model itself.
"""

from __future__ import annotations

import base64
import json
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
    def __init__(self, capacity: int = 10000) -> None:
        self.capacity = capacity
        self._answers = np.empty(capacity, dtype=object)
        self._labelled = np.zeros(capacity, dtype=bool)
        self._filled_to = 0  # one past the highest prediction number written

    def put(self, numbers: np.ndarray, answers: list[Any]) -> None:
        """Store ``answers[i]`` as prediction number ``numbers[i]`` (older ones fall out of the ring)."""
        if len(numbers) > self.capacity:
            numbers, answers = numbers[-self.capacity :], answers[-self.capacity :]
        self._answers[numbers % self.capacity] = answers
        self._labelled[numbers % self.capacity] = False
        self._filled_to = max(self._filled_to, int(numbers.max()) + 1)

    def mark_labelled(self, n: int) -> bool:
        """True the first time prediction ``n`` gets a label; False for a repeat."""
        slot = n % self.capacity
        first = not self._labelled[slot]
        self._labelled[slot] = True
        return bool(first)

    def get(self, n: int) -> Any:
        if not (self._filled_to - self.capacity <= n < self._filled_to) or n < 0:
            return None
        return self._answers[n % self.capacity]


class PredictionLog:
    def __init__(self, path: str, *, capacity: int = 10000, sample_every: int = 100) -> None:
        self.capacity, self.sample_every = capacity, sample_every
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

    def add(self, boot: str, first: int, rows: np.ndarray, answers: Any) -> None:
        """Queue one request (a deque append); ``flush`` files it."""
        self._queue.append((boot, first, time.time(), rows, answers))

    def flush(self) -> int:
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> int:
        queue = []
        while self._queue:
            queue.append(self._queue.popleft())
        if not queue:
            return 0
        numbers = np.concatenate([first + np.arange(len(rows)) for _, first, _, rows, _ in queue])
        answers = [a for *_, rows, batch in queue for a in _as_answers(batch)]
        holder = np.empty(len(answers), dtype=object)
        holder[:] = answers
        self.recent.put(numbers, holder)
        records, position = [], 0
        for boot, first, ts, rows, _ in queue:
            for i in range((-first) % self.sample_every, len(rows), self.sample_every):
                records.append((boot, first + i, ts, _input_json(rows[i]), json.dumps(answers[position + i])))
            position += len(rows)
        if records:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO predictions (boot, n, ts, input, prediction) VALUES (?,?,?,?,?)", records
                )
                self._db.execute(
                    "DELETE FROM predictions WHERE rowid <= (SELECT max(rowid) FROM predictions) - ?", (self.capacity,)
                )
                self._db.execute("COMMIT")
        return len(records)

    def label(self, boot: str, current_boot: str, n: int, label: Any) -> tuple[str, Any]:
        """Record a delayed label: ("accepted", the prediction it labels), ("duplicate", …) or ("unknown", None).

        Every one of the last ``capacity`` predictions of this run is found (the ring holds them all,
        not just the sampled rows); "unknown" means an id of another run (the agent restarted) or older."""
        with self._flush_lock:  # also makes look-up and marking one step: two labels for one id count once
            self._flush()
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

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM predictions").fetchone()[0]

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()


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


def _as_answers(answers: Any) -> list[Any]:
    answers = np.asarray(answers)
    if answers.ndim > 1 and answers.shape[1] == 1:
        answers = answers[:, 0]
    return answers.tolist()
