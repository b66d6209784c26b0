"""Field samples: raw input rows the agent keeps on disk, within a budget, until the fleet asks for them.

Off unless ``[capture] enabled = true`` (agent.toml): a device's inputs are its owner's data. When on,
each answered row's id (``<boot>-<n>``) is hashed (``row_hashes``: splitmix64, so anyone holding the id
can tell whether it was kept); a row is kept when its hash is under ``rate``, and a window judged
drifted also keeps up to ``drifted_rows`` of the rows whose hash is under ``drifted_rows / window_rows``
(the smallest hashes first). The request path only hashes and copies the few candidate rows
(``offer``); when the monitor closes a window, its candidates are chosen and appended, with window seq,
model, version, prediction and time, as JSON lines to segment files under ``<state_dir>/capture/segments``.
Past ``max_mb`` the oldest segments are deleted, their rows counted as dropped.

Which window a row was in: the monitor takes a model's rows in the order they were handed to it, and a
closed window says how many it covered (sketched, sampled out, or unmonitored), so the capture counts
the rows each model was offered and gives a window the candidates up to its count (two requests racing
at a window's edge may land in each other's window). Cells keep their types (a typed table's strings,
integers and booleans stay so); a tensor example is kept as its raw bytes (base64, with dtype and
shape) when under ``MAX_EXAMPLE_BYTES``, and counted as ``too_large`` otherwise.

Uploads (``cmd: upload`` from the collector, asked for by ``edgekit fleet samples``) are the upload
module's: ``capture_upload.py``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import CaptureConfig
from .fsutil import write_atomic

log = logging.getLogger("device_agent.capture")
SEGMENT_BYTES = 1 << 20  # a segment file's size before the next one starts (the unit the size cap drops)
MAX_EXAMPLE_BYTES = 1 << 20  # a tensor example larger than this is not kept (a camera frame is ~150 KB)
# candidates waiting for their window to close, at most: past it a burst's rows are counted as overflow
MAX_PENDING_ROWS = 50_000
_MASK64 = (1 << 64) - 1


def row_hashes(boot: str, numbers: np.ndarray) -> np.ndarray:
    """Each row id's hash in [0, 1): splitmix64 of ``boot`` (32 bits) above ``n`` (``scripts`` and the
    tests recompute it from an id to know whether it was kept)."""
    z = np.asarray(numbers, dtype=np.uint64) ^ np.uint64((int(boot, 16) & 0xFFFFFFFF) << 32)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_hash(boot: str, n: int) -> float:
    """``row_hashes`` of one id in plain Python: a one-row request costs a microsecond, not six numpy calls."""
    z = (n ^ ((int(boot, 16) & 0xFFFFFFFF) << 32)) & _MASK64
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


class Capture:
    """The device's field-sample store: candidates from the request path, rows on disk per closed window."""

    def __init__(self, config: CaptureConfig, directory: Path, boot: str, *, window_rows: int) -> None:
        self.config, self.boot, self.directory = config, boot, Path(directory)
        self.enabled = config.enabled
        # rows with a hash under ``drifted_share`` wait for their window's verdict; under ``rate`` they stay
        # (twice the rows wanted: a drifted window nearly always has ``drifted_rows`` candidates to choose from)
        self.drifted_share = min(1.0, 2 * config.drifted_rows / max(1, window_rows))
        self.threshold = max(config.rate, self.drifted_share) if self.enabled else 0.0
        self.max_bytes = int(config.max_mb * (1 << 20))
        self.segment_bytes = max(4096, min(SEGMENT_BYTES, self.max_bytes // 4))
        self._pending: deque = deque()  # (time, serving, ordinal, first, picked, hashes, rows, answers)
        self._pending_rows = 0
        self._offered: dict[int, int] = {}  # rows offered per serving (by id()), and covered by its closed windows
        self._covered: dict[int, int] = {}
        self._offer_lock = threading.Lock()
        self._lock = threading.Lock()  # the segment files: windows appended, uploads reading, the cap
        self.kept_rows = 0
        self.dropped = {"size_cap": 0, "overflow": 0, "too_large": 0}  # rows not kept, or deleted, by reason
        self.uploads = {"done": 0, "failed": 0, "refused": 0}  # by outcome
        self.upload_bytes = self.upload_rows = 0
        self.stored_rows = self.stored_bytes = 0
        self.uploader: Any = None  # capture_upload.Uploader, when the agent has MQTT
        if self.enabled:
            self.segments.mkdir(parents=True, exist_ok=True)
            self._count_stored()

    @classmethod
    def for_agent(cls, agent: Any) -> Capture:
        """The agent's capture, with its uploader (which takes ``cmd: upload`` even when capture is off, so the
        operator hears at once that this device keeps no rows)."""
        from .capture_upload import Uploader

        capture = cls(
            agent.config.capture,
            agent.config.state_dir / "capture",
            agent.boot,
            window_rows=agent.config.monitor.window_rows,
        )
        capture.uploader = Uploader(capture, agent)
        return capture

    segments = property(lambda self: self.directory / "segments")

    # -- the request path ---------------------------------------------------------------------------
    def offer(self, serving: Any, first: int, rows: np.ndarray, answers: Any) -> None:
        """Keep a copy of the rows of one answered request that may be kept (a hash under ``threshold``)."""
        if not self.enabled:
            return
        n = len(rows)
        if n == 1:
            h = row_hash(self.boot, first)
            picked, hashes = (np.zeros(1, dtype=np.int64), np.array([h])) if h < self.threshold else (None, None)
        else:
            all_hashes = row_hashes(self.boot, np.arange(first, first + n, dtype=np.uint64))
            picked = np.flatnonzero(all_hashes < self.threshold)
            hashes = all_hashes[picked]
        # one lock for the ordinals (the order the monitor got the rows in: ``record`` was called just before)
        # and the pending count, which the background thread's ``_take`` lowers: ``+=`` from two threads at
        # once loses one of them, and a count that only drifts up would end every capture as "overflow"
        with self._offer_lock:
            ordinal = self._offered.get(id(serving), 0)
            self._offered[id(serving)] = ordinal + n
            if picked is None or not len(picked):
                return
            if self._pending_rows + len(picked) > MAX_PENDING_ROWS:
                self.dropped["overflow"] += len(picked)
                return
            self._pending_rows += len(picked)
            self._pending.append(
                (time.time(), serving, ordinal, first, picked, hashes, rows[picked], np.asarray(answers)[picked])
            )

    # -- the background thread ----------------------------------------------------------------------
    def window_closed(self, seq: int, window: Any, serving: Any, summary: dict[str, Any]) -> None:
        """Choose the closed window's rows, append them to the store, and say so in its ``summary``."""
        if not self.enabled:
            return
        covered = self._covered.get(id(serving), 0) + window.rows + window.sampled_out + window.unmonitored
        self._covered[id(serving)] = covered
        batches = self._take(serving, covered)
        drifted = (window.drift or {}).get("drifted")  # True, False, or None (too few rows to test)
        records = list(self._records(batches, {"seq": seq, "drifted": drifted, **_model(serving)}))
        with self._lock:
            if records:
                self._remember_model(serving)
                self._append(records)
            self._enforce_cap()
        self.kept_rows += len(records)
        summary["capture"] = {"kept_rows": len(records), "stored_rows": self.stored_rows}

    def _take(self, serving: Any, covered: int) -> list[tuple]:
        """The candidates of ``serving`` before its row ``covered`` (a request the window boundary cuts is cut
        there too, as the monitor cuts it); the others wait for their own window."""
        taken, kept = [], deque()
        while self._pending:
            item = self._pending.popleft()
            now = item[2] + item[4] < covered if item[1] is serving else np.zeros(len(item[4]), dtype=bool)
            if now.all():
                taken.append(item)
            elif not now.any():
                kept.append(item)
            else:
                taken.append(_part(item, now))
                kept.append(_part(item, ~now))
        self._pending.extendleft(reversed(kept))
        with self._offer_lock:
            self._pending_rows -= sum(len(item[4]) for item in taken)
        return taken

    def _records(self, batches: list[tuple], window: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The kept rows of one closed window: hash under ``rate``; if drifted, the ``drifted_rows`` smallest
        hashes under ``drifted_share`` too. ``window``: seq, verdict, model and version, on every row."""
        if not batches:
            return
        hashes = np.concatenate([b[5] for b in batches])
        chosen = set(np.flatnonzero(hashes < self.config.rate).tolist())
        if window["drifted"]:
            under = np.flatnonzero(hashes < self.drifted_share)
            chosen.update(under[np.argsort(hashes[under], kind="stable")][: self.config.drifted_rows].tolist())
        position = 0
        for ts, _, _, first, picked, _, rows, answers in batches:
            for i in range(len(picked)):
                if position + i in chosen:
                    record = self._record(rows[i], answers[i], f"{self.boot}-{first + int(picked[i])}", ts)
                    if record is not None:
                        yield {**record, **window}
            position += len(picked)

    def _record(self, row: np.ndarray, answer: Any, row_id: str, ts: float) -> dict[str, Any] | None:
        if isinstance(row, np.ndarray) and row.ndim > 1:  # a tensor example
            if row.nbytes > MAX_EXAMPLE_BYTES:
                self.dropped["too_large"] += 1
                return None
            data = base64.b64encode(np.ascontiguousarray(row).tobytes()).decode()
            cells: Any = {"dtype": str(row.dtype), "shape": list(row.shape), "b64": data}
        else:
            cells = np.asarray(row).tolist()
        answer = answer.tolist() if hasattr(answer, "tolist") else answer
        return {"id": row_id, "ts": round(ts, 3), "prediction": answer, "input": cells}

    def _remember_model(self, serving: Any) -> None:
        """The feature names and input kind of each model version with kept rows (``models.json``), so an
        upload can name its columns after the model has been swapped out."""
        path = self.directory / "models.json"
        models = _read_json(path, {})
        key = f"{serving.model_info['name']}:{serving.model_info['version']}"
        if key not in models:
            schema = serving.schema
            kind = "tensor" if schema.tensor is not None else "columns" if schema.columns is not None else "matrix"
            models[key] = {"features": list(schema.feature_names), "kind": kind}
            write_atomic(path, json.dumps(models).encode())

    # -- the segment files --------------------------------------------------------------------------
    def _segment_files(self) -> list[Path]:
        return sorted(self.segments.glob("*.jsonl")) if self.segments.is_dir() else []

    def _append(self, records: list[dict[str, Any]]) -> None:
        """Append whole lines, a new segment every ``segment_bytes``, then fsync: a crash leaves at most a
        torn last line, which readers skip."""
        files = self._segment_files()
        current = files[-1] if files else self.segments / f"{1:08d}.jsonl"
        size = current.stat().st_size if current.exists() else 0
        lines = deque((json.dumps(r, separators=(",", ":"), default=_plain) + "\n").encode() for r in records)
        while lines:
            if size >= self.segment_bytes:
                current, size = self.segments / f"{int(current.stem) + 1:08d}.jsonl", 0
            part = []
            while lines and (size < self.segment_bytes or not part):
                part.append(lines.popleft())
                size += len(part[-1])
            with open(current, "ab") as handle:
                handle.write(b"".join(part))
                handle.flush()
                os.fsync(handle.fileno())
            self.stored_rows += len(part)
            self.stored_bytes += sum(len(line) for line in part)

    def _enforce_cap(self) -> None:
        """Delete the oldest segments while the store is over ``max_mb`` (never the one being written)."""
        files = self._segment_files()
        while self.stored_bytes > self.max_bytes and len(files) > 1:
            oldest = files.pop(0)
            data = oldest.read_bytes()
            oldest.unlink()
            rows = data.count(b"\n")
            self.stored_rows -= rows
            self.stored_bytes -= len(data)
            self.dropped["size_cap"] += rows

    def _count_stored(self) -> None:
        for path in self._segment_files():
            data = path.read_bytes()
            self.stored_rows += data.count(b"\n")
            self.stored_bytes += len(data)

    def rows(self, *, since: float | None = None, drifted_only: bool = False) -> Iterator[dict[str, Any]]:
        """The stored rows, oldest first, answered at or after ``since`` (and in drifted windows only)."""
        with self._lock:
            files = [(path, path.read_bytes()) for path in self._segment_files()]
        for _, data in files:
            for line in data.split(b"\n"):
                try:
                    record = json.loads(line)
                except ValueError:  # the empty tail, or a line torn by a crash
                    continue
                if (since is None or record["ts"] >= since) and (not drifted_only or record.get("drifted")):
                    yield record

    def models(self) -> dict[str, Any]:
        return _read_json(self.directory / "models.json", {})

    # -- what /metrics shows --------------------------------------------------------------------------
    def metrics(self) -> list[tuple[str, str, str, list[tuple[dict[str, str], float]]]]:
        """(name, type, help, [(labels, value)]) for the agent's /metrics (``metrics.render_metrics``)."""
        return [
            ("edgekit_capture_enabled", "gauge", "Whether [capture] keeps field rows.", [({}, int(self.enabled))]),
            ("edgekit_capture_rows_total", "counter", "Field rows kept.", [({}, self.kept_rows)]),
            ("edgekit_capture_stored_rows", "gauge", "Field rows on disk now.", [({}, self.stored_rows)]),
            ("edgekit_capture_stored_bytes", "gauge", "Bytes of field rows on disk now.", [({}, self.stored_bytes)]),
            (
                "edgekit_capture_dropped_rows_total",
                "counter",
                "Field rows not kept or deleted, by reason (size cap, burst overflow, example too large).",
                [({"reason": reason}, count) for reason, count in sorted(self.dropped.items())],
            ),
            (
                "edgekit_capture_uploads_total",
                "counter",
                "Uploads of field rows to the collector, by outcome.",
                [({"outcome": outcome}, count) for outcome, count in sorted(self.uploads.items())],
            ),
            ("edgekit_capture_upload_bytes_total", "counter", "Bytes sent in uploads.", [({}, self.upload_bytes)]),
            ("edgekit_capture_upload_rows_total", "counter", "Field rows uploaded.", [({}, self.upload_rows)]),
        ]


def _part(item: tuple, mask: np.ndarray) -> tuple:
    ts, serving, ordinal, first, picked, hashes, rows, answers = item
    return ts, serving, ordinal, first, picked[mask], hashes[mask], rows[mask], answers[mask]


def _model(serving: Any) -> dict[str, Any]:
    return {"model": serving.model_info["name"], "version": serving.model_info["version"]}


def _plain(value: Any) -> Any:
    """A numpy scalar in a typed row as its Python value (JSON keeps the type: int, float, bool, str)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot be kept as a field row cell")


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return default
