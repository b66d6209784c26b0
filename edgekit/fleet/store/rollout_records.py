"""The rollout controller's records: uploaded bundles, rollouts and each device's progress in one.

Every statement the controller needs is a method here, so the controller never touches a
connection or a lock, and another store implementation provides the same methods. The rules stay
with the controller; a method that may refuse (a second rollout on a fleet, a bundle version with
other content) says why by what it returns, and the controller raises.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

IN_PROGRESS = ("running", "paused", "pending")


class RolloutRecords:
    """Mixed into a store that has ``atomic()`` (one write transaction) and ``reading()`` (reads that
    see one state), both context managers that yield a DB-API connection."""

    # -- bundles ---------------------------------------------------------------------------------------
    def add_bundle(self, record: dict[str, Any]) -> str | None:
        """Store an uploaded bundle's record; the sha256 already stored under its name and version if
        that is other content (nothing is written then), else None.

        The insert does nothing on any conflict and the name and version are read again after it: two
        collectors uploading other content as one version at once both pass a check made first, but in
        PostgreSQL the second insert waits for the first's commit on the unique index and then does nothing,
        so the read after it names the content that won (the same bundle twice is stored once)."""
        key = (record["name"], record["version"])
        query = "SELECT sha256 FROM bundles WHERE name = ? AND version = ?"
        with self.atomic() as db:
            row = db.execute(query, key).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO bundles VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    tuple(record[k] for k in ("sha256", "name", "version", "size", "path", "signature", "added_at")),
                )
                row = db.execute(query, key).fetchone()
        return row[0] if row is not None and row[0] != record["sha256"] else None

    def bundle(
        self, *, sha256: str | None = None, name: str | None = None, version: int | None = None
    ) -> dict[str, Any] | None:
        with self.reading() as db:
            if sha256 is not None:
                row = db.execute("SELECT * FROM bundles WHERE sha256 = ?", (sha256,)).fetchone()
            else:
                row = db.execute("SELECT * FROM bundles WHERE name = ? AND version = ?", (name, version)).fetchone()
        return None if row is None else dict(row)

    def bundles(self) -> list[dict[str, Any]]:
        with self.reading() as db:
            query = "SELECT sha256, name, version, size, added_at FROM bundles ORDER BY name, version"
            return [dict(r) for r in db.execute(query)]

    # -- rollouts --------------------------------------------------------------------------------------
    def create_rollout(self, rollout: dict[str, Any], devices: list[tuple[str, int, int | None]]) -> str | None:
        """Store a running rollout and its ``(device, wave, from_version)`` rows; the id of the rollout
        still in progress on that fleet if there is one (nothing is written then), else None.

        The database keeps one rollout in progress per fleet (the partial unique index
        ``rollouts_one_in_progress``): collectors starting rollouts at once both pass the check made first,
        but the second insert waits for the first's commit and then does nothing, and says whose it is."""
        busy_query = f"SELECT id FROM rollouts WHERE fleet = ? AND state IN {IN_PROGRESS}"
        with self.atomic() as db:
            busy = db.execute(busy_query, (rollout["fleet"],)).fetchone()
            if busy is not None:
                return busy[0]
            columns = ("id", "fleet", "kind", "name", "version", "sha256", "spec", "wave_started_at", "created_at")
            inserted = db.execute(
                f"INSERT INTO rollouts ({', '.join(columns)}, state, wave, updated_at) "
                f"VALUES ({', '.join('?' * len(columns))}, 'running', 0, ?) ON CONFLICT DO NOTHING RETURNING id",
                (*(rollout[c] for c in columns), rollout["created_at"]),
            ).fetchone()
            if inserted is None:  # lost the race (or the id is taken): name the rollout in the way
                busy = db.execute(busy_query, (rollout["fleet"],)).fetchone()
                return rollout["id"] if busy is None else busy[0]
            db.executemany(
                "INSERT INTO rollout_devices (rollout, device, wave, state, from_version, version, updated_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?, ?)",
                [(rollout["id"], device, wave, was, was, rollout["created_at"]) for device, wave, was in devices],
            )
        return None

    def transition_rollout(
        self, rollout_id: str, allowed: dict[str, str], reason: str, now: float, *, terminal: Collection[str]
    ) -> str | None:
        """Move a rollout from a state in ``allowed`` to the state it maps to; the state it was in
        (unchanged when not in ``allowed``), or None when there is no such rollout."""
        with self.atomic() as db:
            row = db.execute("SELECT state FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None or row[0] not in allowed:
                return None if row is None else row[0]
            state = allowed[row[0]]
            db.execute(
                "UPDATE rollouts SET state = ?, reason = ?, updated_at = ?, finished_at = coalesce(?, finished_at) "
                "WHERE id = ?",
                (state, reason, now, now if state in terminal else None, rollout_id),
            )
        return row[0]

    def update_rollout(self, rollout_id: str, now: float, **columns: Any) -> None:
        assignments = "".join(f"{name} = ?, " for name in columns)  # names are the controller's, never input
        with self.atomic() as db:
            db.execute(
                f"UPDATE rollouts SET {assignments}updated_at = ? WHERE id = ?", (*columns.values(), now, rollout_id)
            )

    def running_rollouts(self) -> list[str]:
        with self.reading() as db:
            return [r[0] for r in db.execute("SELECT id FROM rollouts WHERE state = 'running'")]

    def rollout_ids(self, limit: int) -> list[str]:
        with self.reading() as db:
            return [r[0] for r in db.execute("SELECT id FROM rollouts ORDER BY created_at DESC LIMIT ?", (limit,))]

    def rollout(self, rollout_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """A rollout's row and its devices' rows (with the fleet table's online, drifted and model
        version), in wave order; None when there is no such rollout."""
        with self.reading() as db:
            row = db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                return None
            devices = db.execute(
                "SELECT r.*, d.online, d.drifted, d.model_version FROM rollout_devices r "
                "LEFT JOIN devices d ON d.device = r.device WHERE r.rollout = ? ORDER BY r.wave, r.device",
                (rollout_id,),
            ).fetchall()
        return dict(row), [dict(d) for d in devices]

    # -- devices in a rollout ----------------------------------------------------------------------
    def set_rollout_device(
        self,
        rollout_id: str,
        device: str,
        state: str,
        reason: str,
        now: float,
        *,
        code: str | None = None,
        sent_at: float | None = None,
        only_from: str | None = None,
    ) -> bool:
        """Set a device's state in a rollout; with ``only_from``, only if it is still in that state (a mark made
        on states loaded earlier, which a device's report stored since must win over). Whether it was set."""
        guard = "" if only_from is None else " AND state = ?"
        with self.atomic() as db:
            cursor = db.execute(
                "UPDATE rollout_devices SET state = ?, reason = ?, code = coalesce(?, code), "
                f"sent_at = coalesce(?, sent_at), updated_at = ? WHERE rollout = ? AND device = ?{guard}",
                (state, reason, code, sent_at, now, rollout_id, device, *(() if only_from is None else (only_from,))),
            )
            return cursor.rowcount > 0

    def record_rollout_report(self, report: dict[str, Any], facts: dict[str, Any], now: float) -> None:
        """A device's ``reported`` message: its state in the rollout, why, and what it measured."""
        facts_json = json.dumps(facts)
        with self.atomic() as db:
            db.execute(
                "UPDATE rollout_devices SET state = ?, reason = ?, code = ?, version = coalesce(?, version), "
                "facts = CASE WHEN ? = '{}' THEN facts ELSE ? END, updated_at = ? WHERE rollout = ? AND device = ?",
                (
                    report["state"],
                    (report.get("reason") or "")[:500],
                    report.get("code"),
                    (report.get("active") or {}).get("version"),
                    facts_json,
                    facts_json,
                    now,
                    report["rollout"],
                    report["device"],
                ),
            )
