"""The fleet store: every SQL statement of the collector, the alerts, the dashboard and the rollouts.

``FleetStore`` is the seam the ingest path is typed against. Every statement is written once, in SQL
both databases run (``SqlStore``, ``sql.py``, with the rollout controller's records mixed in from
``rollout_records.py``, the leader's lease from ``lease_records.py`` and bundles' bytes from
``bundle_blobs.py``); ``SqliteStore`` (``sqlite.py``: a file, one machine) and ``PostgresStore``
(``postgres.py``: a server several collectors share) hold the connections. ``open_store`` picks one
from what ``--db`` names; the schema's migrations, in both dialects, are in ``schema.py``. Nothing
outside this package runs SQL.
Imports: edgekit.errors only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from edgekit.errors import StoreError
from edgekit.fleet.store.bundle_blobs import CHUNK_BYTES
from edgekit.fleet.store.lease_records import Lease, LeaseLost
from edgekit.fleet.store.postgres import PostgresStore, is_postgres_url
from edgekit.fleet.store.records import SummaryRecord, alert_facts
from edgekit.fleet.store.schema import GAP_GRACE_SECONDS, MIGRATIONS
from edgekit.fleet.store.sql import SqlStore
from edgekit.fleet.store.sqlite import SqliteStore

__all__ = [
    "CHUNK_BYTES",
    "CollectorStore",
    "FleetStore",
    "Lease",
    "LeaseLost",
    "PostgresStore",
    "RolloutStore",
    "SqlStore",
    "SqliteStore",
    "is_postgres_url",
    "open_store",
    "StoreError",
    "SummaryRecord",
    "alert_facts",
    "GAP_GRACE_SECONDS",
    "MIGRATIONS",
]


def open_store(db: str | Path) -> SqlStore:
    """The fleet store ``db`` names: a ``postgresql://`` URL, else a SQLite file (or ``:memory:``)."""
    return PostgresStore(str(db)) if is_postgres_url(str(db)) else SqliteStore(db)


class FleetStore(Protocol):
    """What the collector, the CLI and the dashboard need from a store."""

    def record_state(self, doc: dict[str, Any], now: float) -> None: ...

    def record_baseline(self, doc: dict[str, Any], now: float) -> None: ...

    def baseline(self, baseline_id: str) -> dict[str, Any] | None: ...

    def add_summaries(self, records: list[SummaryRecord], now: float) -> tuple[int, int, list[SummaryRecord]]: ...

    def summary_watermark(self) -> int: ...

    def devices_with_summaries_after(self, rowid: int) -> tuple[set[str], int]: ...

    def count_reject(self, reason: str, device: str, now: float) -> None: ...

    def status(self) -> list[dict[str, Any]]: ...

    def summaries(self, **selection: Any) -> Iterator[dict[str, Any]]: ...


class CollectorStore(FleetStore, Protocol):
    """What the collector needs past ingest: gap requests, the workers' watermark, closing."""

    def gaps_to_request(self, now: float, *, retry_after: float = ..., limit: int = ...) -> dict[str, list[int]]: ...

    def close(self) -> None: ...


class RolloutStore(Protocol):
    """What the rollout controller needs: the fleet table and its own records (``rollout_records.py``)."""

    def status(self) -> list[dict[str, Any]]: ...

    def add_bundle(self, record: dict[str, Any]) -> str | None: ...

    def store_bundle(self, record: dict[str, Any], data: bytes) -> str | None: ...

    def bundle_chunks(self, sha256: str) -> Iterator[bytes]: ...

    def bundle(
        self, *, sha256: str | None = None, name: str | None = None, version: int | None = None
    ) -> dict[str, Any] | None: ...

    def bundles(self) -> list[dict[str, Any]]: ...

    def create_rollout(self, rollout: dict[str, Any], devices: list[tuple[str, int, int | None]]) -> str | None: ...

    def transition_rollout(
        self, rollout_id: str, allowed: dict[str, str], reason: str, now: float, *, terminal: Any
    ) -> str | None: ...

    def update_rollout(self, rollout_id: str, now: float, **columns: Any) -> None: ...

    def running_rollouts(self) -> list[str]: ...

    def rollout_ids(self, limit: int) -> list[str]: ...

    def rollout(self, rollout_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None: ...

    def set_rollout_device(
        self,
        rollout_id: str,
        device: str,
        state: str,
        reason: str,
        now: float,
        *,
        code: Any = None,
        sent_at: Any = None,
        only_from: str | None = None,
    ) -> bool: ...

    def record_rollout_report(self, report: dict[str, Any], facts: dict[str, Any], now: float) -> None: ...
