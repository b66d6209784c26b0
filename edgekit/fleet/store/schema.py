"""The fleet database's schema: named migrations, applied in order and recorded in the ``migrations`` table.

A migration is never edited once released: a change is a new migration. Every store implementation
applies all of them, under the same names, through ``statements``: a migration is either SQLite's DDL,
which ``postgres_ddl`` turns into PostgreSQL's (types only: 64-bit integers, double-precision
reals, identity keys), or a dict with each dialect's own text ("" when a dialect needs nothing).
"""

from __future__ import annotations

import re

GAP_GRACE_SECONDS = 10.0  # a seq still in another collector process's batch is not missing

MIGRATIONS: list[tuple[str, str | dict[str, str]]] = [
    (
        "0001_initial",
        """
        CREATE TABLE devices (
            device TEXT PRIMARY KEY, fleet TEXT NOT NULL, online INTEGER, model TEXT, model_version INTEGER,
            runtime TEXT, agent_version TEXT, state_at REAL, last_seen REAL, max_seq INTEGER NOT NULL DEFAULT 0,
            windows INTEGER NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0, drifted INTEGER, worst_feature TEXT,
            redeliveries INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE summaries (
            device TEXT NOT NULL, seq INTEGER NOT NULL, fleet TEXT NOT NULL, model TEXT NOT NULL,
            model_version INTEGER NOT NULL,
            window_start TEXT NOT NULL, window_end TEXT NOT NULL, received_at REAL NOT NULL, rows INTEGER NOT NULL,
            drifted INTEGER, worst_feature TEXT, baseline_id TEXT NOT NULL, payload TEXT NOT NULL,
            PRIMARY KEY (device, seq)
        );
        CREATE INDEX summaries_by_model ON summaries (model, model_version, window_end);
        CREATE INDEX summaries_by_fleet ON summaries (fleet, window_end);
        CREATE TABLE baselines (
            baseline_id TEXT PRIMARY KEY, model TEXT, model_version INTEGER, profile TEXT NOT NULL, received_at REAL
        );
        CREATE TABLE rejects (
            reason TEXT NOT NULL, device TEXT NOT NULL, count INTEGER NOT NULL, last_at REAL,
            PRIMARY KEY (reason, device)
        );
        CREATE TABLE gaps (
            device TEXT NOT NULL, seq INTEGER NOT NULL, requested_at REAL, requests INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (device, seq)
        );
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY, rule TEXT NOT NULL, device TEXT NOT NULL, subject TEXT NOT NULL,
            state TEXT NOT NULL, opened_at REAL NOT NULL, updated_at REAL NOT NULL, closed_at REAL,
            message TEXT NOT NULL, evidence TEXT NOT NULL
        );
        CREATE UNIQUE INDEX alerts_one_open ON alerts (rule, device, subject) WHERE state = 'open';
    """,
    ),
    # What alert rules read, extracted once at insert: evaluating a device must not re-parse its
    # payloads.
    (
        "0002_alert_facts",
        """
        ALTER TABLE summaries ADD COLUMN labelled INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE summaries ADD COLUMN facts TEXT;
        CREATE INDEX summaries_labelled ON summaries (device, model, model_version, seq) WHERE labelled > 0
    """,
    ),
    # OTA rollouts (see rollouts.py): the bundles the collector serves, each rollout, and each device's
    # part in it.
    (
        "0003_rollouts",
        """
        CREATE TABLE bundles (
            sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, size INTEGER NOT NULL,
            path TEXT NOT NULL, signature TEXT NOT NULL, added_at REAL NOT NULL
        );
        CREATE UNIQUE INDEX bundles_by_version ON bundles (name, version);
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY, fleet TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
            sha256 TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL, wave INTEGER NOT NULL DEFAULT 0,
            wave_started_at REAL, wave_done_at REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
            finished_at REAL, reason TEXT NOT NULL DEFAULT ''
        );
        CREATE TABLE rollout_devices (
            rollout TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
            from_version INTEGER, version INTEGER, reason TEXT NOT NULL DEFAULT '', code TEXT, facts TEXT,
            sent_at REAL, updated_at REAL, PRIMARY KEY (rollout, device)
        );
        CREATE INDEX rollout_devices_by_device ON rollout_devices (device)
    """,
    ),
    # When a gap was found: summaries of one device reach several collector processes, which commit out
    # of order, so a gap is asked for only once it has outlived GAP_GRACE_SECONDS.
    (
        "0004_gap_found_at",
        """
        ALTER TABLE gaps ADD COLUMN found_at REAL
    """,
    ),
    # What orders summaries by commit, for the alert evaluator's watermark: SQLite's rowid; a sequence in
    # PostgreSQL, whose summary writers take a lock so that commit order and sequence order agree.
    (
        "0005_summary_order",
        {
            "sqlite": "",
            "postgresql": "ALTER TABLE summaries ADD COLUMN id BIGSERIAL;"
            "CREATE INDEX summaries_by_id ON summaries (id)",
        },
    ),
    # The leader's lease (lease_records.py): one row per duty set, the holder, a fencing token raised at
    # every change of holder, and an expiry read off the database's clock, so collectors on machines
    # whose clocks disagree agree on who leads.
    (
        "0006_leases",
        """
        CREATE TABLE leases (
            name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, acquired_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )
    """,
    ),
    # An uploaded bundle's bytes, in chunks (bundle_blobs.py), so any collector sharing the database can
    # serve a bundle another one received.
    (
        "0007_bundle_blobs",
        {
            "sqlite": "CREATE TABLE bundle_blobs (sha256 TEXT NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL, "
            "PRIMARY KEY (sha256, n))",
            "postgresql": "CREATE TABLE bundle_blobs (sha256 TEXT NOT NULL, n BIGINT NOT NULL, data BYTEA NOT NULL, "
            "PRIMARY KEY (sha256, n))",
        },
    ),
    # Bounded history (history_records.py, fleet/retention.py): raw windows past the retention period merged
    # into hourly, then daily, profiles per device, model version and baseline; how far each device's
    # windows have been rolled up (a redelivery of a rolled window is then known, not counted twice); the
    # retention policy the leader applies; and summaries by window end, which the rollup walks in order.
    (
        "0008_history",
        """
        CREATE TABLE history (
            resolution TEXT NOT NULL, bucket TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL,
            model_version INTEGER NOT NULL, baseline_id TEXT NOT NULL, fleet TEXT NOT NULL,
            first_start TEXT NOT NULL, last_end TEXT NOT NULL, windows INTEGER NOT NULL, rows INTEGER NOT NULL,
            tested INTEGER NOT NULL, drifted INTEGER NOT NULL, labelled INTEGER NOT NULL, correct INTEGER NOT NULL,
            errors TEXT NOT NULL, p99_ms_max REAL, max_ms REAL, profile TEXT, updated_at REAL NOT NULL,
            PRIMARY KEY (resolution, device, model, model_version, baseline_id, bucket)
        );
        CREATE INDEX history_by_bucket ON history (resolution, bucket);
        CREATE INDEX history_by_model ON history (model, model_version, last_end);
        CREATE TABLE history_marks (device TEXT PRIMARY KEY, rolled_seq INTEGER NOT NULL, rolled_end TEXT NOT NULL);
        CREATE TABLE fleet_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
        CREATE INDEX summaries_by_end ON summaries (window_end)
    """,
    ),
    # Field samples (sample_records.py, fleet/samples.py): the uploads the collector asked devices for (an id
    # it issued, so nothing unrequested or replayed is taken), their bytes while they arrive, and the rows.
    (
        "0009_samples",
        {
            dialect: f"""
        CREATE TABLE sample_uploads (
            id TEXT PRIMARY KEY, device TEXT NOT NULL, selection TEXT NOT NULL, state TEXT NOT NULL,
            size {big}, sha256 TEXT, received {big} NOT NULL DEFAULT 0, rows {big} NOT NULL DEFAULT 0,
            labelled {big} NOT NULL DEFAULT 0, header TEXT, requested_at {real} NOT NULL, updated_at {real} NOT NULL,
            completed_at {real}, reason TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX sample_uploads_by_device ON sample_uploads (device, requested_at);
        CREATE TABLE sample_chunks (
            upload TEXT NOT NULL, first_byte {big} NOT NULL, data {blob} NOT NULL, PRIMARY KEY (upload, first_byte)
        );
        CREATE TABLE samples (
            device TEXT NOT NULL, id TEXT NOT NULL, upload TEXT NOT NULL, seq {big}, model TEXT NOT NULL,
            model_version {big} NOT NULL, ts {real} NOT NULL, drifted {big}, prediction TEXT, label TEXT,
            input TEXT NOT NULL, PRIMARY KEY (device, id)
        );
        CREATE INDEX samples_by_upload ON samples (upload);
        CREATE INDEX samples_by_window ON samples (device, seq)
    """
            for dialect, big, real, blob in (
                ("sqlite", "INTEGER", "REAL", "BLOB"),
                ("postgresql", "BIGINT", "DOUBLE PRECISION", "BYTEA"),
            )
        },
    ),
    # The retrain sink's timelines (timeline_records.py, fleet/retrain.py): one run per alert it acted on, the
    # run's steps in order, and runs by device and model, which the sink's cooldown reads.
    (
        "0011_timeline",
        """
        CREATE TABLE retrain_runs (
            id INTEGER PRIMARY KEY, alert INTEGER NOT NULL, rule TEXT NOT NULL, device TEXT NOT NULL,
            model TEXT NOT NULL, state TEXT NOT NULL, started_at REAL NOT NULL, updated_at REAL NOT NULL,
            finished_at REAL, outcome TEXT NOT NULL DEFAULT ''
        );
        CREATE UNIQUE INDEX retrain_runs_by_alert ON retrain_runs (alert);
        CREATE INDEX retrain_runs_by_model ON retrain_runs (device, model, started_at);
        CREATE TABLE timeline (
            id INTEGER PRIMARY KEY, alert INTEGER NOT NULL, at REAL NOT NULL, step TEXT NOT NULL,
            status TEXT NOT NULL, message TEXT NOT NULL, detail TEXT NOT NULL
        );
        CREATE INDEX timeline_by_alert ON timeline (alert, id)
    """,
    ),
    # One rollout in progress per fleet, kept by the database (rollout_records.create_rollout): two collectors
    # sharing it could both pass the check before either inserted. Rollouts such a race left in progress
    # beside an older one on the same fleet are marked failed first, so that the index can be built.
    (
        "0012_one_rollout_per_fleet",
        """
        UPDATE rollouts SET state = 'failed', finished_at = updated_at,
            reason = 'started while another rollout was in progress on this fleet (two collectors at once)'
        WHERE state IN ('running', 'paused', 'pending') AND EXISTS (
            SELECT 1 FROM rollouts older WHERE older.fleet = rollouts.fleet
            AND older.state IN ('running', 'paused', 'pending')
            AND (older.created_at < rollouts.created_at
                OR (older.created_at = rollouts.created_at AND older.id < rollouts.id))
        );
        CREATE UNIQUE INDEX rollouts_one_in_progress ON rollouts (fleet) WHERE state IN ('running', 'paused', 'pending')
    """,
    ),
    # The transaction that wrote each summary, for the alert evaluator's watermark in PostgreSQL (postgres.py):
    # summary writers no longer queue behind one lock, so the id sequence is not commit order. Rows stored
    # before keep NULL (already seen); the column is filled from here on, with no rewrite of the table.
    (
        "0013_summary_xact",
        {
            "sqlite": "",
            "postgresql": "ALTER TABLE summaries ADD COLUMN xact xid8;"
            "ALTER TABLE summaries ALTER COLUMN xact SET DEFAULT pg_current_xact_id();"
            "CREATE INDEX summaries_by_xact ON summaries (xact)",
        },
    ),
    # Seqs at or under a device's rolled mark that no bucket counts (history_records.py): windows missing when
    # the rollup passed them, so that one arriving late is merged, not taken for a redelivery and dropped.
    (
        "0014_history_holes",
        """
        CREATE TABLE history_holes (
            device TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, PRIMARY KEY (device, first_seq)
        )
    """,
    ),
    # When each hole was noted, so that holes no window can fill any more are forgotten (retention.py): without
    # it a device that lost windows now and then kept a row per loss for ever. Holes noted before this
    # migration count from the first retention pass after it.
    ("0015_history_hole_age", "ALTER TABLE history_holes ADD COLUMN noted_at REAL"),
    # Where each device's current install began numbering its windows (the summaries' ``seq_base``; sql.py,
    # history_records.py): the seqs between its previous install's windows and that base are a jump, never
    # windows to ask for or holes to keep. NULL for devices whose agent announces no base.
    ("0016_device_seq_base", "ALTER TABLE devices ADD COLUMN seq_base INTEGER"),
]

DIALECTS = ("sqlite", "postgresql")


def statements(migration: str | dict[str, str], dialect: str) -> list[str]:
    """One migration's statements in ``dialect``."""
    if isinstance(migration, dict):
        text = migration[dialect]
    else:
        text = postgres_ddl(migration) if dialect == "postgresql" else migration
    return [statement for statement in text.split(";") if statement.strip()]


def postgres_ddl(sql: str) -> str:
    """SQLite's column types as PostgreSQL's: INTEGER is 64-bit in SQLite, REAL 8 bytes (PostgreSQL's REAL
    is 4), and ``id INTEGER PRIMARY KEY`` is SQLite's auto-assigned key."""
    sql = re.sub(r"\bid INTEGER PRIMARY KEY\b", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
