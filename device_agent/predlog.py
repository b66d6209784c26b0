"""A bounded prediction log in SQLite, for debugging and for delayed labels.

Rows are written by the agent's background thread in batches (never on the request path). Inputs
are kept as a short hash, and in full for one row in ``sample_every``. The table is a ring: past
``capacity`` rows the oldest are deleted.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    boot TEXT NOT NULL, n INTEGER NOT NULL, ts REAL NOT NULL, input_sha TEXT NOT NULL, input TEXT,
    prediction TEXT NOT NULL, label TEXT, PRIMARY KEY (boot, n)
);
"""


class PredictionLog:
    def __init__(self, path: str | Path, *, capacity: int = 10000, sample_every: int = 100) -> None:
        self.capacity, self.sample_every = capacity, sample_every
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._queue: list[tuple[str, int, float, np.ndarray, list[Any]]] = []

    def add(self, boot: str, first: int, rows: np.ndarray, answers: list[Any]) -> None:
        """Queue one batch (cheap: a list append); ``flush`` writes it."""
        with self._lock:
            self._queue.append((boot, first, time.time(), rows, answers))

    def flush(self) -> int:
        with self._lock:
            queue, self._queue = self._queue, []
        records = []
        for boot, first, ts, rows, answers in queue:
            for i, (row, answer) in enumerate(zip(rows, answers)):
                n = first + i
                sample = json.dumps(row.tolist()) if n % self.sample_every == 0 else None
                records.append((boot, n, ts, hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest(), sample, json.dumps(answer)))
        if records:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO predictions (boot, n, ts, input_sha, input, prediction) VALUES (?,?,?,?,?,?)", records)
                self._db.execute("DELETE FROM predictions WHERE rowid <= (SELECT max(rowid) FROM predictions) - ?", (self.capacity,))
                self._db.execute("COMMIT")
        return len(records)

    def label(self, boot: str, n: int, label: Any) -> Any:
        """Record a delayed label; return the logged prediction, or None for an unknown (or evicted) id."""
        self.flush()
        with self._lock:
            row = self._db.execute("SELECT prediction FROM predictions WHERE boot=? AND n=?", (boot, n)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE predictions SET label=? WHERE boot=? AND n=?", (json.dumps(label), boot, n))
        return json.loads(row[0])

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM predictions").fetchone()[0]

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()
