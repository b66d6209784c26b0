"""The fleet store: SQLite behind a small seam (``FleetStore``), so PostgreSQL can stand in for large fleets.

Summaries are stored idempotently by ``(device, seq)``: a QoS 1 redelivery is counted, never stored
twice. The raw payload is kept as received; the columns a query filters on are extracted. Gaps in
each device's ``seq`` are tracked so the collector can ask for resends. Nothing here assumes one
collector: every write is an upsert or an insert-or-ignore inside a transaction.

The store takes a path, ``:memory:``, or an open ``sqlite3.Connection``; it runs in WAL mode and
records its migrations in the ``migrations`` table, each applied in its own transaction.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import StoreError
from edgekit.fleet.store.rollout_records import RolloutRecords
from edgekit.fleet.store.schema import GAP_GRACE_SECONDS, MIGRATIONS

MAX_GAP = 1000  # a jump larger than this is a reset or garbage, not a gap worth resending


class SqliteStore(RolloutRecords):
    def __init__(self, path: str | Path | sqlite3.Connection = ":memory:") -> None:
        if isinstance(path, sqlite3.Connection):
            self.db = path
        else:
            try:
                self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            except sqlite3.Error as exc:
                raise StoreError(
                    f"cannot open the fleet database ({exc})", "check the --db path and its directory", path=path
                ) from exc
        self._lock = threading.RLock()
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One transaction; nested calls join the outer one."""
        with self._lock:
            if self.db.in_transaction:
                yield self.db
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads that must not interleave with another thread's statements."""
        with self._lock:
            yield self.db

    def migrate(self) -> list[str]:
        with self._lock:
            self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {row[0] for row in self.db.execute("SELECT name FROM migrations")}
            applied = []
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                with self.atomic() as db:
                    for statement in filter(str.strip, sql.split(";")):
                        db.execute(statement)
                    db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
                applied.append(name)
            return applied

    # -- writes ----------------------------------------------------------------------------------------
    def record_state(self, doc: dict[str, Any], now: float) -> None:
        model = doc.get("model") or {}
        with self.atomic() as db:
            db.execute(
                """INSERT INTO devices (device, fleet, online, model, model_version, runtime, agent_version, state_at,
                   last_seen)
                   VALUES (:device, :fleet, :online, :model, :version, :runtime, :agent, :now, :now)
                   ON CONFLICT (device) DO UPDATE SET fleet=excluded.fleet, online=excluded.online,
                   model=coalesce(excluded.model, model), model_version=coalesce(excluded.model_version, model_version),
                   runtime=coalesce(excluded.runtime, runtime), agent_version=excluded.agent_version,
                   state_at=excluded.state_at, last_seen=max(coalesce(last_seen, 0), excluded.last_seen)""",
                {
                    "device": doc["device"],
                    "fleet": doc["fleet"],
                    "online": int(doc["online"]),
                    "model": model.get("name"),
                    "version": model.get("version"),
                    "runtime": doc.get("runtime"),
                    "agent": doc.get("agent_version"),
                    "now": now,
                },
            )

    def record_baseline(self, doc: dict[str, Any], now: float) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT OR IGNORE INTO baselines VALUES (?, ?, ?, ?, ?)",
                (doc["baseline_id"], doc["model"]["name"], doc["model"]["version"], json.dumps(doc["profile"]), now),
            )

    def add_summaries(self, records: list[SummaryRecord], now: float) -> tuple[int, int]:
        """Store summaries; return (stored, duplicates).

        One INSERT OR IGNORE per summary tells new from redelivered; the per-device bookkeeping
        (counters, latest verdict, seq gaps) is then done once per device for the whole batch.
        """
        stored: dict[str, list[SummaryRecord]] = {}
        redelivered: dict[str, int] = {}
        with self.atomic() as db:
            for r in records:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO summaries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        r.device,
                        r.seq,
                        r.fleet,
                        r.model,
                        r.model_version,
                        r.window_start,
                        r.window_end,
                        now,
                        r.rows,
                        _flag(r.drifted),
                        r.worst_feature,
                        r.baseline_id,
                        r.payload,
                        r.labelled,
                        r.facts,
                    ),
                )
                if cursor.rowcount:
                    stored.setdefault(r.device, []).append(r)
                else:
                    redelivered[r.device] = redelivered.get(r.device, 0) + 1
            for device, count in redelivered.items():
                db.execute("UPDATE devices SET redeliveries = redeliveries + ? WHERE device = ?", (count, device))
            for device, batch in stored.items():
                self._account(db, device, batch, now)
        total = sum(len(b) for b in stored.values())
        return total, len(records) - total

    def _account(self, db: sqlite3.Connection, device: str, records: list[SummaryRecord], now: float) -> None:
        row = db.execute("SELECT max_seq FROM devices WHERE device = ?", (device,)).fetchone()
        max_seq = row["max_seq"] if row else 0
        first = records[0]
        if row is None:
            db.execute(
                "INSERT INTO devices (device, fleet, model, model_version, last_seen) VALUES (?, ?, ?, ?, ?)",
                (device, first.fleet, first.model, first.model_version, now),
            )
        seqs = sorted(r.seq for r in records)
        new_max = max(max_seq, seqs[-1])
        filled = [s for s in seqs if s <= max_seq]
        if filled:
            db.executemany("DELETE FROM gaps WHERE device = ? AND seq = ?", [(device, s) for s in filled])
        if new_max > max_seq and new_max - max_seq <= MAX_GAP:
            arrived = set(seqs)
            missing = [(device, s) for s in range(max_seq + 1, new_max) if s not in arrived]
            if missing:
                db.executemany(
                    "INSERT OR IGNORE INTO gaps (device, seq, found_at) VALUES (?, ?, ?)", [(*m, now) for m in missing]
                )
        # The verdict shown is the latest *tested* window's: a small window (say, the flush when an
        # agent stops) has no verdict and must not hide the last real one.
        tested = [r for r in records if r.seq > max_seq and r.drifted is not None]
        latest = max(tested, key=lambda r: r.seq) if tested else None
        # What a device serves comes from its retained state, which it republishes at every model swap.
        # A summary only fills it in when no state has named a model yet: the last window of the
        # model a device just swapped away from arrives after the new state and must not undo it.
        newest = max(records, key=lambda r: r.seq)
        db.execute(
            """UPDATE devices SET max_seq=?, windows=windows+?, rows=rows+?, last_seen=max(coalesce(last_seen, 0), ?),
               drifted=CASE WHEN ? THEN ? ELSE drifted END, worst_feature=CASE WHEN ? THEN ? ELSE worst_feature END,
               model=CASE WHEN ? AND model IS NULL THEN ? ELSE model END,
               model_version=CASE WHEN ? AND model IS NULL THEN ? ELSE model_version END
               WHERE device=?""",
            (
                new_max,
                len(records),
                sum(r.rows for r in records),
                now,
                latest is not None,
                _flag(latest.drifted) if latest else None,
                latest is not None,
                latest.worst_feature if latest else None,
                newest.seq > max_seq,
                newest.model,
                newest.seq > max_seq,
                newest.model_version,
                device,
            ),
        )

    def summary_watermark(self) -> int:
        """An increasing mark of the summaries stored so far (SQLite: the largest rowid; inserts only ever raise it)."""
        with self._lock:
            return self.db.execute("SELECT coalesce(max(rowid), 0) FROM summaries").fetchone()[0]

    def devices_with_summaries_after(self, rowid: int) -> tuple[set[str], int]:
        """Devices with summaries stored after the watermark ``rowid`` (by any process on this store), and the
        new watermark. Writers are serialized, so a row committed later never has a smaller rowid than one
        already seen."""
        with self._lock:
            rows = self.db.execute("SELECT rowid, device FROM summaries WHERE rowid > ?", (rowid,)).fetchall()
        return {r[1] for r in rows}, max((r[0] for r in rows), default=rowid)

    def count_reject(self, reason: str, device: str, now: float) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT INTO rejects VALUES (?, ?, 1, ?) ON CONFLICT (reason, device) "
                "DO UPDATE SET count = count + 1, last_at = excluded.last_at",
                (reason, device or "", now),
            )

    # -- gaps ------------------------------------------------------------------------------------------
    def gaps_to_request(
        self, now: float, *, retry_after: float = 30.0, grace: float = GAP_GRACE_SECONDS, limit: int = 500
    ) -> dict[str, list[int]]:
        """Missing seqs found over ``grace`` seconds ago and not requested in the last ``retry_after``, marked
        as requested now."""
        with self.atomic() as db:
            rows = db.execute(
                "SELECT device, seq FROM gaps "
                "WHERE (requested_at IS NULL AND coalesce(found_at, 0) <= ?) OR requested_at < ? "
                "ORDER BY device, seq LIMIT ?",
                (now - grace, now - retry_after, limit),
            ).fetchall()
            db.executemany(
                "UPDATE gaps SET requested_at = ?, requests = requests + 1 WHERE device = ? AND seq = ?",
                [(now, r["device"], r["seq"]) for r in rows],
            )
        wanted: dict[str, list[int]] = {}
        for row in rows:
            wanted.setdefault(row["device"], []).append(row["seq"])
        return wanted

    # -- reads -----------------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM devices ORDER BY fleet, device").fetchall()
            gaps = dict(self.db.execute("SELECT device, count(*) FROM gaps GROUP BY device").fetchall())
            rejects = {}
            for row in self.db.execute("SELECT device, sum(count) FROM rejects GROUP BY device"):
                rejects[row[0]] = row[1]
        return [
            {
                "device": r["device"],
                "fleet": r["fleet"],
                "online": None if r["online"] is None else bool(r["online"]),
                "model": r["model"],
                "model_version": r["model_version"],
                "last_seen": r["last_seen"],
                "windows": r["windows"],
                "rows": r["rows"],
                "drifted": None if r["drifted"] is None else bool(r["drifted"]),
                "worst_feature": r["worst_feature"],
                "missing_seqs": gaps.get(r["device"], 0),
                "redeliveries": r["redeliveries"],
                "rejected": rejects.get(r["device"], 0),
                "runtime": r["runtime"],
                "agent_version": r["agent_version"],
            }
            for r in rows
        ]

    def rejects(self) -> dict[str, int]:
        with self._lock:
            return {row[0]: row[1] for row in self.db.execute("SELECT reason, sum(count) FROM rejects GROUP BY reason")}

    def summaries(
        self,
        *,
        device: str | None = None,
        model: str | None = None,
        version: int | None = None,
        fleet: str | None = None,
        since: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        clauses, params = [], []
        for column, value in (("device", device), ("model", model), ("model_version", version), ("fleet", fleet)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("window_end >= ?")
            params.append(since)
        query = (
            "SELECT payload FROM summaries"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + " ORDER BY window_end, device, seq"
        )
        with self._lock:
            rows = self.db.execute(query, params).fetchall()
        for row in rows:
            yield json.loads(row[0])

    def baseline(self, baseline_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute("SELECT profile FROM baselines WHERE baseline_id = ?", (baseline_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def recent_facts(self, device: str, count: int) -> list[dict[str, Any]]:
        """The alert facts of the device's last ``count`` windows, newest first."""
        with self._lock:
            rows = self.db.execute(
                "SELECT facts FROM summaries WHERE device = ? ORDER BY seq DESC LIMIT ?", (device, count)
            ).fetchall()
        return [_read_facts(r[0]) for r in rows]

    def labelled_accuracy(
        self, device: str, model: str, version: int, *, limit: int = 50
    ) -> list[tuple[int, float, int]]:
        """(seq, accuracy, labelled) of the device's last ``limit`` windows that received delayed labels,
        oldest first."""
        with self._lock:
            rows = self.db.execute(
                "SELECT seq, json_extract(facts, '$.accuracy'), labelled FROM summaries "
                "WHERE device = ? AND model = ? AND model_version = ? AND labelled > 0 ORDER BY seq DESC LIMIT ?",
                (device, model, version, limit),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in reversed(rows)]

    # -- alerts ----------------------------------------------------------------------------------------
    def open_alert(
        self, rule: str, device: str, subject: str, message: str, evidence: dict[str, Any], now: float
    ) -> bool:
        """Open an alert, or refresh the open one; True when it is new."""
        with self.atomic() as db:
            cursor = db.execute(
                "UPDATE alerts SET updated_at = ?, message = ?, evidence = ? "
                "WHERE rule = ? AND device = ? AND subject = ? AND state = 'open'",
                (now, message, json.dumps(evidence), rule, device, subject),
            )
            if cursor.rowcount:
                return False
            db.execute(
                "INSERT INTO alerts (rule, device, subject, state, opened_at, updated_at, message, evidence) "
                "VALUES (?, ?, ?, 'open', ?, ?, ?, ?)",
                (rule, device, subject, now, now, message, json.dumps(evidence)),
            )
            return True

    def close_alert(self, rule: str, device: str, subject: str, now: float) -> bool:
        with self.atomic() as db:
            cursor = db.execute(
                "UPDATE alerts SET state = 'closed', closed_at = ?, updated_at = ? "
                "WHERE rule = ? AND device = ? AND subject = ? AND state = 'open'",
                (now, now, rule, device, subject),
            )
            return cursor.rowcount > 0

    def open_alerts_of(self, device: str) -> set[tuple[str, str]]:
        with self._lock:
            return {
                (r[0], r[1])
                for r in self.db.execute(
                    "SELECT rule, subject FROM alerts WHERE device = ? AND state = 'open'", (device,)
                )
            }

    def alerts(self, *, open_only: bool = False, limit: int = 200) -> list[dict[str, Any]]:
        query = (
            "SELECT * FROM alerts"
            + (" WHERE state = 'open'" if open_only else "")
            + " ORDER BY state DESC, updated_at DESC LIMIT ?"
        )
        with self._lock:
            rows = self.db.execute(query, (limit,)).fetchall()
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in rows]

    def close(self) -> None:
        with self._lock:
            self.db.close()


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """What the store keeps of one checked summary: the raw payload and the columns queries use.

    The ingestor turns each parsed summary into one of these at once, so a batch in flight holds a
    few small objects per summary instead of the thousand-odd dicts and lists of the parsed JSON
    (keeping those alive made the cyclic garbage collector, not SQLite, the ingest bottleneck)."""

    device: str
    seq: int
    fleet: str
    model: str
    model_version: int
    window_start: str
    window_end: str
    rows: int
    drifted: bool | None
    worst_feature: str | None
    baseline_id: str
    labelled: int
    facts: str  # JSON of alert_facts
    payload: str

    @classmethod
    def of(cls, doc: dict[str, Any], payload: str) -> SummaryRecord:
        """From a summary that passed ``check_summary``."""
        drift, accuracy = doc["drift"], doc.get("accuracy") or {}
        return cls(
            doc["device"],
            doc["seq"],
            doc["fleet"],
            doc["model"]["name"],
            doc["model"]["version"],
            doc["window"]["start"],
            doc["window"]["end"],
            doc["rows"],
            drift.get("drifted"),
            drift.get("worst_feature"),
            doc["profile"]["baseline_id"],
            accuracy.get("labelled", 0),
            json.dumps(alert_facts(doc)),
            payload,
        )


def alert_facts(doc: dict[str, Any]) -> dict[str, Any]:
    """The few fields of a summary that alert rules read, small enough to load by the thousand."""
    drift, accuracy = doc["drift"], doc.get("accuracy") or {}
    return {
        "seq": doc["seq"],
        "window": doc["window"],
        "rows": doc["rows"],
        "model": doc["model"],
        "tested": drift.get("drifted") is not None,
        "drifted": {name: v.get("psi") for name, v in drift["features"].items() if v.get("drifted")},
        "prediction_drifted": bool((drift.get("prediction") or {}).get("drifted")),
        "predictions": doc.get("predictions"),
        "null_rate": doc["quality"].get("null_rate") or 0.0,
        "unseen_rate": doc["quality"].get("unseen_rate") or 0.0,
        "unseen_columns": _unseen_columns(doc),
        "p99_ms": doc["latency"].get("p99_ms"),
        "errors": doc["errors"],
        "accuracy": accuracy.get("accuracy"),
    }


def _read_facts(text: str) -> dict[str, Any]:
    """Stored facts, with what a row older than the rule reading it lacks filled in: ``edgekit.summary/1``
    knew no unseen categories, so its rows count as 0 (read so, not rewritten by a migration)."""
    return {"unseen_rate": 0.0, "unseen_columns": {}, **json.loads(text)}


def _unseen_columns(doc: dict[str, Any]) -> dict[str, float]:
    """Per categorical column with any, the share of the window's rows holding a value the baseline never
    saw: the third count of its compact sketch (``[counts, nulls, unseen]``, ``edgekit.summary/2``), named
    by ``drift.features``, which the device lists in the same (schema) order. ``check_summary`` checks
    neither the sketches' shape nor that the two agree, so anything else yields nothing rather than
    failing the batch."""
    names, sketches, rows = list(doc["drift"]["features"]), doc["profile"]["features"], doc["profile"]["rows"]
    if len(names) != len(sketches) or rows <= 0:
        return {}
    found = {}
    for name, sketch in zip(names, sketches, strict=True):
        unseen = sketch[2] if isinstance(sketch, list) and len(sketch) == 3 else None
        if isinstance(unseen, int) and not isinstance(unseen, bool) and unseen > 0:
            found[name] = round(unseen / rows, 4)
    return found


def _flag(value: Any) -> int | None:
    return None if value is None else int(bool(value))
