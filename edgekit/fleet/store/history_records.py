"""The statements of bounded history: raw windows rolled into hourly and daily buckets, and read back.

A bucket (table ``history``) is one device's windows of one model version and baseline within an hour
or a day: their counters and their merged compact profile. What merges is decided by the caller
(``edgekit.fleet.retention``, which knows profiles); this mixin only moves rows, each move one
transaction: the rows a bucket replaces are deleted in the transaction that writes it, so a crash
anywhere leaves either the rows or the bucket, never both, and running a step twice changes nothing.

``history_marks`` records, per device, the newest seq and window end rolled up, and ``history_holes`` the
seqs at or under that mark which no bucket counts (windows missing, or left raw, when a rollup passed them):
a raw row at or under both marks and in no hole is a redelivery of a window already counted in a bucket
(the device resent it from its spool after the raw row was gone); readers skip it and the next rollup drops
it. A row in a hole is a late window: readers count it, the next rollup merges it and closes its hole. The seqs
between a device's previous install and its new one's ``seq_base`` (``devices.seq_base``) are a jump: never a
hole, as no window of them will ever come.

Retention writers serialize on a row of ``fleet_settings`` (an upsert holds the row lock until
commit in PostgreSQL; SQLite serializes writers anyway), so a ``fleet retention`` run and the
leader's pass never merge into the same bucket at once.
Imports: nothing of edgekit.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from edgekit.fleet.store.records import selection_clauses

KEY = ("resolution", "bucket", "device", "model", "model_version", "baseline_id")
VALUES = (
    "fleet",
    "first_start",
    "last_end",
    "windows",
    "rows",
    "tested",
    "drifted",
    "labelled",
    "correct",
    "errors",
    "p99_ms_max",
    "max_ms",
    "profile",
)
_COLUMNS = ", ".join(KEY + VALUES)
_UPSERT = (
    f"INSERT INTO history ({_COLUMNS}, updated_at) VALUES ({', '.join('?' * (len(KEY) + len(VALUES) + 1))}) "
    f"ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in (*VALUES, "updated_at"))
)
_CHUNK = 500
Merge = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
# whether raw row ``s`` is in one of its device's holes: a late window, counted nowhere yet
_IN_HOLE = (
    "EXISTS (SELECT 1 FROM history_holes h WHERE h.device = s.device AND s.seq BETWEEN h.first_seq AND h.last_seq)"
)


class RowsMoved(Exception):
    """Raised inside a rollup's transaction (and caught by its caller) when rows it read are gone:
    another pass rolled them first. The transaction is rolled back; the caller reads again."""


class HistoryRecords:
    ORDER_COLUMN: str
    GREATEST: str
    atomic: Callable[[], Any]
    reading: Callable[[], Any]
    _devices_in: Callable[[list[str]], Iterator[tuple[str, list[Any]]]]  # SqlStore's: ``device <this>`` clauses

    # -- the policy ------------------------------------------------------------------------------------
    def retention_policy(self) -> dict[str, Any] | None:
        """The retention policy stored by ``edgekit fleet retention`` (None: keep everything raw)."""
        with self.reading() as db:
            row = db.execute("SELECT value FROM fleet_settings WHERE name = 'retention'").fetchone()
        return None if row is None else json.loads(row[0])

    def set_retention_policy(self, policy: dict[str, Any], now: float) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT INTO fleet_settings VALUES ('retention', ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (json.dumps(policy), now),
            )

    # -- raw windows into buckets ----------------------------------------------------------------------
    def raw_windows_before(self, cutoff: str, limit: int, *, keep_recent: int = 0) -> list[dict[str, Any]]:
        """Up to ``limit`` raw windows ending before ``cutoff``, oldest first, with their device's marks and
        whether the window is in one of its holes (``in_hole``: late, never counted).

        Never the row stored last (its rowid would be reused by SQLite and the alert evaluator's watermark
        would miss the next row), nor a device's newest ``keep_recent`` windows (what alert rules read)."""
        order = self.ORDER_COLUMN
        with self.reading() as db:
            rows = db.execute(
                f"SELECT s.{order} AS mark, s.device, s.seq, s.fleet, s.model, s.model_version, s.window_start, "
                "s.window_end, s.rows, s.drifted, s.baseline_id, s.labelled, s.payload, m.rolled_seq, m.rolled_end, "
                f"{_IN_HOLE} AS in_hole FROM summaries s LEFT JOIN history_marks m ON m.device = s.device "
                f"WHERE s.window_end < ? AND s.{order} < (SELECT max({order}) FROM summaries) "
                "AND s.seq <= (SELECT d.max_seq FROM devices d WHERE d.device = s.device) - ? "
                "ORDER BY s.window_end, s.device, s.seq LIMIT ?",
                (cutoff, keep_recent, limit),
            ).fetchall()
        return [dict(row) for row in rows]

    def replace_raw(
        self,
        marks: list[int],
        buckets: Iterable[dict[str, Any]],
        rolled: dict[str, tuple[int, str]],
        merge: Merge,
        now: float,
        merged: dict[str, list[int]] | None = None,
    ) -> bool:
        """In one transaction: delete the raw rows ``marks`` name, add ``buckets`` into what is stored,
        raise each device's marks to ``rolled`` and keep its holes (``merged``: the seqs the buckets count, per
        device). False (and nothing changed) when a row was gone already."""
        order = self.ORDER_COLUMN
        try:
            with self.atomic() as db:
                self._lock_history(db, now)
                deleted = 0
                for start in range(0, len(marks), _CHUNK):
                    chunk = marks[start : start + _CHUNK]
                    deleted += len(
                        db.execute(
                            f"DELETE FROM summaries WHERE {order} IN ({', '.join('?' * len(chunk))}) RETURNING {order}",
                            chunk,
                        ).fetchall()
                    )
                if deleted != len(marks):
                    raise RowsMoved
                self._add_buckets(db, buckets, merge, now)
                self._keep_holes(db, merged or {}, now)
                greatest = self.GREATEST
                db.executemany(
                    "INSERT INTO history_marks VALUES (?, ?, ?) ON CONFLICT (device) DO UPDATE SET "
                    f"rolled_seq = {greatest}(history_marks.rolled_seq, excluded.rolled_seq), "
                    f"rolled_end = {greatest}(history_marks.rolled_end, excluded.rolled_end)",
                    [(device, seq, end) for device, (seq, end) in sorted(rolled.items())],
                )
        except RowsMoved:
            return False
        return True

    def _keep_holes(self, db: Any, merged: dict[str, list[int]], now: float) -> None:
        """Each device's holes after its ``merged`` seqs are counted, read and written inside the rollup's
        transaction (before its marks rise): the seqs between the old mark and the new one that were not merged
        become holes (noted ``now``), and merged seqs leave the holes they filled (what is left of a hole keeps
        its age). Holes are ranges, so a device that lost windows for a day costs a row, not a row a window."""
        devices = sorted(device for device, seqs in merged.items() if seqs)
        before: dict[str, list[tuple[int, int, float | None]]] = {device: [] for device in devices}
        marks: dict[str, int] = {}
        bases: dict[str, int] = {}
        for among, chunk in self._devices_in(devices):
            marks.update(
                db.execute(f"SELECT device, rolled_seq FROM history_marks WHERE device {among}", chunk).fetchall()
            )
            bases.update(
                db.execute(
                    f"SELECT device, seq_base FROM devices WHERE device {among} AND seq_base IS NOT NULL", chunk
                ).fetchall()
            )
            for row in db.execute(
                f"SELECT device, first_seq, last_seq, noted_at FROM history_holes WHERE device {among}", chunk
            ):
                before[row[0]].append((row[1], row[2], row[3]))
        for device in devices:
            mark, seqs = marks.get(device, 0), sorted(set(merged[device]))
            holes = sorted(before[device]) + ([(mark + 1, seqs[-1], now)] if seqs[-1] > mark else [])
            after = _without(holes, seqs)
            base = bases.get(device, 0)
            if mark < base <= seqs[-1]:  # this rollup reaches a new install's numbering: the jump to it is no hole
                after = _cut(after, self._last_seq_before(db, device, base, seqs, mark) + 1, base - 1)
            if after != sorted(before[device]):
                db.execute("DELETE FROM history_holes WHERE device = ?", (device,))
                db.executemany(
                    "INSERT INTO history_holes (device, first_seq, last_seq, noted_at) VALUES (?, ?, ?, ?)",
                    [(device, *hole) for hole in after],
                )

    @staticmethod
    def _last_seq_before(db: Any, device: str, base: int, merged: list[int], mark: int) -> int:
        """The newest seq of ``device``'s previous install that is counted (``mark``, or merged now) or still
        stored raw (a late window the next rollup merges: it keeps its hole); the jump starts after it."""
        raw = db.execute("SELECT max(seq) FROM summaries WHERE device = ? AND seq < ?", (device, base)).fetchone()[0]
        return max(mark, raw or 0, max((seq for seq in merged if seq < base), default=0))

    def forget_holes(self, noted_before: float, now: float) -> int:
        """Forget the holes noted before ``noted_before``: windows that late are no longer resent by any device
        (they keep a window about an hour), so one arriving still is taken for a redelivery and dropped. Holes
        from before their age was kept count from ``now``. How many were forgotten."""
        with self.atomic() as db:
            self._lock_history(db, now)
            db.execute("UPDATE history_holes SET noted_at = ? WHERE noted_at IS NULL", (now,))
            # never one whose late window is stored and waiting (the table's newest row is not rolled up yet)
            return len(
                db.execute(
                    "DELETE FROM history_holes WHERE noted_at < ? AND NOT EXISTS (SELECT 1 FROM summaries s WHERE "
                    "s.device = history_holes.device AND s.seq BETWEEN history_holes.first_seq AND "
                    "history_holes.last_seq) RETURNING device",
                    (noted_before,),
                ).fetchall()
            )

    # -- buckets into coarser buckets, and expiry ------------------------------------------------------
    def roll_history(
        self,
        source: str,
        target: str,
        before: str,
        bucket_of: Callable[[str], str],
        merge: Merge,
        *,
        limit: int,
        now: float,
    ) -> int:
        """Up to ``limit`` ``source`` buckets older than ``before`` merged into ``target`` buckets, in one
        transaction (the buckets read are mutable, so they are read inside it); how many were rolled."""
        with self.atomic() as db:
            self._lock_history(db, now)
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM history WHERE resolution = ? AND bucket < ? ORDER BY bucket LIMIT ?",
                (source, before, limit),
            ).fetchall()
            grouped: dict[tuple[Any, ...], dict[str, Any]] = {}
            for row in rows:
                bucket = _bucket(row)
                bucket.update(resolution=target, bucket=bucket_of(bucket["bucket"]))
                key = tuple(bucket[k] for k in KEY)
                grouped[key] = merge(grouped[key], bucket) if key in grouped else bucket
            self._add_buckets(db, grouped.values(), merge, now)
            db.executemany(
                f"DELETE FROM history WHERE {' AND '.join(f'{k} = ?' for k in KEY)}",
                [tuple(row[k] for k in KEY) for row in rows],
            )
        return len(rows)

    def expire_history(self, resolution: str, before: str, *, limit: int) -> int:
        """Delete up to ``limit`` ``resolution`` buckets older than ``before``; how many."""
        with self.atomic() as db:
            rows = db.execute(
                f"SELECT {', '.join(KEY)} FROM history WHERE resolution = ? AND bucket < ? ORDER BY bucket LIMIT ?",
                (resolution, before, limit),
            ).fetchall()
            db.executemany(
                f"DELETE FROM history WHERE {' AND '.join(f'{k} = ?' for k in KEY)}", [tuple(row) for row in rows]
            )
        return len(rows)

    def _lock_history(self, db: Any, now: float) -> None:
        db.execute(
            "INSERT INTO fleet_settings VALUES ('history.lock', '', ?) "
            "ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at",
            (now,),
        )

    def _add_buckets(self, db: Any, buckets: Iterable[dict[str, Any]], merge: Merge, now: float) -> None:
        """Each bucket added into the stored one of its key (read, merged by ``merge``, written back)."""
        where = " AND ".join(f"{k} = ?" for k in KEY)
        written = []
        for bucket in buckets:
            row = db.execute(f"SELECT {_COLUMNS} FROM history WHERE {where}", [bucket[k] for k in KEY]).fetchone()
            merged = bucket if row is None else merge(_bucket(row), bucket)
            written.append(_row(merged, now))
        db.executemany(_UPSERT, written)

    # -- reads -----------------------------------------------------------------------------------------
    def history_windows(
        self,
        *,
        device: str | None = None,
        model: str | None = None,
        version: int | None = None,
        fleet: str | None = None,
        since: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every window of the selection at the resolution it is kept at: a raw window's summary
        (``resolution`` "raw"), or a bucket shaped like one (``resolution`` "hour" or "day", ``windows``
        its count). One statement, so a rollup committing meanwhile cannot count a window twice or not at
        all. ``since`` selects buckets whose last window ends at or after it: a coarse bucket starts earlier."""
        selection = {"device": device, "model": model, "version": version, "fleet": fleet, "since": since}
        raw_where, params = selection_clauses("s", "window_end", **selection)
        raw_where.insert(0, f"(m.device IS NULL OR s.seq > m.rolled_seq OR s.window_end > m.rolled_end OR {_IN_HOLE})")
        bucket_where, _ = selection_clauses("h", "last_end", **selection)
        query = (
            "SELECT 'raw' AS resolution, s.payload, s.device, s.model, s.model_version, s.baseline_id, "
            "s.window_start, s.window_end, 1 AS windows, s.rows, CAST(NULL AS TEXT) AS profile "
            "FROM summaries s LEFT JOIN history_marks m ON m.device = s.device WHERE "
            + " AND ".join(raw_where)
            + " UNION ALL SELECT h.resolution, CAST(NULL AS TEXT), h.device, h.model, h.model_version, h.baseline_id, "
            "h.first_start, h.last_end, h.windows, h.rows, h.profile FROM history h"
            + (" WHERE " + " AND ".join(bucket_where) if bucket_where else "")
            + " ORDER BY 8, 3"
        )
        with self.reading() as db:
            rows = db.execute(query, params + params).fetchall()
        for row in rows:
            if row[0] == "raw":
                yield {**json.loads(row[1]), "resolution": "raw", "windows": 1}
                continue
            yield {
                "resolution": row[0],
                "device": row[2],
                "model": {"name": row[3], "version": row[4]},
                "window": {"start": row[6], "end": row[7]},
                "windows": row[8],
                "rows": row[9],
                "profile": json.loads(row[10]) if row[10] else {"baseline_id": row[5]},
            }

    def history_buckets(self, resolution: str, **selection: Any) -> list[dict[str, Any]]:
        """The stored buckets of one resolution (``device``, ``model``, ``model_version`` equal to ...)."""
        clauses = ["resolution = ?"] + [f"{column} = ?" for column in selection]
        with self.reading() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM history WHERE {' AND '.join(clauses)} ORDER BY bucket, device",
                [resolution, *selection.values()],
            ).fetchall()
        return [_bucket(row) for row in rows]

    def history_sizes(self) -> dict[str, int]:
        """Rows kept at each resolution: raw windows, hourly and daily buckets."""
        with self.reading() as db:
            sizes = {"raw": db.execute("SELECT count(*) FROM summaries").fetchone()[0], "hour": 0, "day": 0}
            sizes.update(
                (row[0], row[1]) for row in db.execute("SELECT resolution, count(*) FROM history GROUP BY resolution")
            )
        return sizes


def _without(ranges: list[tuple[int, int, Any]], seqs: list[int]) -> list[tuple[int, int, Any]]:
    """Inclusive ``ranges`` (sorted; each with a third value, its age, that its pieces keep) less the sorted
    ``seqs``."""
    left = []
    for first, last, age in ranges:
        inside = seqs[bisect.bisect_left(seqs, first) : bisect.bisect_right(seqs, last)]
        for seq in inside:
            if seq > first:
                left.append((first, seq - 1, age))
            first = seq + 1
        if first <= last:
            left.append((first, last, age))
    return left


def _cut(ranges: list[tuple[int, int, Any]], first: int, last: int) -> list[tuple[int, int, Any]]:
    """Inclusive ``ranges`` (each with its age) less the inclusive range ``first``..``last``, which may be wide
    (a jump of a trillion seqs), so it is cut out, not walked."""
    left = []
    for lo, hi, age in ranges:
        if hi < first or lo > last:
            left.append((lo, hi, age))
            continue
        if lo < first:
            left.append((lo, first - 1, age))
        if hi > last:
            left.append((last + 1, hi, age))
    return left


def _bucket(row: Any) -> dict[str, Any]:
    bucket = {column: row[column] for column in KEY + VALUES}
    bucket["errors"] = json.loads(bucket["errors"])
    bucket["profile"] = json.loads(bucket["profile"]) if bucket["profile"] else None
    return bucket


def _row(bucket: dict[str, Any], now: float) -> tuple[Any, ...]:
    values = {
        **bucket,
        "errors": json.dumps(bucket["errors"], sort_keys=True),
        "profile": None if bucket["profile"] is None else json.dumps(bucket["profile"]),
    }
    return (*(values[column] for column in KEY + VALUES), now)
