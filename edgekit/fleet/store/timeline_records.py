"""The retrain sink's records: one run per alert it fired on, and the steps of that run, in order.

A run (``retrain_runs``) is keyed by its alert: the sink acts once per opened alert, and the page and
``/api/alerts/<id>/timeline`` show one timeline per alert. Its steps (``timeline``) are appended as the
pipeline goes (``fleet/retrain.py``): samples asked for and exported, the command started and finished,
the promotion's report, the bundle stored, the rollout started or left to an operator, a failure. The
cooldown reads the runs of a device and model (``last_retrain``), so a flapping alert on a collector
that just took the lead is held back as well as on the one that ran it. The rules are ``retrain.py``'s.
"""

from __future__ import annotations

import json
from typing import Any

_RUN_COLUMNS = "id, alert, rule, device, model, state, started_at, updated_at, finished_at, outcome"
_STEP_COLUMNS = "id, alert, at, step, status, message, detail"
FINISHED = ("succeeded", "kept", "awaiting", "failed", "skipped")  # a run in one of these does nothing more


class TimelineRecords:
    """Mixed into a store that has ``atomic()`` and ``reading()``."""

    def alert_id(self, rule: str, device: str, subject: str, opened_at: float) -> int | None:
        """The id of the alert opened at ``opened_at`` (the alert engine hands its sinks no id)."""
        with self.reading() as db:
            row = db.execute(
                "SELECT id FROM alerts WHERE rule = ? AND device = ? AND subject = ? AND opened_at = ? "
                "ORDER BY id DESC LIMIT 1",
                (rule, device, subject, opened_at),
            ).fetchone()
        return None if row is None else int(row[0])

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        with self.reading() as db:
            row = db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else {**dict(row), "evidence": json.loads(row["evidence"])}

    def start_retrain(self, alert_id: int, rule: str, device: str, model: str, now: float) -> bool:
        """A run for the alert, state ``running``; False when the alert has one already (a sink acts once)."""
        with self.atomic() as db:
            row = db.execute(
                "INSERT INTO retrain_runs (alert, rule, device, model, state, started_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                (alert_id, rule, device, model, now, now),
            ).fetchone()
        return row is not None

    def last_retrain(self, device: str, model: str, *, before: int) -> dict[str, Any] | None:
        """The newest run for ``device`` and ``model`` that did not stop at the cooldown, other than the run of
        alert ``before``: what a cooldown counts from."""
        with self.reading() as db:
            row = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM retrain_runs WHERE device = ? AND model = ? AND state <> 'skipped' "
                "AND alert <> ? ORDER BY started_at DESC, id DESC LIMIT 1",
                (device, model, before),
            ).fetchone()
        return None if row is None else _named(_RUN_COLUMNS, row)

    def add_timeline_step(
        self, alert_id: int, step: str, status: str, message: str, detail: dict[str, Any], now: float
    ) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT INTO timeline (alert, at, step, status, message, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (alert_id, now, step, status, message, json.dumps(detail, default=str)),
            )
            db.execute("UPDATE retrain_runs SET updated_at = ? WHERE alert = ?", (now, alert_id))

    def finish_retrain(self, alert_id: int, state: str, outcome: str, now: float) -> None:
        with self.atomic() as db:
            db.execute(
                "UPDATE retrain_runs SET state = ?, outcome = ?, finished_at = ?, updated_at = ? WHERE alert = ?",
                (state, outcome, now, now, alert_id),
            )

    def timeline(self, alert_id: int) -> dict[str, Any] | None:
        """``{"run": ..., "steps": [...]}`` of the alert's retrain, oldest step first; None without a run."""
        with self.reading() as db:
            run = db.execute(f"SELECT {_RUN_COLUMNS} FROM retrain_runs WHERE alert = ?", (alert_id,)).fetchone()
            steps = db.execute(
                f"SELECT {_STEP_COLUMNS} FROM timeline WHERE alert = ? ORDER BY id", (alert_id,)
            ).fetchall()
        if run is None:
            return None
        return {
            "run": _named(_RUN_COLUMNS, run),
            "steps": [{**_named(_STEP_COLUMNS, s), "detail": json.loads(s[6])} for s in steps],
        }

    def retrain_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest runs first, for the dashboard's list of timelines."""
        with self.reading() as db:
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM retrain_runs ORDER BY started_at DESC, id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_named(_RUN_COLUMNS, row) for row in rows]


def _named(columns: str, row: Any) -> dict[str, Any]:
    return {name.strip(): row[i] for i, name in enumerate(columns.split(","))}
