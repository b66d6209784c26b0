"""Every SQL statement of the fleet store, in SQL that SQLite and PostgreSQL both run.

``SqlStore`` holds the statements; a subclass holds a connection: ``SqliteStore`` (``sqlite.py``) or
``PostgresStore`` (``postgres.py``). A subclass provides ``atomic()`` (one write transaction; nested
calls join it) and ``reading()`` (reads that see one state), both yielding an object with DB-API
``execute``/``executemany`` that take ``?`` and ``:name`` placeholders, rows that index by position
and by name; and three dialect names: ``GREATEST`` (SQLite's two-argument ``max``), ``ORDER_COLUMN``
(what orders summaries by commit) and ``NOW_SECONDS`` (the database's clock, which leases expire by).
Portable means: ``INSERT ... ON CONFLICT DO NOTHING``, not ``INSERT OR IGNORE``; upserts qualify the
existing row by its table; sums cast to BIGINT; JSON is parsed in Python, not with ``json_extract``.

Summaries are stored idempotently by ``(device, seq)``: a QoS 1 redelivery is counted, never stored
twice. The raw payload is kept as received; the columns a query filters on are extracted. Gaps in
each device's ``seq`` are tracked so the collector can ask for resends. Nothing here assumes one
collector: every write is an upsert or an insert-or-nothing inside a transaction.
Imports: edgekit.errors only (through the store package).
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from edgekit.fleet.store.alert_records import AlertRecords
from edgekit.fleet.store.bundle_blobs import BundleBlobs
from edgekit.fleet.store.history_records import HistoryRecords
from edgekit.fleet.store.lease_records import LeaseRecords
from edgekit.fleet.store.records import SummaryRecord, _flag, selection_clauses
from edgekit.fleet.store.rollout_records import RolloutRecords
from edgekit.fleet.store.sample_records import SampleRecords
from edgekit.fleet.store.schema import GAP_GRACE_SECONDS
from edgekit.fleet.store.timeline_records import TimelineRecords

log = logging.getLogger("edgekit.fleet")
MAX_GAP = 1000  # a jump larger than this is a reset or garbage, not a gap worth resending
GAP_MAX_REQUESTS = 150  # about 75 minutes at the default 30 s: past the devices' default hour of keeping windows
INSERT_CHUNK = 500  # summaries a multi-row INSERT (15 parameters each: under SQLite's and PostgreSQL's limits)
SUMMARY_COLUMNS = (
    "device, seq, fleet, model, model_version, window_start, window_end, received_at, rows, drifted, "
    "worst_feature, baseline_id, payload, labelled, facts"
)
_SUMMARY_ROW = "(" + ", ".join("?" * 15) + ")"


class SqlStore(
    AlertRecords, RolloutRecords, LeaseRecords, BundleBlobs, HistoryRecords, SampleRecords, TimelineRecords, abc.ABC
):
    GREATEST = "max"
    ORDER_COLUMN = "rowid"
    NOW_SECONDS = "((julianday('now') - 2440587.5) * 86400.0)"  # the database's clock, for leases

    @abc.abstractmethod
    def atomic(self) -> contextlib.AbstractContextManager[Any]:
        """One write transaction (nested calls join it), yielding the connection."""

    @abc.abstractmethod
    def reading(self) -> contextlib.AbstractContextManager[Any]:
        """Reads that see one state, yielding the connection."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------------------------------
    def record_state(self, doc: dict[str, Any], now: float) -> bool:
        """Store a device's state; False when it was ignored as another fleet's stale claim (``_STATE_APPLIES``).

        The row is keyed by device alone, and a broker replays every retained state to a collector that
        connects, in topic order: a device that moved fleets (a reflashed Pi, an emulator run again with
        another ``--fleet``) left its old fleet's state behind, and taken in that order the last one won."""
        model = doc.get("model") or {}
        issued_at = doc.get("issued_at")
        with self.atomic() as db:
            cursor = db.execute(
                f"""INSERT INTO devices (device, fleet, online, model, model_version, runtime, agent_version, state_at,
                   last_seen)
                   VALUES (:device, :fleet, :online, :model, :version, :runtime, :agent, :issued_at, :now)
                   ON CONFLICT (device) DO UPDATE SET fleet=excluded.fleet, online=excluded.online,
                   model=coalesce(excluded.model, devices.model),
                   model_version=coalesce(excluded.model_version, devices.model_version),
                   runtime=coalesce(excluded.runtime, devices.runtime), agent_version=excluded.agent_version,
                   state_at=excluded.state_at,
                   last_seen={self.GREATEST}(coalesce(devices.last_seen, 0), excluded.last_seen)
                   WHERE {_STATE_APPLIES}""",
                {
                    "device": doc["device"],
                    "fleet": doc["fleet"],
                    "online": int(doc["online"]),
                    "model": model.get("name"),
                    "version": model.get("version"),
                    "runtime": doc.get("runtime"),
                    "agent": doc.get("agent_version"),
                    "issued_at": None if issued_at is None else float(issued_at),
                    "now": now,
                },
            )
            if cursor.rowcount == 0:  # another fleet's stale claim: its last_seq counts another spool's windows
                return False
            last_seq, seq_base = doc.get("last_seq"), doc.get("seq_base")
            if isinstance(last_seq, int) and not isinstance(last_seq, bool):
                base = seq_base if isinstance(seq_base, int) and not isinstance(seq_base, bool) else None
                self._announced_gaps(db, doc["device"], last_seq, now, base)
        return True

    def _announced_gaps(self, db: Any, device: str, last_seq: int, now: float, seq_base: int | None = None) -> None:
        """A state's ``last_seq`` (the device's newest window) makes trailing losses gaps too: windows after
        the newest stored one that never arrived would otherwise never be asked for. A summary still in
        flight is covered by the gaps' grace period, and deleted from the gaps when it arrives. A new install
        (its ``seq_base`` past what is stored) counts its losses from its base, not from the old install's end."""
        row = db.execute("SELECT max_seq FROM devices WHERE device = ?", (device,)).fetchone()
        max_seq = row[0] if row else 0
        if seq_base is not None and seq_base > max_seq:
            max_seq = seq_base - 1
        if not max_seq < last_seq <= max_seq + MAX_GAP:
            return
        db.executemany(
            "INSERT INTO gaps (device, seq, found_at) SELECT ?, ?, ? WHERE NOT EXISTS "
            "(SELECT 1 FROM summaries WHERE device = ? AND seq = ?) ON CONFLICT DO NOTHING",
            [(device, s, now, device, s) for s in range(max_seq + 1, last_seq + 1)],
        )

    def record_baseline(self, doc: dict[str, Any], now: float) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT INTO baselines VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (doc["baseline_id"], doc["model"]["name"], doc["model"]["version"], json.dumps(doc["profile"]), now),
            )

    def add_summaries(self, records: list[SummaryRecord], now: float) -> tuple[int, int, list[SummaryRecord]]:
        """Store summaries; return (stored, duplicates, reused).

        One multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` a chunk tells new from redelivered
        in one round trip; the per-device bookkeeping (counters, latest verdict, seq gaps) is then a
        few batched statements for the whole batch, so a database over the network costs a handful of
        round trips a batch, not several a summary.

        A summary refused on its ``(device, seq)`` is a duplicate only if the window stored under that key is
        the same one (same start and end): one that differs is a *reused* seq, a device numbering from 1 again
        after its state dir was wiped under an agent that announces no ``seq_base``. It cannot be stored under
        that key; it is counted in ``rejects`` (``seq-reused``, in this transaction, so ``fleet status`` and
        /metrics show it) and returned for the caller to log, never hidden among the redeliveries.
        """
        with self.atomic() as db:
            new = self._insert_summaries(db, records, now)
            self._lock_devices(db, records, now)
            stored: dict[str, list[SummaryRecord]] = {}
            taken: dict[tuple[str, int], SummaryRecord] = {}  # what this batch stored, by key
            refused: list[SummaryRecord] = []
            for r in records:
                if (r.device, r.seq) in new:
                    new.discard((r.device, r.seq))  # a seq twice in one batch is stored once
                    taken[(r.device, r.seq)] = r
                    stored.setdefault(r.device, []).append(r)
                else:
                    refused.append(r)
            reused = self._reused(db, refused, taken)
            redelivered = Counter(r.device for r in refused) - Counter(r.device for r in reused)
            total = sum(len(b) for b in stored.values())
            if reused:  # a reused seq fills no gap
                reused_ids = {id(r) for r in reused}
                self._fill_gaps(db, [r for r in records if id(r) not in reused_ids])
            else:
                self._fill_gaps(db, records)
            if redelivered:
                db.executemany(
                    "UPDATE devices SET redeliveries = redeliveries + ? WHERE device = ?",
                    [(count, device) for device, count in redelivered.items()],
                )
            if reused:
                db.executemany(
                    "INSERT INTO rejects VALUES ('seq-reused', ?, ?, ?) ON CONFLICT (reason, device) "
                    "DO UPDATE SET count = rejects.count + excluded.count, last_at = excluded.last_at",
                    [(device, count, now) for device, count in sorted(Counter(r.device for r in reused).items())],
                )
            if stored:
                self._account(db, stored, now)
        return total, len(records) - total - len(reused), reused

    def _reused(
        self, db: Any, refused: list[SummaryRecord], taken: dict[tuple[str, int], SummaryRecord]
    ) -> list[SummaryRecord]:
        """Of ``refused`` (their key was stored already), those whose window is not the one stored under it."""
        if not refused:
            return []
        windows = {key: _window(r) for key, r in taken.items()}
        windows.update(self._stored_windows(db, sorted({(r.device, r.seq) for r in refused} - windows.keys())))
        return [r for r in refused if windows.get((r.device, r.seq), _window(r)) != _window(r)]

    def _stored_windows(self, db: Any, keys: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, str]]:
        """(window_start, window_end) of the stored summaries ``keys`` name: a lookup each, which SQLite answers
        in microseconds; PostgreSQL's store asks for them all in one statement."""
        found = {}
        for device, seq in keys:
            row = db.execute(
                "SELECT window_start, window_end FROM summaries WHERE device = ? AND seq = ?", (device, seq)
            ).fetchone()
            if row is not None:
                found[(device, seq)] = (row[0], row[1])
        return found

    def _insert_summaries(self, db: Any, records: list[SummaryRecord], now: float) -> set[tuple[str, int]]:
        """Insert what is new; the (device, seq) of the rows inserted. Multi-row INSERTs here; PostgreSQL's
        store overrides it with COPY, which is several times faster for payloads of kilobytes."""
        new: set[tuple[str, int]] = set()
        for start in range(0, len(records), INSERT_CHUNK):
            chunk = records[start : start + INSERT_CHUNK]
            rows = db.execute(
                f"INSERT INTO summaries ({SUMMARY_COLUMNS}) VALUES {', '.join([_SUMMARY_ROW] * len(chunk))} "
                "ON CONFLICT DO NOTHING RETURNING device, seq",
                [value for r in chunk for value in summary_values(r, now)],
            ).fetchall()
            new.update((row[0], row[1]) for row in rows)
        return new

    def _fill_gaps(self, db: Any, records: list[SummaryRecord]) -> None:
        """Whatever arrives fills its gap, a redelivery too (a gap may be noted after its window was stored).
        Gaps are few: look them up for the batch's devices and delete only those that arrived."""
        arrived = {(r.device, r.seq) for r in records}
        devices = sorted({r.device for r in records})
        filled = []
        for among, chunk in self._devices_in(devices):
            rows = db.execute(f"SELECT device, seq FROM gaps WHERE device {among}", chunk).fetchall()
            filled += [(row[0], row[1]) for row in rows if (row[0], row[1]) in arrived]
        if filled:
            db.executemany("DELETE FROM gaps WHERE device = ? AND seq = ?", filled)

    def _account(self, db: Any, stored: dict[str, list[SummaryRecord]], now: float) -> None:
        """Per device: its row (created on first sight), gaps found and filled, counters and verdict."""
        known = self._max_seqs(db, list(stored))
        new_devices, missing, updates, installs = [], [], [], []
        for device, records in sorted(stored.items()):  # in the order _lock_devices locked them
            if device not in known:
                first = records[0]
                new_devices.append((device, first.fleet, first.model, first.model_version, now))
            max_seq = known.get(device, 0)
            seqs = sorted(r.seq for r in records)
            new_max = max(max_seq, seqs[-1])
            first_missing = max_seq + 1
            base = max((r.seq_base for r in records if r.seq_base), default=0)
            if base > max_seq:  # a new install's numbering: the seqs below its base are a jump, not lost windows
                installs.append((base, device, max_seq))
                first_missing = base
            if first_missing <= new_max and new_max - first_missing < MAX_GAP:
                arrived = set(seqs)
                missing += [(device, s, now) for s in range(first_missing, new_max) if s not in arrived]
            updates.append(_device_update(device, records, max_seq, new_max, now))
        if new_devices:
            db.executemany(
                "INSERT INTO devices (device, fleet, model, model_version, last_seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (device) DO NOTHING",  # its first state may be stored by another collector meanwhile
                new_devices,
            )
        if installs:
            self._new_installs(db, installs)
        if missing:
            db.executemany("INSERT INTO gaps (device, seq, found_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", missing)
        self._update_devices(db, updates)

    def _new_installs(self, db: Any, installs: list[tuple[int, str, int]]) -> None:
        """Devices whose windows now number from a new ``seq_base`` (base, device, the max seq stored before):
        the base is kept (retention leaves the jump out of its holes), and the gaps below it are dropped: the
        old install's spool is gone, so asking for them would go on for ``GAP_MAX_REQUESTS`` rounds for nothing."""
        db.executemany("UPDATE devices SET seq_base = ? WHERE device = ?", [(b, device) for b, device, _ in installs])
        db.executemany("DELETE FROM gaps WHERE device = ? AND seq < ?", [(device, b) for b, device, _ in installs])
        for base, device, before in installs:
            if before:  # a device new to the store starts from its base too: nothing to say
                log.info("%s numbers its windows from %d (a new install; it had reached seq %d)", device, base, before)

    def _update_devices(self, db: Any, updates: list[tuple[Any, ...]]) -> None:
        """Each device's counters and verdict after a batch (``_device_update``'s parameters)."""
        db.executemany(
            f"""UPDATE devices SET max_seq=?, windows=windows+?, rows=rows+?,
               last_seen={self.GREATEST}(coalesce(last_seen, 0), ?),
               drifted=CASE WHEN ? THEN ? ELSE drifted END, worst_feature=CASE WHEN ? THEN ? ELSE worst_feature END,
               model=CASE WHEN ? AND model IS NULL THEN ? ELSE model END,
               model_version=CASE WHEN ? AND model IS NULL THEN ? ELSE model_version END
               WHERE device=?""",
            updates,
        )

    def _max_seqs(self, db: Any, devices: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for among, chunk in self._devices_in(devices):
            rows = db.execute(f"SELECT device, max_seq FROM devices WHERE device {among}", chunk).fetchall()
            found.update((r[0], r[1]) for r in rows)
        return found

    def _devices_in(self, devices: list[str]) -> Iterator[tuple[str, list[Any]]]:
        """``device <this>`` clauses with their parameters, matching ``devices`` between them: ``IN (?, ...)``
        chunks here (SQLite caps a statement's parameters); PostgreSQL's store passes one array."""
        for start in range(0, len(devices), INSERT_CHUNK):
            chunk = devices[start : start + INSERT_CHUNK]
            yield f"IN ({', '.join('?' * len(chunk))})", chunk

    def _lock_devices(self, db: Any, records: list[SummaryRecord], now: float) -> None:
        """Lock the batch's device rows (made first for devices new to the store), in one order, before their
        bookkeeping reads and updates them: writers that share devices then neither lose an update nor find
        false gaps nor deadlock. SQLite's writers are serialized already; a server database locks rows here."""

    def summary_watermark(self) -> int:
        """An increasing mark of the summaries stored so far (the largest ``ORDER_COLUMN``: SQLite's rowid, a
        sequence elsewhere; inserts only ever raise it)."""
        with self.reading() as db:
            return db.execute(f"SELECT coalesce(max({self.ORDER_COLUMN}), 0) FROM summaries").fetchone()[0]

    def devices_with_summaries_after(self, rowid: int) -> tuple[set[str], int]:
        """Devices with summaries stored after the watermark ``rowid`` (by any process on this store), and the
        new watermark. SQLite's writers are serialized, so a row committed later never has a smaller rowid than
        one already seen (PostgreSQL's store, whose writers overlap, marks by transaction id instead)."""
        order = self.ORDER_COLUMN
        with self.reading() as db:
            rows = db.execute(f"SELECT {order}, device FROM summaries WHERE {order} > ?", (rowid,)).fetchall()
        return {r[1] for r in rows}, max((r[0] for r in rows), default=rowid)

    def count_reject(self, reason: str, device: str, now: float) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT INTO rejects VALUES (?, ?, 1, ?) ON CONFLICT (reason, device) "
                "DO UPDATE SET count = rejects.count + 1, last_at = excluded.last_at",
                (reason, device or "", now),
            )

    # -- gaps ------------------------------------------------------------------------------------------
    def gaps_to_request(
        self, now: float, *, retry_after: float = 30.0, grace: float = GAP_GRACE_SECONDS, limit: int = 500
    ) -> dict[str, list[int]]:
        """Missing seqs found over ``grace`` seconds ago and not requested in the last ``retry_after``, marked
        as requested now. A seq asked for ``GAP_MAX_REQUESTS`` times is given up (the device has pruned it:
        it keeps acknowledged windows an hour by default); it still counts in ``missing_seqs``."""
        with self.atomic() as db:
            rows = db.execute(
                "SELECT device, seq FROM gaps "
                "WHERE ((requested_at IS NULL AND coalesce(found_at, 0) <= ?) OR requested_at < ?) AND requests < ? "
                "ORDER BY device, seq LIMIT ?",
                (now - grace, now - retry_after, GAP_MAX_REQUESTS, limit),
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
        with self.reading() as db:
            rows = db.execute("SELECT * FROM devices ORDER BY fleet, device").fetchall()
            gaps = dict(db.execute("SELECT device, count(*) FROM gaps GROUP BY device").fetchall())
            rejects = {}
            for row in db.execute("SELECT device, CAST(sum(count) AS BIGINT) FROM rejects GROUP BY device"):
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
        with self.reading() as db:
            return {
                row[0]: row[1]
                for row in db.execute("SELECT reason, CAST(sum(count) AS BIGINT) FROM rejects GROUP BY reason")
            }

    def summaries(
        self,
        *,
        device: str | None = None,
        model: str | None = None,
        version: int | None = None,
        fleet: str | None = None,
        since: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        clauses, params = selection_clauses(
            "summaries", "window_end", device=device, model=model, version=version, fleet=fleet, since=since
        )
        query = (
            "SELECT payload FROM summaries"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + " ORDER BY window_end, device, seq"
        )
        with self.reading() as db:
            rows = db.execute(query, params).fetchall()
        for row in rows:
            yield json.loads(row[0])

    def baseline(self, baseline_id: str) -> dict[str, Any] | None:
        with self.reading() as db:
            row = db.execute("SELECT profile FROM baselines WHERE baseline_id = ?", (baseline_id,)).fetchone()
        return None if row is None else json.loads(row[0])


# When a state replaces the device's row (``record_state``; ``devices.state_at`` holds the stored state's own
# ``issued_at``, NULL when its agent predates the field). In its fleet, always: a retained state is that topic's
# latest. Into another fleet only when it is the device's current claim:
# - an online state beats an offline one: the other fleet's instance is gone, this one is alive (comparing
#   times would not do: an offline state is the last will, stamped at connect, not when the device went away);
# - an offline state never moves a device that is online elsewhere (a retained will of the fleet it left);
# - online against online, or offline against offline: the later ``issued_at``; with either time unknown, an
#   online state still moves the device (what agents without the field need to move at all), an offline not.
_STATE_APPLIES = """devices.fleet = excluded.fleet
    OR (excluded.online = 1 AND coalesce(devices.online, 0) = 0)
    OR (excluded.online = coalesce(devices.online, 0) AND (excluded.state_at > devices.state_at
        OR ((excluded.state_at IS NULL OR devices.state_at IS NULL) AND excluded.online = 1)))"""


def _window(r: SummaryRecord) -> tuple[str, str]:
    return r.window_start, r.window_end


def summary_values(r: SummaryRecord, now: float) -> tuple[Any, ...]:
    return (
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
    )


def _device_update(
    device: str, records: list[SummaryRecord], max_seq: int, new_max: int, now: float
) -> tuple[Any, ...]:
    """The parameters of ``_account``'s UPDATE for one device.

    The verdict shown is the latest *tested* window's: a small window (say, the flush when an agent
    stops) has no verdict and must not hide the last real one. What a device serves comes from its
    retained state, which it republishes at every model swap; a summary only fills it in when no
    state has named a model yet: the last window of the model a device just swapped away from
    arrives after the new state and must not undo it."""
    tested = [r for r in records if r.seq > max_seq and r.drifted is not None]
    latest = max(tested, key=lambda r: r.seq) if tested else None
    newest = max(records, key=lambda r: r.seq)
    return (
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
    )
