"""What the alert engine reads and writes: recent windows' facts, labelled accuracy, and the alerts themselves.

The engine (``fleet/alerts.py``) evaluates devices a thousand at a time, so each read here takes a list of
devices and answers for all of them, and ``apply_alerts`` writes a pass's openings, refreshes and closings
in one transaction. Evaluating device by device had cost four statements and four transactions a device:
on PostgreSQL a leader evaluating the 1,000 devices of the collector bench spent 0.65 s of its own CPU and
about as much of the server's a pass, a fifth of everything the two-collector run did. Here a dialect
override is one statement a read (PostgreSQL: ``LATERAL`` joins over arrays); SQLite, in-process, runs one
indexed statement a device, which costs it microseconds.

Imports: the store's ``records`` only.
"""

from __future__ import annotations

import json
from typing import Any

from edgekit.fleet.store.records import _read_facts

AlertKey = tuple[str, str, str]  # (rule, device, subject)
AlertOpening = tuple[str, str, str, str, dict[str, Any]]  # (rule, device, subject, message, evidence)
LabelledKey = tuple[str, str, int]  # (device, model, model_version)


class AlertRecords:
    """Mixed into a store that has ``atomic()``, ``reading()`` and ``_devices_in()``."""

    # -- what rules read -------------------------------------------------------------------------------
    def devices_for_alerts(self, devices: list[str] | None = None) -> list[dict[str, Any]]:
        """The device rows a rule reads (all devices, or those named), in ``status()``'s order."""
        columns = "device, fleet, online, model, model_version, last_seen"
        with self.reading() as db:
            if devices is None:
                rows = db.execute(f"SELECT {columns} FROM devices ORDER BY fleet, device").fetchall()
            else:
                rows = []
                for among, chunk in self._devices_in(sorted(devices)):
                    rows += db.execute(f"SELECT {columns} FROM devices WHERE device {among}", chunk).fetchall()
                rows.sort(key=lambda r: (r[1], r[0]))
        return [
            {
                "device": r[0],
                "fleet": r[1],
                "online": None if r[2] is None else bool(r[2]),
                "model": r[3],
                "model_version": r[4],
                "last_seen": r[5],
            }
            for r in rows
        ]

    def recent_facts(self, device: str, count: int) -> list[dict[str, Any]]:
        """The alert facts of the device's last ``count`` windows, newest first."""
        return self.recent_facts_of([device], count)[device]

    def recent_facts_of(self, devices: list[str], count: int) -> dict[str, list[dict[str, Any]]]:
        """``recent_facts`` of each device (an empty list for one with no window)."""
        with self.reading() as db:
            return {
                device: [
                    _read_facts(r[0])
                    for r in db.execute(
                        "SELECT facts FROM summaries WHERE device = ? ORDER BY seq DESC LIMIT ?", (device, count)
                    ).fetchall()
                ]
                for device in devices
            }

    def labelled_accuracy(
        self, device: str, model: str, version: int, *, limit: int = 50
    ) -> list[tuple[int, float, int]]:
        """(seq, accuracy, labelled) of the device's last ``limit`` windows that received delayed labels,
        oldest first."""
        return self.labelled_accuracy_of([(device, model, version)], limit=limit)[(device, model, version)]

    def labelled_accuracy_of(
        self, keys: list[LabelledKey], *, limit: int = 50
    ) -> dict[LabelledKey, list[tuple[int, float, int]]]:
        """``labelled_accuracy`` of each (device, model, version)."""
        found: dict[LabelledKey, list[tuple[int, float, int]]] = {}
        with self.reading() as db:
            for key in keys:
                rows = db.execute(
                    "SELECT seq, facts, labelled FROM summaries WHERE device = ? AND model = ? AND model_version = ? "
                    "AND labelled > 0 ORDER BY seq DESC LIMIT ?",
                    (*key, limit),
                ).fetchall()
                found[key] = _labelled(rows)
        return found

    def open_alerts_of(self, device: str) -> set[tuple[str, str]]:
        return self.open_alerts_by_device([device]).get(device, set())

    def open_alerts_by_device(self, devices: list[str]) -> dict[str, set[tuple[str, str]]]:
        """(rule, subject) of each device's open alerts; a device with none is left out."""
        found: dict[str, set[tuple[str, str]]] = {}
        with self.reading() as db:
            for among, chunk in self._devices_in(sorted(devices)):
                for r in db.execute(
                    f"SELECT device, rule, subject FROM alerts WHERE state = 'open' AND device {among}", chunk
                ):
                    found.setdefault(r[0], set()).add((r[1], r[2]))
        return found

    # -- what the engine writes ------------------------------------------------------------------------
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

    def apply_alerts(
        self, opens: list[AlertOpening], closes: list[AlertKey], now: float
    ) -> tuple[set[AlertKey], set[AlertKey]]:
        """One pass's alerts in one transaction: each of ``opens`` opened, or refreshed when it is open already,
        and each of ``closes`` closed if open. Returns the keys newly opened and those closed."""
        opened, closed = set(), set()
        with self.atomic():
            for rule, device, subject, message, evidence in opens:
                if self.open_alert(rule, device, subject, message, evidence, now):
                    opened.add((rule, device, subject))
            for rule, device, subject in closes:
                if self.close_alert(rule, device, subject, now):
                    closed.add((rule, device, subject))
        return opened, closed

    def alerts(self, *, open_only: bool = False, limit: int = 200) -> list[dict[str, Any]]:
        query = (
            "SELECT * FROM alerts"
            + (" WHERE state = 'open'" if open_only else "")
            + " ORDER BY state DESC, updated_at DESC LIMIT ?"
        )
        with self.reading() as db:
            rows = db.execute(query, (limit,)).fetchall()
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in rows]


def _labelled(rows: list[Any]) -> list[tuple[int, float, int]]:
    """(seq, accuracy, labelled) oldest first, from rows of (seq, facts, labelled) newest first."""
    return [(r[0], json.loads(r[1]).get("accuracy"), r[2]) for r in reversed(rows)]
