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

Summary writers take a transaction-scoped advisory lock (``_serialize_summary_writes``), so that
summaries commit in the order of their ``id`` sequence and the alert evaluator's watermark never
skips a row another collector committed late; migrations take another, so collectors that start
together apply them once.

A lost connection (the server restarted, a network cut) raises ``StoreUnavailable`` and the
connection is dropped; the next call connects again. Nothing is committed half: the collector
acknowledges a batch to the broker only after its commit, and retries it with backoff.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from edgekit.errors import MissingDependencyError, StoreDataError, StoreError, StoreUnavailable
from edgekit.fleet.store.records import SummaryRecord
from edgekit.fleet.store.schema import MIGRATIONS, statements
from edgekit.fleet.store.sql import SUMMARY_COLUMNS, SqlStore, summary_values

MIGRATION_LOCK = 0x6564_6B01  # advisory lock keys ("edk" and a number), one per purpose
SUMMARY_LOCK = 0x6564_6B02
CONNECT_TIMEOUT_SECONDS = 10
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

    def _serialize_summary_writes(self, db: Any) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (SUMMARY_LOCK,))

    def _insert_summaries(self, db: Any, records: list[SummaryRecord], now: float) -> set[tuple[str, int]]:
        """COPY the batch into a session's temporary table, then insert what is new from it: one COPY
        and one statement a batch, where multi-row INSERTs spent most of their time in parameter handling."""
        db.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS incoming_summaries AS SELECT {SUMMARY_COLUMNS} FROM summaries "
            "WITH NO DATA"
        )
        db.execute("TRUNCATE incoming_summaries")
        with db.raw.cursor() as cursor, cursor.copy(f"COPY incoming_summaries ({SUMMARY_COLUMNS}) FROM STDIN") as copy:
            for record in records:
                copy.write_row(summary_values(record, now))
        rows = db.execute(
            f"INSERT INTO summaries ({SUMMARY_COLUMNS}) SELECT {SUMMARY_COLUMNS} FROM incoming_summaries "
            "ON CONFLICT DO NOTHING RETURNING device, seq"
        ).fetchall()
        return {(row[0], row[1]) for row in rows}

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._drop("_writer")
            self._drop("_reader")


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
