"""The fleet store in SQLite: one file (or ``:memory:``), for a fleet one machine serves.

The statements are ``SqlStore``'s (``sql.py``); this module holds the connection. It takes a path,
``:memory:``, or an open ``sqlite3.Connection``; it runs in WAL mode, so several collector processes
can share the file (writers take turns: ``BEGIN IMMEDIATE``), and records its migrations in the
``migrations`` table, each applied in its own transaction. SQLite's errors leave as the store's:
``StoreUnavailable`` for a database that is locked, full or gone (retry the batch later),
``StoreDataError`` for a row it cannot take.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import StoreDataError, StoreError, StoreUnavailable
from edgekit.fleet.store.schema import MIGRATIONS, statements
from edgekit.fleet.store.sql import SqlStore


class SqliteStore(SqlStore):
    GREATEST = "max"
    ORDER_COLUMN = "rowid"
    NOW_SECONDS = "((julianday('now') - 2440587.5) * 86400.0)"

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
        try:
            _refuse_foreign(self.db, path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:  # a text file, a TOML file tab-completed next to fleet.db
            self.db.close()
            raise StoreError(
                f"this is not a SQLite database ({exc})",
                "pass the --db that 'edgekit fleet collect' writes to",
                path=path,
            ) from exc
        self.migrate()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One transaction; nested calls join the outer one."""
        with self._lock:
            if self.db.in_transaction:
                yield self.db
                return
            with _translated():
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:  # a failed COMMIT (busy, disk full) leaves it open
                        self.db.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads that must not interleave with another thread's statements."""
        with self._lock, _translated():
            yield self.db

    def migrate(self) -> list[str]:
        with self._lock:
            self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {row[0] for row in self.db.execute("SELECT name FROM migrations")}
            applied = []
            for name, migration in MIGRATIONS:
                if name in done:
                    continue
                with self.atomic() as db:
                    for statement in statements(migration, "sqlite"):
                        db.execute(statement)
                    db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
                applied.append(name)
            return applied

    def close(self) -> None:
        with self._lock:
            self.db.close()


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's errors as the store's: a busy, full or unreachable database is worth retrying; a row it
    refuses (a constraint, an integer past 64 bits) is not."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(f"the fleet database refused the write ({exc})", "it is retried") from exc
    except (sqlite3.Error, OverflowError) as exc:
        raise StoreDataError(f"the fleet database cannot store this ({exc})", "") from exc


def _refuse_foreign(db: sqlite3.Connection, path: Any) -> None:
    """A database with tables but no ``migrations`` table is some other program's (a device's prediction log):
    migrating it would quietly add the fleet's tables to it. A new or empty file has none."""
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if tables and "migrations" not in tables:
        db.close()
        raise StoreError(
            f"this SQLite database is not a fleet database (its tables: {', '.join(sorted(tables)[:5])})",
            "pass the --db that 'edgekit fleet collect' writes to",
            path=path,
        )
