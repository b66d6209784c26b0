"""The fleet store: every SQL statement of the collector, the alerts, the dashboard and the rollouts.

``FleetStore`` is the seam the ingest path is typed against; ``SqliteStore`` (``sqlite.py``) is
today's implementation, with the rollout controller's records mixed in (``rollout_records.py``) and
the schema's migrations in ``schema.py``. Nothing outside this package runs SQL.
Imports: edgekit.errors only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from edgekit.errors import StoreError
from edgekit.fleet.store.schema import GAP_GRACE_SECONDS, MIGRATIONS
from edgekit.fleet.store.sqlite import SqliteStore, SummaryRecord, alert_facts

__all__ = ["FleetStore", "SqliteStore", "StoreError", "SummaryRecord", "alert_facts", "GAP_GRACE_SECONDS", "MIGRATIONS"]


class FleetStore(Protocol):
    """What the collector, the CLI and the dashboard need from a store."""

    def record_state(self, doc: dict[str, Any], now: float) -> None: ...

    def record_baseline(self, doc: dict[str, Any], now: float) -> None: ...

    def add_summaries(self, records: list[SummaryRecord], now: float) -> tuple[int, int]: ...

    def summary_watermark(self) -> int: ...

    def devices_with_summaries_after(self, rowid: int) -> tuple[set[str], int]: ...

    def count_reject(self, reason: str, device: str, now: float) -> None: ...

    def status(self) -> list[dict[str, Any]]: ...

    def summaries(self, **selection: Any) -> Iterator[dict[str, Any]]: ...
