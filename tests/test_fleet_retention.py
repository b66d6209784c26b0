"""Bounded history: a simulated month rolled into hourly and daily buckets answers merged drift exactly as
every raw window would, keeps the database bounded, and survives being run twice or crashing midway.
Every store test runs on SQLite and on a real PostgreSQL server."""

import json

import pytest

from device_agent.protocol import iso
from edgekit.errors import EdgekitError
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.merge import merged_drift
from edgekit.fleet.retention import Retention, RetentionPolicy, merge_compact, parse_duration, run_pass
from edgekit.fleet.store import SqliteStore
from tests.fleet_helpers import baseline, baseline_message, summary

BASE = baseline()
DEVICES = ("pi-a", "pi-b", "pi-c")
PER_DAY = 48  # a window every 30 minutes
DAY = 86400.0
T0 = 1.7e9 - 1.7e9 % DAY  # midnight
POLICY = RetentionPolicy.parse("2d", "10d", "forever")
# A few real windows (the device's own code), some shifted, reused with each window's device, seq and times.
POOL = [
    json.loads(summary(BASE, "x", i + 1, shift=0.4 * (i % 3), labelled=i % 2 * 10, correct=i % 2 * 7)[1])
    for i in range(6)
]
POOL[1]["errors"] = {"invalid_input": 2}


@pytest.fixture
def store(fleet_store):
    """SQLite and PostgreSQL (``conftest.fleet_store``)."""
    return fleet_store


def window(device: str, seq: int) -> tuple[str, bytes]:
    doc = {**POOL[seq % len(POOL)], "device": device, "seq": seq}
    doc["window"] = {"start": iso(T0 + (seq - 1) * DAY / PER_DAY), "end": iso(T0 + seq * DAY / PER_DAY)}
    return f"edgekit/v1/f/{device}/summary", json.dumps(doc).encode()


def day_of_windows(day: int) -> list[Message]:
    now = T0 + (day + 1) * DAY
    return [Message(*window(d, day * PER_DAY + k + 1), now) for d in DEVICES for k in range(PER_DAY)]


def simulate(store, reference, days: int, *, tick=run_pass) -> list[dict[str, int]]:
    """``days`` days of windows into both stores, a retention pass at the end of each day on ``store``
    only; the rows kept after each day."""
    for st in (store, reference):
        Ingestor(st).handle([Message(*baseline_message(BASE, DEVICES[0]), T0)])
    sizes = []
    for day in range(days):
        messages = day_of_windows(day)
        Ingestor(store).handle(messages)
        Ingestor(reference).handle(messages)
        tick(store, POLICY, T0 + (day + 1) * DAY)
        sizes.append(store.history_sizes())
    return sizes


def same_drift(store, reference, **selection):
    mine, theirs = merged_drift(store, **selection), merged_drift(reference, **selection)
    assert len(mine) == len(theirs) == 1
    for key in ("windows", "rows", "devices", "feature_distributions", "categories", "first", "last", "drift"):
        assert mine[0][key] == theirs[0][key], key
    return mine[0]


def test_a_month_rolled_up_answers_merged_drift_exactly_and_stays_bounded(store):
    reference = SqliteStore(":memory:")  # every raw window, never rolled up
    sizes = simulate(store, reference, 30)
    report = same_drift(store, reference)
    assert report["windows"] == 30 * PER_DAY * len(DEVICES)
    assert set(report["resolutions"]) == {"raw", "hour", "day"}
    assert report["resolutions"]["raw"] == 2 * PER_DAY * len(DEVICES)
    # past the first ten days, raw windows and hourly buckets stay flat; daily ones add one a device a day
    settled = sizes[11:]
    assert len({(s["raw"], s["hour"]) for s in settled}) == 1
    assert settled[0]["raw"] <= 2 * PER_DAY * len(DEVICES) and settled[0]["hour"] <= 9 * 24 * len(DEVICES)
    assert [s["day"] for s in settled] == [settled[0]["day"] + i * len(DEVICES) for i in range(len(settled))]
    # the same through each filter, and a range that starts in the daily, the hourly and the raw part
    same_drift(store, reference, device="pi-b")
    same_drift(store, reference, model="m", version=1)
    for days_ago in (20, 5, 1):
        since = iso(T0 + (30 - days_ago) * DAY)
        assert same_drift(store, reference, since=since)["first"] >= iso(T0 + (30 - days_ago) * DAY - DAY / PER_DAY)
    assert set(merged_drift(store, since=iso(T0 + 29 * DAY))[0]["resolutions"]) == {"raw"}
    reference.close()


def test_buckets_keep_the_counters_alerts_and_pages_need(store):
    reference = SqliteStore(":memory:")
    simulate(store, reference, 4)
    buckets = store.history_buckets("hour", device="pi-a") + store.history_buckets("day", device="pi-a")
    raw = [json.loads(window("pi-a", seq)[1]) for seq in range(1, 4 * PER_DAY + 1)]
    rolled = raw[: sum(b["windows"] for b in buckets)]
    assert sum(b["rows"] for b in buckets) == sum(w["rows"] for w in rolled)
    assert sum(b["labelled"] for b in buckets) == sum((w["accuracy"] or {}).get("labelled", 0) for w in rolled)
    assert sum(b["correct"] for b in buckets) == sum((w["accuracy"] or {}).get("correct", 0) for w in rolled)
    assert sum(b["errors"].get("invalid_input", 0) for b in buckets) == sum(
        w["errors"].get("invalid_input", 0) for w in rolled
    )
    assert sum(b["drifted"] for b in buckets) == sum(bool(w["drift"]["drifted"]) for w in rolled)
    assert sum(b["tested"] for b in buckets) == sum(w["drift"]["drifted"] is not None for w in rolled)
    assert max(b["p99_ms_max"] for b in buckets) == max(w["latency"]["p99_ms"] for w in rolled)
    reference.close()


def test_a_second_pass_changes_nothing(store):
    reference = SqliteStore(":memory:")
    simulate(store, reference, 14)
    before = store.history_sizes()
    again = run_pass(store, POLICY, T0 + 14 * DAY)
    assert (again.rolled, again.hourly_rolled, again.expired, again.batches) == (0, 0, 0, 0)
    assert store.history_sizes() == before
    same_drift(store, reference)
    reference.close()


def test_a_crash_inside_a_rollup_leaves_no_double_counting(store, monkeypatch):
    reference = SqliteStore(":memory:")
    simulate(store, reference, 12, tick=lambda *a: None)  # nothing rolled up yet: twelve days of raw windows
    original = type(store)._add_buckets
    crashes = {"hour": 0, "day": 0}

    def crashing(self, db, buckets, merge, now):
        buckets = list(buckets)
        original(self, db, buckets, merge, now)  # the buckets are written, the rows they replace not yet deleted
        resolution = buckets[0]["resolution"]
        if crashes[resolution] == 0:
            crashes[resolution] += 1
            raise RuntimeError(f"power cut while rolling into {resolution} buckets")

    monkeypatch.setattr(type(store), "_add_buckets", crashing)
    before = store.history_sizes()
    with pytest.raises(RuntimeError, match="hour"):
        run_pass(store, POLICY, T0 + 12 * DAY)
    assert store.history_sizes() == before  # rolled back whole
    same_drift(store, reference)
    with pytest.raises(RuntimeError, match="day"):
        run_pass(store, POLICY, T0 + 12 * DAY)  # the raw step completes; the first daily batch crashes
    same_drift(store, reference)
    monkeypatch.setattr(type(store), "_add_buckets", original)
    run_pass(store, POLICY, T0 + 12 * DAY)
    report = same_drift(store, reference)
    assert set(report["resolutions"]) == {"raw", "hour", "day"}
    reference.close()


def test_a_redelivered_window_is_counted_once(store):
    reference = SqliteStore(":memory:")
    simulate(store, reference, 5)
    late = window("pi-a", 3)  # rolled up days ago; the device resends it from its spool
    assert Ingestor(store).handle([Message(*late, T0 + 5 * DAY)])["stored"] == 1  # its raw row was gone
    same_drift(store, reference)  # not counted twice meanwhile
    Ingestor(store).handle(day_of_windows(5))
    Ingestor(reference).handle(day_of_windows(5))
    result = run_pass(store, POLICY, T0 + 6 * DAY)
    assert result.redeliveries == 1 and result.rolled == PER_DAY * len(DEVICES)
    same_drift(store, reference)


def test_a_late_window_after_a_rollup_is_merged_exactly_once(store):
    """Windows that arrive after their device's later windows were rolled up (a gap the collector asked for, or
    a row a pass skipped as the table's last): before, they were taken for redeliveries, hidden from merged drift
    and deleted unmerged. Each is counted once: raw while it waits, then in its bucket; a real redelivery of it
    afterwards is still dropped."""
    reference = SqliteStore(":memory:")  # every window once, never rolled up
    for st in (store, reference):
        Ingestor(st).handle([Message(*baseline_message(BASE, DEVICES[0]), T0)])
    missing = {("pi-a", 10), ("pi-b", 30), ("pi-b", 31)}
    for day in range(5):
        messages = day_of_windows(day)
        Ingestor(store).handle(
            [m for m in messages if (m.topic.split("/")[3], json.loads(m.payload)["seq"]) not in missing]
        )
        Ingestor(reference).handle(messages)
        run_pass(store, POLICY, T0 + (day + 1) * DAY)
    same_drift(store, reference, device="pi-c")
    late = [Message(*window(device, seq), T0 + 5 * DAY) for device, seq in sorted(missing)]
    assert Ingestor(store).handle(late)["stored"] == 3
    same_drift(store, reference)  # counted at once, as raw windows
    first = run_pass(store, POLICY, T0 + 5 * DAY)  # pi-b 31, the table's last row, waits for the next pass
    assert (first.rolled, first.redeliveries) == (2, 0)
    same_drift(store, reference)
    for st in (store, reference):
        Ingestor(st).handle(day_of_windows(5))
    second = run_pass(store, POLICY, T0 + 6 * DAY)
    assert (second.rolled, second.redeliveries) == (1 + PER_DAY * len(DEVICES), 0)
    same_drift(store, reference)
    Ingestor(store).handle([Message(*window("pi-a", 10), T0 + 6 * DAY)])  # resent once more: a redelivery now
    same_drift(store, reference)
    for st in (store, reference):
        Ingestor(st).handle(day_of_windows(6))
    third = run_pass(store, POLICY, T0 + 7 * DAY)
    assert third.redeliveries == 1
    report = same_drift(store, reference)
    assert report["windows"] == 7 * PER_DAY * len(DEVICES)
    hourly = store.history_buckets("hour", device="pi-b") + store.history_buckets("day", device="pi-b")
    raw_left = sum(1 for w in store.history_windows(device="pi-b") if w["resolution"] == "raw")
    assert sum(b["windows"] for b in hourly) + raw_left == 7 * PER_DAY  # no window lost, none twice
    reference.close()


def test_a_device_keeps_its_newest_windows_raw_for_the_alert_rules(store):
    reference = SqliteStore(":memory:")
    simulate(store, reference, 2, tick=lambda *a: None)
    run_pass(store, POLICY, T0 + 40 * DAY)  # long silent: everything is past raw retention
    assert store.history_sizes()["raw"] == 50 * len(DEVICES)
    assert len(store.recent_facts("pi-a", 10)) == 10
    same_drift(store, reference)


def test_the_leader_tick_applies_the_stored_policy_at_most_every_period(store):
    reference = SqliteStore(":memory:")
    simulate(store, reference, 4, tick=lambda *a: None)
    retention = Retention(store, every=300, max_batches=1)
    assert retention.tick(T0 + 4 * DAY) is None  # no policy stored: nothing to do
    store.set_retention_policy(POLICY.to_dict(), T0)
    retention._next = 0.0
    first = retention.tick(T0 + 4 * DAY)
    assert first is not None and first.batches == 1 and not first.done  # cut short: resumes at once
    while not (result := retention.tick(T0 + 4 * DAY)).done:
        pass
    assert retention.tick(T0 + 4 * DAY + 10) is None  # done: waits for the period
    assert result.policy == POLICY.to_dict()
    same_drift(store, reference)


def test_policy_texts_and_their_errors():
    assert RetentionPolicy.parse("7d", "90d", "forever").to_dict() == {
        "raw": 7 * DAY,
        "hourly": 90 * DAY,
        "daily": None,
    }
    assert RetentionPolicy.from_text("raw=36h, hourly=2w").describe() == "raw 36h, hourly 2w, daily forever"
    assert parse_duration("2w", "raw") == 14 * DAY and parse_duration("forever", "daily") is None
    for bad, said in (
        (("7x", None, None), "--raw '7x' is not a retention period"),
        (("-1d", None, None), "is not a retention period"),
        (("30m", None, None), "--raw 30m is too short"),
        (("10d", "2d", None), "out of order"),
        (("forever", "90d", None), "out of order"),
    ):
        with pytest.raises(EdgekitError, match=said):
            RetentionPolicy.parse(*bad)
    with pytest.raises(EdgekitError, match="is not raw=, hourly= or daily="):
        RetentionPolicy.from_text("raw=7d,weekly=1y")


def test_profiles_of_different_baselines_do_not_merge():
    a = POOL[0]["profile"]
    with pytest.raises(Exception, match="different baselines"):
        merge_compact(a, {**a, "baseline_id": "other"})
    assert merge_compact(a, None) is a


def test_cli_retention_rolls_up_stores_the_policy_and_says_what_it_did(cli, tmp_path):
    db = tmp_path / "fleet.db"
    with SqliteStore(db) as store, SqliteStore(":memory:") as reference:
        simulate(store, reference, 3, tick=lambda *a: None)
    result = cli("fleet", "retention", "--db", db, "--raw", "1d", "--hourly", "2d")
    assert result.exit_code == 0, result.output
    assert "retention raw 1d, hourly 2d, daily forever" in result.stdout
    assert "rolled" in result.stdout and "kept:" in result.stdout
    with SqliteStore(db) as store:
        assert store.retention_policy() == {"raw": DAY, "hourly": 2 * DAY, "daily": None}
        sizes = store.history_sizes()  # the simulated month is long past: all of it daily, but the newest windows
        assert sizes["day"] > 0 and sizes["raw"] == 50 * len(DEVICES)
    again = cli("fleet", "retention", "--db", db, "--json")  # the stored policy
    assert again.exit_code == 0 and json.loads(again.stdout)["policy"]["raw"] == DAY
    drift = cli("fleet", "drift", "--db", db)
    assert drift.exit_code == 0 and "from raw windows (150 windows), daily buckets" in drift.stdout


@pytest.mark.parametrize(
    "args, said",
    [
        (["--raw", "7x"], "--raw '7x' is not a retention period; write a number and s, m, h, d or w"),
        (["--raw", "10d", "--hourly", "1d"], "out of order"),
        (["--raw", "10m"], "--raw 10m is too short"),
        ([], "no retention policy is stored"),
    ],
)
def test_cli_retention_errors_are_one_line(cli, tmp_path, args, said):
    db = tmp_path / "fleet.db"
    SqliteStore(db).close()
    result = cli("fleet", "retention", "--db", db, *args)
    assert result.exit_code == 2 and said in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_retention_needs_an_existing_database(cli, tmp_path):
    result = cli("fleet", "retention", "--db", tmp_path / "nope.db", "--raw", "7d")
    assert result.exit_code == 2 and "no fleet database here" in result.stderr


def test_the_leader_runs_retention_from_the_collector_setting(tmp_path):
    from edgekit.fleet.config import CollectorConfig
    from edgekit.fleet.service import FleetService

    service = FleetService(CollectorConfig(db=str(tmp_path / "fleet.db"), http=None, retention="raw=2d,hourly=10d"))
    try:
        duty = next(d for d in service.leader_duties() if d.name == "retention")
        assert duty.run.__self__.policy == POLICY
    finally:
        service.store.close()
    with pytest.raises(EdgekitError, match="retention raw '2x' is not a retention period"):
        CollectorConfig(retention="raw=2x")


def holes(store):
    with store.reading() as db:
        return [tuple(r) for r in db.execute("SELECT device, first_seq, last_seq, noted_at FROM history_holes")]


def test_holes_no_window_can_fill_are_forgotten_a_raw_period_after_they_were_noted(store):
    """A window missing when the rollup passed it leaves a hole, so that it is merged if it comes late; a raw
    period later no device resends it, and the hole goes: a device that loses windows now and then must not
    keep a row per loss for ever. What is left of a hole partly filled keeps its age; holes from before
    their age was kept count from the next pass."""
    Ingestor(store).handle([Message(*baseline_message(BASE, DEVICES[0]), T0)])
    missing = {("pi-a", 10), ("pi-a", 11), ("pi-a", 12)}
    for day in range(4):
        Ingestor(store).handle(
            [m for m in day_of_windows(day) if (m.topic.split("/")[3], json.loads(m.payload)["seq"]) not in missing]
        )
        run_pass(store, POLICY, T0 + (day + 1) * DAY)
    [(device, first, last, noted)] = holes(store)
    assert (device, first, last) == ("pi-a", 10, 12) and T0 + 2 * DAY < noted <= T0 + 4 * DAY
    Ingestor(store).handle([Message(*window("pi-a", 11), T0 + 4 * DAY)])  # late, but in time: merged
    Ingestor(store).handle([Message(*window("pi-c", 4 * PER_DAY + 1), T0 + 4 * DAY)])  # (never the last row)
    run_pass(store, POLICY, T0 + 4 * DAY + 1)
    assert holes(store) == [("pi-a", 10, 10, noted), ("pi-a", 12, 12, noted)]
    with store.atomic() as db:  # as a collector before migration 0015 left them
        db.execute("UPDATE history_holes SET noted_at = NULL WHERE first_seq = 12")
    done = run_pass(store, POLICY, noted + POLICY.raw + 1)
    assert done.holes_forgotten == 1 and "forgot 1 hole" in done.describe()
    assert holes(store) == [("pi-a", 12, 12, noted + POLICY.raw + 1)]
    Ingestor(store).handle([Message(*window("pi-a", 10), noted + POLICY.raw + 2)])  # too late: a redelivery
    Ingestor(store).handle([Message(*window("pi-c", 4 * PER_DAY + 2), noted + POLICY.raw + 2)])
    assert run_pass(store, POLICY, noted + POLICY.raw + 3).redeliveries == 1
    assert run_pass(store, POLICY, noted + 2 * POLICY.raw + 2).holes_forgotten == 1 and holes(store) == []


def test_a_hole_whose_late_window_waits_raw_is_not_forgotten(store):
    """A late window stored as the table's newest row waits for the next pass (never rolled up last): its hole
    must outlive the pass that would forget it, or the window would be dropped as a redelivery."""
    Ingestor(store).handle([Message(*baseline_message(BASE, DEVICES[0]), T0)])
    for day in range(4):
        Ingestor(store).handle([m for m in day_of_windows(day) if json.loads(m.payload)["seq"] != 10])
        run_pass(store, POLICY, T0 + (day + 1) * DAY)
    noted = {hole[3] for hole in holes(store)}.pop()
    late = [Message(*window(device, 10), noted + POLICY.raw + 1) for device in DEVICES]
    Ingestor(store).handle(late)  # pi-c's is the table's newest row: this pass leaves it raw
    first = run_pass(store, POLICY, noted + POLICY.raw + 1)
    assert first.holes_forgotten == 0 and [hole[:3] for hole in holes(store)] == [("pi-c", 10, 10)]
    Ingestor(store).handle([Message(*window("pi-a", 4 * PER_DAY + 1), noted + POLICY.raw + 2)])
    second = run_pass(store, POLICY, noted + POLICY.raw + 2)
    assert second.rolled >= 1 and second.redeliveries == 0 and holes(store) == []
