"""The fleet store in PostgreSQL, for fleets past one machine: several collectors share one database.

The statements are ``SqlStore``'s (``sql.py``), written once for both databases; this module holds
the connections and translates: ``?`` and ``:name`` placeholders become psycopg's ``%s`` and
``%(name)s``, rows index by position and by name (as ``sqlite3.Row``), and the schema's migrations
take PostgreSQL's types (``schema.statements``). psycopg 3 is an optional dependency (the
``postgres`` extra), imported when a ``postgresql://`` URL is opened.

Two connections, each behind its own lock: writes (``atomic``: one transaction, nested calls join
it) and reads (``reading``: one read-only transaction, so a page sees one state), so the dashboard
never waits behind an ingest batch. ``executemany`` runs in psycopg's pipeline mode: a batch of
updates is one round trip, not one a row.

Summary writers run in parallel: nothing serializes them. The alert evaluator's watermark is not a
summary ``id`` (a sequence's values commit out of order when writers overlap) but the id of the
oldest transaction still running when it last looked (``pg_snapshot_xmin``): each summary row keeps
the id of the transaction that wrote it (``xact``, migration 0013), and every transaction below the
watermark had ended before the last look, so rows not seen then have ``xact`` at or above it
(``devices_with_summaries_after``; tests/test_pg_watermark.py). Migrations take an advisory lock, so
collectors that start together apply them once.

A batch is one binary COPY straight into ``summaries`` (through a session's temporary table and ``INSERT ...
ON CONFLICT DO NOTHING RETURNING`` when it holds a window already stored); the per-device bookkeeping and the
alert pass's reads and writes are a few statements that each take the batch's devices as one array, not
one statement a device.

A lost connection (the server restarted, a network cut) raises ``StoreUnavailable`` and the
connection is dropped; the next call connects again. Nothing is committed half: the collector
acknowledges a batch to the broker only after its commit, and retries it with backoff.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from edgekit.errors import MissingDependencyError, StoreDataError, StoreError, StoreUnavailable
from edgekit.fleet.store.alert_records import AlertKey, AlertOpening, LabelledKey, _labelled
from edgekit.fleet.store.records import SummaryRecord, _read_facts
from edgekit.fleet.store.schema import MIGRATIONS, statements
from edgekit.fleet.store.sql import SUMMARY_COLUMNS, SqlStore, summary_values

MIGRATION_LOCK = 0x6564_6B01  # advisory lock key ("edk" and a number)
CONNECT_TIMEOUT_SECONDS = 10
REDELIVERY_BURST_SECONDS = 30.0  # after a batch that held a stored window, the temporary table this long
URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: str) -> bool:
    return str(db).startswith(URL_SCHEMES)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise MissingDependencyError(
            "a postgresql:// fleet database needs psycopg 3", "pip install 'edgekit-ml[postgres]'"
        ) from exc
    return psycopg


class PostgresStore(SqlStore):
    GREATEST = "greatest"
    ORDER_COLUMN = "id"
    # clock_timestamp(), not now(): now() is the transaction's start
    NOW_SECONDS = "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"

    def __init__(self, url: str) -> None:
        self.url = url
        self._psycopg = _psycopg()
        self._write_lock, self._read_lock = threading.RLock(), threading.RLock()
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None
        self._depth = 0
        self._straight_copy_after = 0.0  # (monotonic) until then, batches go through the temporary table
        try:
            self.migrate()
        except StoreUnavailable as exc:
            raise StoreError(
                f"cannot open the fleet database ({exc.problem})",
                "check the --db URL (postgresql://user@host:port/database) and that the server is up",
            ) from exc

    # -- connections ----------------------------------------------------------------------------------
    def _connect(self) -> _Connection:
        psycopg = self._psycopg
        try:
            raw = psycopg.connect(
                self.url, autocommit=True, row_factory=_row_maker, connect_timeout=CONNECT_TIMEOUT_SECONDS
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL ({_first_line(exc)})", "it is retried") from exc
        # payloads (kilobytes of JSON) compressed with lz4: about 4x faster to write than the default pglz;
        # a server built without lz4 keeps pglz
        with contextlib.suppress(psycopg.Error):
            raw.execute("SET default_toast_compression = 'lz4'")
        return _Connection(raw)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[_Connection]:
        """One write transaction; nested calls join the outer one."""
        with self._write_lock:
            if self._depth:
                yield self._writer
                return
            if self._writer is None or self._writer.raw.closed:
                self._writer = self._connect()
            connection = self._writer
            self._depth += 1
            try:
                with self._translated("_writer"), connection.raw.transaction():
                    yield connection
            finally:
                self._depth -= 1

    @contextlib.contextmanager
    def reading(self) -> Iterator[_Connection]:
        """One read-only transaction on the reading connection: the statements inside see one state."""
        with self._read_lock:
            if self._reader is None or self._reader.raw.closed:
                self._reader = self._connect()
            connection = self._reader
            with self._translated("_reader"), connection.raw.transaction():
                yield connection

    @contextlib.contextmanager
    def _translated(self, which: str) -> Iterator[None]:
        """psycopg's errors as the store's; a connection that failed is dropped, to be opened again."""
        psycopg = self._psycopg
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop(which)
            raise StoreUnavailable(f"PostgreSQL: {_first_line(exc)}", "it is retried") from exc
        except psycopg.Error as exc:
            raise StoreDataError(f"PostgreSQL refused this ({_first_line(exc)})", "") from exc

    def _drop(self, which: str) -> None:
        connection = getattr(self, which)
        setattr(self, which, None)
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.raw.close()

    def migrate(self) -> list[str]:
        applied = []
        with self.atomic() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            db.execute(
                "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {row[0] for row in db.execute("SELECT name FROM migrations")}
            for name, migration in MIGRATIONS:
                if name in done:
                    continue
                for statement in statements(migration, "postgresql"):
                    db.execute(statement)
                db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
                applied.append(name)
        return applied

    # -- summaries -----------------------------------------------------------------------------------
    def summary_watermark(self) -> int:
        """The oldest transaction id still running: every summary committed before now was written below it."""
        with self.reading() as db:
            return db.execute(_OLDEST_RUNNING).fetchone()[0]

    def devices_with_summaries_after(self, rowid: int) -> tuple[set[str], int]:
        """Devices with summaries committed since the watermark ``rowid`` was taken (some seen again: harmless,
        the rules are evaluated twice), and the new watermark. The watermark is read before the rows, by an
        earlier snapshot: a transaction below it has ended before the rows are read, so they show it; any
        other transaction's rows are at or above it and are read next time."""
        with self.reading() as db:
            mark = db.execute(_OLDEST_RUNNING).fetchone()[0]
            rows = db.execute(
                "SELECT DISTINCT device FROM summaries WHERE xact >= CAST(CAST(? AS TEXT) AS xid8)", (rowid,)
            ).fetchall()
        return {r[0] for r in rows}, max(mark, rowid)

    def _insert_summaries(self, db: Any, records: list[SummaryRecord], now: float) -> set[tuple[str, int]]:
        """COPY the batch straight into ``summaries``, in a savepoint; a batch holding a window the table already
        has (a redelivery) fails that COPY on the primary key, and is then inserted through a temporary table
        with ``ON CONFLICT DO NOTHING``, as is every batch for ``REDELIVERY_BURST_SECONDS`` after. Redeliveries
        are rare outside such bursts, and the straight COPY costs the server about a third less (61 against
        96 µs a 9 KB summary, measured): no temporary copy of kilobytes of JSON, no second statement. Binary
        COPY: the server parses no text escapes."""
        if time.monotonic() >= self._straight_copy_after:
            try:
                with db.raw.transaction():
                    self._copy_into(db, "summaries", records, now)
                return {(record.device, record.seq) for record in records}
            except self._psycopg.errors.UniqueViolation:
                # redeliveries come in bursts (a collector failed over, devices resending their spools): for a
                # while, straight to the temporary table, not a COPY rolled back (and its dead rows) a batch
                self._straight_copy_after = time.monotonic() + REDELIVERY_BURST_SECONDS
        db.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS incoming_summaries AS SELECT {SUMMARY_COLUMNS} FROM summaries "
            "WITH NO DATA"
        )
        db.execute("TRUNCATE incoming_summaries")
        self._copy_into(db, "incoming_summaries", records, now)
        rows = db.execute(
            f"INSERT INTO summaries ({SUMMARY_COLUMNS}) SELECT {SUMMARY_COLUMNS} FROM incoming_summaries "
            "ON CONFLICT DO NOTHING RETURNING device, seq"
        ).fetchall()
        return {(row[0], row[1]) for row in rows}

    @staticmethod
    def _copy_into(db: Any, table: str, records: list[SummaryRecord], now: float) -> None:
        sql = f"COPY {table} ({SUMMARY_COLUMNS}) FROM STDIN (FORMAT BINARY)"
        with db.raw.cursor() as cursor, cursor.copy(sql) as copy:
            copy.set_types(_SUMMARY_TYPES)
            for record in records:
                copy.write_row(summary_values(record, now))

    def _lock_devices(self, db: Any, records: list[SummaryRecord], now: float) -> None:
        """Taken after the batch's summaries are inserted: collectors insert in parallel and queue only for the
        bookkeeping of devices they share. A device seen for the first time gets its row here, so that it can
        be locked too (a second writer's insert of it waits for this one's commit); rows are made, then
        locked, in device order, so no two writers deadlock."""
        first: dict[str, SummaryRecord] = {}
        for record in records:
            first.setdefault(record.device, record)
        devices = sorted(first)
        db.execute(
            "INSERT INTO devices (device, fleet, model, model_version, last_seen) "
            "SELECT * FROM unnest(CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS BIGINT[]), "
            "CAST(? AS DOUBLE PRECISION[])) ORDER BY 1 ON CONFLICT (device) DO NOTHING",
            (
                devices,
                [first[d].fleet for d in devices],
                [first[d].model for d in devices],
                [first[d].model_version for d in devices],
                [now] * len(devices),
            ),
        )
        db.execute("SELECT 1 FROM devices WHERE device = ANY(?) ORDER BY device FOR UPDATE", (devices,))

    def _stored_windows(self, db: Any, keys: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, str]]:
        """``SqlStore._stored_windows`` in one statement: a redelivery burst asks for hundreds of keys a batch."""
        if not keys:
            return {}
        rows = db.execute(
            "SELECT s.device, s.seq, s.window_start, s.window_end FROM unnest(CAST(? AS TEXT[]), CAST(? AS BIGINT[])) "
            "AS k(device, seq) JOIN summaries s ON s.device = k.device AND s.seq = k.seq",
            ([k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
        return {(row[0], row[1]): (row[2], row[3]) for row in rows}

    def _devices_in(self, devices: list[str]) -> Iterator[tuple[str, list[Any]]]:
        yield "= ANY(?)", [devices]  # one array parameter: no statement of a thousand placeholders to parse

    def _update_devices(self, db: Any, updates: list[tuple[Any, ...]]) -> None:
        """``SqlStore._update_devices`` as one statement over arrays, not one UPDATE a device."""
        if updates:
            db.execute(_UPDATE_DEVICES, _columns(updates))

    # -- alerts: one statement a read or write of a whole pass (alert_records.py) ---------------------
    def recent_facts_of(self, devices: list[str], count: int) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {device: [] for device in devices}
        with self.reading() as db:
            rows = db.execute(
                "SELECT d.device, s.facts FROM unnest(CAST(? AS TEXT[])) AS d(device) CROSS JOIN LATERAL "
                "(SELECT seq, facts FROM summaries WHERE summaries.device = d.device ORDER BY seq DESC LIMIT ?) AS s "
                "ORDER BY d.device, s.seq DESC",
                (list(devices), count),
            ).fetchall()
        for device, facts in rows:
            found[device].append(_read_facts(facts))
        return found

    def labelled_accuracy_of(
        self, keys: list[LabelledKey], *, limit: int = 50
    ) -> dict[LabelledKey, list[tuple[int, float, int]]]:
        rows: dict[LabelledKey, list[Any]] = {key: [] for key in keys}
        if keys:
            with self.reading() as db:
                for device, model, version, *row in db.execute(
                    "SELECT k.device, k.model, k.version, s.seq, s.facts, s.labelled FROM unnest(CAST(? AS TEXT[]), "
                    "CAST(? AS TEXT[]), CAST(? AS BIGINT[])) AS k(device, model, version) CROSS JOIN LATERAL "
                    "(SELECT seq, facts, labelled FROM summaries WHERE summaries.device = k.device AND "
                    "summaries.model = k.model AND summaries.model_version = k.version AND labelled > 0 "
                    "ORDER BY seq DESC LIMIT ?) AS s ORDER BY k.device, k.model, k.version, s.seq DESC",
                    ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], limit),
                ):
                    rows[(device, model, version)].append(row)
        return {key: _labelled(found) for key, found in rows.items()}

    def apply_alerts(
        self, opens: list[AlertOpening], closes: list[AlertKey], now: float
    ) -> tuple[set[AlertKey], set[AlertKey]]:
        """``AlertRecords.apply_alerts`` in three statements over arrays: refresh the open ones, insert the rest,
        close."""
        opened: set[AlertKey] = set()
        closed: set[AlertKey] = set()
        with self.atomic() as db:
            if opens:
                rows = {o[:3]: (*o[:4], json.dumps(o[4])) for o in opens}  # one JSON text an alert, used twice
                refreshed = {
                    tuple(row)
                    for row in db.execute(
                        "UPDATE alerts SET updated_at = ?, message = u.message, evidence = u.evidence "
                        f"FROM {_ALERT_ARRAYS} WHERE {_ALERT_MATCH} RETURNING alerts.rule, alerts.device, "
                        "alerts.subject",
                        (now, *_columns(rows.values())),
                    )
                }
                opened = set(rows) - refreshed
                if opened:
                    db.execute(
                        "INSERT INTO alerts (rule, device, subject, state, opened_at, updated_at, message, evidence) "
                        f"SELECT u.rule, u.device, u.subject, 'open', ?, ?, u.message, u.evidence FROM {_ALERT_ARRAYS}",
                        (now, now, *_columns(row for key, row in rows.items() if key in opened)),
                    )
            if closes:
                closed = {
                    tuple(row)
                    for row in db.execute(
                        "UPDATE alerts SET state = 'closed', closed_at = ?, updated_at = ? FROM unnest(CAST(? AS "
                        "TEXT[]), CAST(? AS TEXT[]), CAST(? AS TEXT[])) AS u(rule, device, subject) "
                        f"WHERE {_ALERT_MATCH} RETURNING alerts.rule, alerts.device, alerts.subject",
                        (now, now, *_columns(closes)),
                    )
                }
        return opened, closed

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._drop("_writer")
            self._drop("_reader")


# the parameters of SqlStore._update_devices (sql._device_update), in order
_DEVICE_UPDATE_TYPES = (
    "bigint", "bigint", "bigint", "double precision", "boolean", "bigint", "boolean", "text", "boolean", "text",
    "boolean", "bigint", "text",
)  # fmt: skip


def _columns(rows: Any) -> list[list[Any]]:
    """Rows of equal length as one list a column: the arrays an ``unnest(...)`` statement takes."""
    return [list(column) for column in zip(*rows, strict=True)]


_ALERT_ARRAYS = (
    "unnest(CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS TEXT[])) "
    "AS u(rule, device, subject, message, evidence)"
)
_ALERT_MATCH = (
    "alerts.rule = u.rule AND alerts.device = u.device AND alerts.subject = u.subject AND alerts.state = 'open'"
)
_OLDEST_RUNNING = "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT)"
# SUMMARY_COLUMNS' types in PostgreSQL (schema.postgres_ddl), which binary COPY needs exactly
_SUMMARY_TYPES = [
    "text", "int8", "text", "text", "int8", "text", "text", "float8", "int8", "int8", "text", "text", "text", "int8",
    "text",
]  # fmt: skip
_UPDATE_DEVICES = f"""UPDATE devices SET max_seq=u.max_seq, windows=devices.windows+u.windows, rows=devices.rows+u.rows,
    last_seen=greatest(coalesce(devices.last_seen, 0), u.seen),
    drifted=CASE WHEN u.tested THEN u.drifted ELSE devices.drifted END,
    worst_feature=CASE WHEN u.tested THEN u.worst ELSE devices.worst_feature END,
    model=CASE WHEN u.newer AND devices.model IS NULL THEN u.model ELSE devices.model END,
    model_version=CASE WHEN u.newer AND devices.model IS NULL THEN u.version ELSE devices.model_version END
    FROM unnest({", ".join(f"CAST(? AS {t}[])" for t in _DEVICE_UPDATE_TYPES)})
    AS u(max_seq, windows, rows, seen, tested, drifted, tested_again, worst, newer, model, newer_again, version, device)
    WHERE devices.device = u.device"""


class _Connection:
    """A psycopg connection that speaks the store's placeholders (``?``, ``:name``)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
        return self.raw.execute(postgres_sql(sql), params)

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        params = list(params)
        if params:
            with self.raw.cursor() as cursor:
                cursor.executemany(postgres_sql(sql), params)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def postgres_sql(sql: str) -> str:
    """The store's SQL with psycopg's placeholders (the store's statements hold no ``?`` or ``:`` in literals)."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%").replace("?", "%s"))


class Row(tuple):
    """A result row that indexes by position and by column name, and converts with ``dict(row)``."""

    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        return tuple.__getitem__(self, self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"_index": {name: i for i, name in enumerate(names)}})


def _row_maker(cursor: Any) -> Any:
    """psycopg's row factory: called per result with its cursor, returns what makes each row."""
    return _row_class(tuple(column.name for column in cursor.description or ()))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
