"""Field samples' records: the uploads the collector issued, their bytes while they arrive, and the rows.

An upload is a row of ``sample_uploads`` from the moment ``edgekit fleet samples`` asks for it (state
``requested``, with the id the device must name); its chunks go to ``sample_chunks`` by a guarded write
(``add_sample_chunk``: only at the offset held, only while the upload is open, only with the size and
sha256 it started with), so collectors sharing the database never interleave two copies of one chunk;
once whole and checked, its rows go to ``samples`` (one per device and row id: a row uploaded again
gets the newer upload and any label that arrived since) and the chunks are deleted (``complete_upload``).
Which request is refused and why is ``fleet/samples.py``'s business; this module only keeps the records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

OPEN_STATES = ("requested", "receiving")
_UPLOAD_COLUMNS = (
    "id, device, selection, state, size, sha256, received, rows, labelled, header, requested_at, updated_at, "
    "completed_at, reason"
)
_SAMPLE_COLUMNS = "device, id, upload, seq, model, model_version, ts, drifted, prediction, label, input"
_BATCH_ROWS, _BATCH_BYTES = 1000, 1 << 20  # rows (and their inputs' bytes) a statement inserts at most


class SampleRecords:
    """Mixed into a store that has ``atomic()`` and ``reading()``."""

    def issue_upload(self, upload_id: str, device: str, selection: dict[str, Any], now: float) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT INTO sample_uploads (id, device, selection, state, requested_at, updated_at) "
                "VALUES (?, ?, ?, 'requested', ?, ?)",
                (upload_id, device, json.dumps(selection), now, now),
            )

    def sample_upload(self, upload_id: str) -> dict[str, Any] | None:
        with self.reading() as db:
            row = db.execute(f"SELECT {_UPLOAD_COLUMNS} FROM sample_uploads WHERE id = ?", (upload_id,)).fetchone()
        return None if row is None else _upload(row)

    def sample_uploads(self, *, device: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest uploads first (of ``device``, or of every device)."""
        where, args = ("WHERE device = ?", [device]) if device else ("", [])
        with self.reading() as db:
            rows = db.execute(
                f"SELECT {_UPLOAD_COLUMNS} FROM sample_uploads {where} ORDER BY requested_at DESC, id LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_upload(row) for row in rows]

    def add_sample_chunk(
        self, upload_id: str, first: int, data: bytes, *, size: int, sha256: str, now: float
    ) -> int | None:
        """Store ``data`` at ``first`` if that is where the open upload stands (and its size and sha256 are
        the ones it started with); the bytes held after it, or None when the write was not the next one."""
        with self.atomic() as db:
            row = db.execute(
                f"""UPDATE sample_uploads SET received = received + :n, size = :size, sha256 = :sha,
                   state = 'receiving', updated_at = :now
                   WHERE id = :id AND state IN {OPEN_STATES} AND received = :first
                   AND (size IS NULL OR size = :size) AND (sha256 IS NULL OR sha256 = :sha)
                   RETURNING received""",
                {"n": len(data), "size": size, "sha": sha256, "now": now, "id": upload_id, "first": first},
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "INSERT INTO sample_chunks (upload, first_byte, data) VALUES (?, ?, ?)", (upload_id, first, data)
            )
            return int(row[0])

    def upload_bytes(self, upload_id: str) -> bytes:
        """The whole upload at once: for tests and small files; ``upload_chunks`` is what the collector reads."""
        return b"".join(self.upload_chunks(upload_id))

    def upload_chunks(self, upload_id: str) -> Iterator[bytes]:
        """The upload's chunks in order, one query each, so a file of ``MAX_UPLOAD_BYTES`` is never in memory
        whole and no read stays open between chunks."""
        offset = 0
        while True:
            with self.reading() as db:
                row = db.execute(
                    "SELECT first_byte, data FROM sample_chunks WHERE upload = ? AND first_byte >= ? "
                    "ORDER BY first_byte LIMIT 1",
                    (upload_id, offset),
                ).fetchone()
            if row is None:
                return
            data = bytes(row[1])
            offset = int(row[0]) + max(len(data), 1)
            yield data

    def complete_upload(
        self, upload_id: str, device: str, rows: Iterable[dict[str, Any]], header: dict[str, Any], now: float
    ) -> bool:
        """The upload's rows stored, its chunks gone, its state ``complete``: one transaction, written in batches
        as ``rows`` yields them. False (and nothing written) when it is no longer open: another collector
        finished it first."""
        stored = labelled = 0
        with self.atomic() as db:
            closed = db.execute(
                "UPDATE sample_uploads SET state = 'complete', completed_at = :now, updated_at = :now "
                f"WHERE id = :id AND state IN {OPEN_STATES} RETURNING id",
                {"now": now, "id": upload_id},
            ).fetchone()
            if closed is None:
                return False
            for batch in _batches(_sample(device, upload_id, row) for row in rows):
                db.executemany(
                    f"""INSERT INTO samples ({_SAMPLE_COLUMNS}) VALUES ({", ".join("?" * 11)})
                       ON CONFLICT (device, id) DO UPDATE SET upload = excluded.upload,
                       label = coalesce(excluded.label, samples.label)""",
                    batch,
                )
                stored += len(batch)
                labelled += sum(1 for r in batch if r[9] is not None)
            db.execute("DELETE FROM sample_chunks WHERE upload = ?", (upload_id,))
            db.execute(
                "UPDATE sample_uploads SET rows = ?, labelled = ?, header = ? WHERE id = ?",
                (stored, labelled, json.dumps(header), upload_id),
            )
        return True

    def fail_upload(self, upload_id: str, reason: str, now: float) -> None:
        """Close an upload that cannot complete (it arrived whole but wrong, or was never sent): its bytes go,
        the reason stays for ``fleet samples`` to say; asking again issues a new id. One completed already
        stays complete."""
        with self.atomic() as db:
            failed = db.execute(
                "UPDATE sample_uploads SET state = 'failed', reason = ?, updated_at = ? "
                f"WHERE id = ? AND state IN {OPEN_STATES} RETURNING id",
                (reason, now, upload_id),
            ).fetchone()
            if failed is not None:
                db.execute("DELETE FROM sample_chunks WHERE upload = ?", (upload_id,))

    def sample_rows(
        self, *, device: str | None = None, upload: str | None = None, since: float | None = None, drifted_only=False
    ) -> list[dict[str, Any]]:
        """Stored rows, by device and time; the newest upload of each row names it."""
        conditions, args = [], []
        for column, value in (("device = ?", device), ("upload = ?", upload), ("ts >= ?", since)):
            if value is not None:
                conditions.append(column)
                args.append(value)
        if drifted_only:
            conditions.append("drifted = 1")
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        with self.reading() as db:
            rows = db.execute(f"SELECT {_SAMPLE_COLUMNS} FROM samples {where} ORDER BY device, ts, id", args).fetchall()
        return [_row(row) for row in rows]

    def sample_counts(self) -> dict[str, Any]:
        """For /metrics: uploads by state, and rows stored and labelled, per device."""
        with self.reading() as db:
            states = db.execute("SELECT state, count(*) FROM sample_uploads GROUP BY state").fetchall()
            devices = db.execute(
                "SELECT device, count(*), CAST(sum(CASE WHEN label IS NULL THEN 0 ELSE 1 END) AS BIGINT) "
                "FROM samples GROUP BY device"
            ).fetchall()
        return {
            "uploads": {row[0]: int(row[1]) for row in states},
            "rows": {row[0]: (int(row[1]), int(row[2] or 0)) for row in devices},
        }


def _batches(records: Iterable[tuple]) -> Iterator[list[tuple]]:
    """Records in batches of at most ``_BATCH_ROWS`` rows or ``_BATCH_BYTES`` of inputs (a tensor row is big)."""
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record[10])
        if len(batch) >= _BATCH_ROWS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _upload(row: Any) -> dict[str, Any]:
    doc = {name.strip(): row[i] for i, name in enumerate(_UPLOAD_COLUMNS.split(","))}
    doc["selection"] = json.loads(doc["selection"])
    doc["header"] = json.loads(doc["header"]) if doc["header"] else None
    return doc


def _sample(device: str, upload: str, row: dict[str, Any]) -> tuple:
    drifted = row.get("drifted")
    return (
        device,
        row["id"],
        upload,
        row.get("seq"),
        row["model"],
        row["version"],
        row["ts"],
        None if drifted is None else int(bool(drifted)),
        json.dumps(row.get("prediction")),
        None if row.get("label") is None else json.dumps(row["label"]),
        json.dumps(row["input"]),
    )


def _row(row: Any) -> dict[str, Any]:
    return {
        "device": row[0],
        "id": row[1],
        "upload": row[2],
        "seq": row[3],
        "model": row[4],
        "version": row[5],
        "ts": row[6],
        "drifted": None if row[7] is None else bool(row[7]),
        "prediction": json.loads(row[8]) if row[8] is not None else None,
        "label": json.loads(row[9]) if row[9] is not None else None,
        "input": json.loads(row[10]),
    }
