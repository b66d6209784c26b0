#!/usr/bin/env python3
"""Measure what bounded history buys: a simulated month of windows from N devices stored with retention
on (raw windows rolled into hourly, then daily, merged buckets) and off (every window raw), and the
database's size each simulated week, per device. Prints a table and writes JSON.

The windows are real 64-feature summaries (the device's own code, ``bench_collector.templates``), stored
through the collector's ingest; a retention pass (``retention.run_pass``, what the leader runs) follows
each simulated day. Storage is the SQLite file's size after a WAL checkpoint (pages freed by the rollup
are reused, so the file stops growing), or PostgreSQL's ``pg_total_relation_size`` of the fleet tables
after a plain VACUUM (what autovacuum does between days in a real fleet).

    python scripts/bench_retention.py [--devices 20] [--per-day 96] [--days 28] [--raw 2d --hourly 7d]
                                      [--db sqlite|postgres|postgresql://...] [--quick]
                                      [--out bench-results/bench_retention.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_collector import Databases, templates  # noqa: E402
from bench_report import print_checks, write_json  # noqa: E402

from device_agent.protocol import iso  # noqa: E402
from edgekit.fleet.ingest import Ingestor, Message  # noqa: E402
from edgekit.fleet.retention import RetentionPolicy, run_pass  # noqa: E402
from edgekit.fleet.store import is_postgres_url, open_store  # noqa: E402

DAY = 86400.0
T0 = 1.7e9 - 1.7e9 % DAY
FLEET_TABLES = ("summaries", "history", "history_marks", "devices", "gaps", "baselines")


def storage_bytes(store: Any, db: str) -> int:
    """The database's size now: the SQLite file (after a checkpoint folds the WAL in), or the fleet tables'
    total relation size in PostgreSQL (after a VACUUM makes the rollup's dead rows reusable)."""
    if not is_postgres_url(db):
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))
    import psycopg

    with psycopg.connect(db, autocommit=True) as connection:
        for table in FLEET_TABLES:
            connection.execute(f"VACUUM {table}")
        row = connection.execute(
            "SELECT sum(pg_total_relation_size(t)) FROM unnest(%s::text[]) AS t", (list(FLEET_TABLES),)
        ).fetchone()
    return int(row[0])


def simulate_month(
    db: str, docs: list[dict[str, Any]], *, devices: int, per_day: int, days: int, policy: RetentionPolicy | None
) -> list[dict[str, Any]]:
    """``days`` simulated days of ``per_day`` windows from each of ``devices`` devices into ``db``, a retention
    pass after each day (none when ``policy`` is None); the storage after each simulated week (and the last day)."""
    store = open_store(db)
    ingestor, weeks, step = Ingestor(store), [], DAY / per_day
    try:
        for day in range(days):
            now = T0 + (day + 1) * DAY
            messages = []
            for k in range(per_day):
                seq = day * per_day + k + 1
                window = {"start": iso(T0 + (seq - 1) * step), "end": iso(T0 + seq * step)}
                for d in range(devices):
                    doc = {**docs[(seq + d) % len(docs)], "device": f"dev{d:04d}", "seq": seq, "window": window}
                    topic = f"edgekit/v1/bench/dev{d:04d}/summary"
                    messages.append(Message(topic, json.dumps(doc, separators=(",", ":")).encode(), now))
            for start in range(0, len(messages), 1000):
                ingestor.handle(messages[start : start + 1000])
            took = run_pass(store, policy, now).seconds if policy is not None else 0.0
            if (day + 1) % 7 == 0 or day + 1 == days:
                size = storage_bytes(store, db)
                weeks.append(
                    {
                        "day": day + 1,
                        "bytes": size,
                        "bytes_per_device": size / devices,
                        "kept": store.history_sizes(),
                        "retention_pass_seconds": took,
                    }
                )
                print(f"  day {day + 1}: {size / devices / 1024:,.0f} KiB a device, kept {weeks[-1]['kept']}")
    finally:
        store.close()
    for earlier, later in zip([None, *weeks], weeks, strict=False):
        span = later["day"] - (earlier["day"] if earlier else 0)
        grown = later["bytes_per_device"] - (earlier["bytes_per_device"] if earlier else 0.0)
        later["growth_per_device_per_day"] = grown / span
    return weeks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--per-day", type=int, default=96, help="windows a device a day (96: one every 15 minutes)")
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--raw", default="2d")
    parser.add_argument("--hourly", default="7d")
    parser.add_argument("--daily", default="forever")
    parser.add_argument(
        "--db", default="sqlite", help="sqlite, postgres (a throwaway local server), or a postgresql:// URL"
    )
    parser.add_argument("--quick", action="store_true", help="5 devices, 24 windows a day, 21 days: a smoke test")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "bench_retention.json"))
    args = parser.parse_args()
    if args.quick:
        args.devices, args.per_day, args.days = 5, 24, 21
    policy = RetentionPolicy.parse(args.raw, args.hourly, args.daily)
    docs = [json.loads(t) for t in templates(8)]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-retention-") as tmp:
        databases = Databases(Path(tmp), args.db)
        try:
            shape = {"devices": args.devices, "per_day": args.per_day, "days": args.days}
            print(f"retention on ({policy.describe()}):")
            on = simulate_month(databases.new("retention-on"), docs, **shape, policy=policy)
            print("retention off:")
            off = simulate_month(databases.new("retention-off"), docs, **shape, policy=None)
        finally:
            databases.stop()
    print(
        f"\n{'day':>4}  {'on: KiB/device':>15}  {'off: KiB/device':>16}  "
        f"{'on: B/device/day':>17}  {'off: B/device/day':>18}"
    )
    for a, b in zip(on, off, strict=True):
        print(
            f"{a['day']:>4}  {a['bytes_per_device'] / 1024:>15,.0f}  {b['bytes_per_device'] / 1024:>16,.0f}  "
            f"{a['growth_per_device_per_day']:>17,.0f}  {b['growth_per_device_per_day']:>18,.0f}"
        )
    last_on, last_off = on[-1]["growth_per_device_per_day"], off[-1]["growth_per_device_per_day"]
    checks = [
        (
            f"{databases.label}: bytes a device, day {on[-1]['day']}, retention on",
            on[-1]["bytes_per_device"],
            "info",
            True,
        ),
        (
            f"{databases.label}: bytes a device, day {off[-1]['day']}, retention off",
            off[-1]["bytes_per_device"],
            "info",
            True,
        ),
        (
            "last week's growth, bytes a device a day, retention on",
            last_on,
            "flat (< 10% of off)",
            last_on < 0.1 * last_off,
        ),
        ("last week's growth, bytes a device a day, retention off", last_off, "info", True),
        ("retention pass after a day, seconds (last)", on[-1]["retention_pass_seconds"], "info", True),
    ]
    print()
    print_checks(checks)
    seconds = time.monotonic() - started
    print(f"\n{'quick (smoke test, not figures): ' if args.quick else ''}{seconds:.0f} s on {os.cpu_count()} CPUs")
    write_json(args.out, checks, database=databases.label, shape=shape, policy=policy.to_dict(), on=on, off=off)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
