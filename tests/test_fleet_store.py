"""The collector's ingest, store and merge, without a broker."""

import json
import random
import time

import pytest

from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.merge import merged_drift, since_timestamp
from edgekit.fleet.store import PostgresStore, SqliteStore
from tests.fleet_helpers import baseline, baseline_message, state, summary

BASE = baseline()


def feed(ingestor, *messages, now=1.7e9):
    return ingestor.handle([Message(topic, payload, now) for topic, payload in messages])


STORES = {  # every store implementation runs this file's contract tests
    "sqlite-file": lambda request, tmp_path: SqliteStore(tmp_path / "fleet.db"),
    "sqlite-memory": lambda request, tmp_path: SqliteStore(":memory:"),
    "postgresql": lambda request, tmp_path: PostgresStore(request.getfixturevalue("postgres_url")),
}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    opened = STORES[request.param](request, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def file_store(tmp_path):
    """A store that a second connection (another collector process) can open too."""
    opened = SqliteStore(tmp_path / "fleet.db")
    yield opened
    opened.close()


def test_migrations_are_recorded_and_applied_once(tmp_path):
    first = SqliteStore(tmp_path / "fleet.db")
    assert first.db.execute("SELECT name FROM migrations").fetchall()[0][0] == "0001_initial"
    assert first.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    first.close()
    assert SqliteStore(tmp_path / "fleet.db").migrate() == []


def test_redelivery_is_counted_never_stored_twice(store):
    ingestor = Ingestor(store)
    message = summary(BASE, "d1", 1)
    assert feed(ingestor, message)["stored"] == 1
    assert feed(ingestor, message)["duplicates"] == 1
    device = store.status()[0]
    assert (device["windows"], device["rows"], device["redeliveries"]) == (1, 500, 1)


@pytest.mark.parametrize("burst_seconds", [0.0, 30.0])
def test_a_batch_mixing_new_and_redelivered_windows_stores_each_once(store, burst_seconds, monkeypatch):
    """PostgreSQL COPYs a batch straight in and falls back to ON CONFLICT when that hits a stored window (or the
    same window twice in one batch), and for ``REDELIVERY_BURST_SECONDS`` after: either way each window is
    stored once and the rest counted as redelivered."""
    monkeypatch.setattr("edgekit.fleet.store.postgres.REDELIVERY_BURST_SECONDS", burst_seconds)
    ingestor = Ingestor(store)
    assert feed(ingestor, summary(BASE, "d1", 1), summary(BASE, "d2", 1))["stored"] == 2
    outcome = feed(ingestor, summary(BASE, "d1", 1), summary(BASE, "d1", 2), summary(BASE, "d1", 2))
    assert (outcome["stored"], outcome["duplicates"]) == (1, 2)
    assert feed(ingestor, summary(BASE, "d1", 3), summary(BASE, "d2", 2))["stored"] == 2  # straight, or not yet
    windows = {d["device"]: (d["windows"], d["redeliveries"], d["missing_seqs"]) for d in store.status()}
    assert windows == {"d1": (3, 2, 0), "d2": (2, 0, 0)}


def test_gaps_are_found_requested_and_filled(store):
    ingestor = Ingestor(store)
    feed(ingestor, summary(BASE, "d1", 1), summary(BASE, "d1", 2), summary(BASE, "d1", 5))
    assert store.status()[0]["missing_seqs"] == 2
    found = time.time()
    assert store.gaps_to_request(now=found + 1) == {}  # maybe still in another collector process's batch: wait
    assert store.gaps_to_request(now=found + 100) == {"d1": [3, 4]}
    assert store.gaps_to_request(now=found + 110, retry_after=30) == {}  # asked recently: wait
    feed(ingestor, summary(BASE, "d1", 3))
    assert store.gaps_to_request(now=found + 200) == {"d1": [4]}
    status = store.status()[0]
    assert status["windows"] == 4 and status["rows"] == 2000


def test_status_combines_state_and_summaries(store):
    ingestor = Ingestor(store)
    feed(ingestor, state("d1", True), summary(BASE, "d1", 1, shift=3.0), state("d2", False))
    by_device = {d["device"]: d for d in store.status()}
    assert (
        by_device["d1"]["online"] is True
        and by_device["d1"]["drifted"] is True
        and by_device["d1"]["worst_feature"] == "f0"
    )
    assert by_device["d2"]["online"] is False and by_device["d2"]["windows"] == 0
    assert set(by_device["d1"]) >= {
        "device",
        "fleet",
        "online",
        "model",
        "model_version",
        "last_seen",
        "windows",
        "rows",
        "drifted",
        "worst_feature",
    }


@pytest.mark.parametrize(
    "topic, payload, reason",
    [
        ("edgekit/v1/f/d1/summary", b"\xff\x00garbage", "json"),
        ("edgekit/v1/f/d1/summary", b"[1, 2]", "json"),
        ("edgekit/v1/f/d1/summary", b'{"schema": "edgekit.summary/0"}', "schema"),
        ("edgekit/v1/f/d1/summary", b'{"schema": "edgekit.summary/1", "device": "d1"}', "field"),
        ("edgekit/v1/f/d1/summary", b"{" + b" " * 300_000 + b"}", "size"),
        ("edgekit/v1/f/../summary", b"{}", "topic"),
        ("other/topic", b"{}", "topic"),
    ],
)
def test_bad_payloads_are_rejected_and_counted_by_reason(store, topic, payload, reason):
    outcome = feed(Ingestor(store), (topic, payload))
    assert outcome[f"rejected_{reason}"] == 1
    assert store.rejects() == {reason: 1}


def test_a_device_cannot_speak_for_another_and_unknown_devices_are_refused(store):
    topic, payload = summary(BASE, "d1", 1)
    assert feed(Ingestor(store), ("edgekit/v1/f/d2/summary", payload))["rejected_mismatch"] == 1
    assert feed(Ingestor(store, allowed_devices={"d9"}), (topic, payload))["rejected_unknown-device"] == 1
    assert store.status() == []


def test_ten_thousand_fuzzed_payloads_never_crash_the_ingestor(store):
    """Mutations of valid summaries, states and baselines: bytes flipped, fields dropped or retyped, junk."""
    rng = random.Random(1)
    valid = [summary(BASE, "d1", s) for s in range(1, 6)] + [state("d1", True), baseline_message(BASE, "d1")]
    docs = [(t, json.loads(p)) for t, p in valid]
    junk_values = [None, -1, 2**70, "x" * 100, [], {}, 1.5, True, float("inf")]

    def mutate(doc):
        doc = json.loads(json.dumps(doc))
        for _ in range(rng.randint(1, 3)):
            target = doc
            path = []
            while isinstance(target, (dict, list)) and target and rng.random() < 0.6:
                key = rng.choice(list(target) if isinstance(target, dict) else range(len(target)))
                path.append(key)
                parent, target = target, target[key]
            if path:
                if rng.random() < 0.3 and isinstance(parent, dict):
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = rng.choice(junk_values)
        return json.dumps(doc, allow_nan=True).encode()

    ingestor = Ingestor(store)
    batch = []
    for i in range(10_000):
        topic, doc = rng.choice(docs)
        kind = rng.random()
        if kind < 0.6:
            payload = mutate(doc)
        elif kind < 0.8:
            raw = bytearray(json.dumps(doc).encode())
            for _ in range(rng.randint(1, 5)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            payload = bytes(raw)
        else:
            payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        batch.append(Message(topic, payload, 1.7e9 + i))
        if len(batch) == 500:
            ingestor.handle(batch)
            batch = []
    ingestor.handle(batch)
    counted = sum(v for k, v in ingestor.counters.items())
    assert counted == 10_000
    assert ingestor.counters["rejected_internal"] == 0, store.rejects()
    assert sum(store.rejects().values()) == sum(v for k, v in ingestor.counters.items() if k.startswith("rejected_"))
    assert feed(ingestor, summary(BASE, "d7", 1))["stored"] == 1  # still healthy


def test_drift_merges_windows_across_devices_and_time(store):
    ingestor = Ingestor(store)
    feed(ingestor, baseline_message(BASE, "d1"))
    feed(
        ingestor,
        *[summary(BASE, "d1", s, rows=300) for s in range(1, 4)],
        *[summary(BASE, "d2", s, rows=300, shift=1.0, seed=100 + s) for s in range(1, 4)],
    )
    fleet = merged_drift(store)
    assert (
        len(fleet) == 1
        and fleet[0]["devices"] == ["d1", "d2"]
        and fleet[0]["rows"] == 1800
        and fleet[0]["windows"] == 6
    )
    assert fleet[0]["drift"]["features"]["f0"]["drifted"] is True
    clean = merged_drift(store, device="d1")[0]
    assert clean["drift"]["drifted"] is False and clean["rows"] == 900
    assert merged_drift(store, model="other") == []
    assert fleet[0]["feature_distributions"]["f0"]["baseline"] == BASE.features[0].counts.tolist()


def test_drift_without_a_published_baseline_says_so(store):
    feed(Ingestor(store), summary(BASE, "d1", 1))
    assert "no device has published this baseline" in merged_drift(store)[0]["note"]


def test_since_durations():
    assert since_timestamp("1h", now=3600.0 * 24) == "1970-01-01T23:00:00.000Z"
    with pytest.raises(Exception, match="is not a duration"):
        since_timestamp("yesterday")


def test_a_window_without_a_verdict_does_not_hide_the_last_verdict(store):
    ingestor = Ingestor(store)
    feed(
        ingestor, summary(BASE, "d1", 1, shift=3.0), summary(BASE, "d1", 2, rows=20)
    )  # 20 rows: below min_rows, no verdict
    device = store.status()[0]
    assert device["drifted"] is True and device["worst_feature"] == "f0" and device["windows"] == 2


def test_the_last_window_of_a_swapped_out_model_does_not_undo_the_new_state(store):
    """After a hot swap the device announces v2 at once; v1's last window is flushed a moment later
    with a higher seq. The fleet table must keep showing what the device serves now."""
    from tests.fleet_helpers import MODEL

    ingestor = Ingestor(store)
    v2 = {**MODEL, "version": MODEL["version"] + 1}
    feed(ingestor, summary(BASE, "d1", 1))  # no state yet: the summary names the model
    assert store.status()[0]["model_version"] == MODEL["version"]
    feed(ingestor, state("d1", True, model=v2), summary(BASE, "d1", 2))
    assert store.status()[0]["model_version"] == v2["version"]


def test_versions_sharing_a_baseline_merge_and_are_all_named(store):
    """v2 retrained on the same data keeps v1's baseline: one merged report, naming both versions."""
    from tests.fleet_helpers import MODEL

    ingestor = Ingestor(store)
    v2 = {**MODEL, "version": MODEL["version"] + 1}
    feed(ingestor, baseline_message(BASE, "d1"), summary(BASE, "d1", 1), summary(BASE, "d1", 2, model=v2))
    (report,) = merged_drift(store, device="d1")
    assert (
        report["model_versions"] == [MODEL["version"], v2["version"]]
        and report["model_version"] == v2["version"]
        and report["windows"] == 2
    )


def test_the_summary_watermark_names_devices_stored_by_another_process(file_store, tmp_path):
    """The main collector learns what its ingest workers stored (to run their alerts) from the watermark."""
    store = file_store
    mark = store.summary_watermark()
    assert store.devices_with_summaries_after(mark) == (set(), mark)
    other = SqliteStore(tmp_path / "fleet.db")  # a worker: its own connection to the same database
    feed(Ingestor(other), summary(BASE, "d1", 1), summary(BASE, "d2", 1))
    devices, mark = store.devices_with_summaries_after(mark)
    assert devices == {"d1", "d2"} and mark == store.summary_watermark()
    feed(Ingestor(other), summary(BASE, "d1", 1), summary(BASE, "d3", 1))  # a redelivery is not news
    assert store.devices_with_summaries_after(mark)[0] == {"d3"}
    other.close()


def test_unseen_category_rates_are_kept_for_the_alert_rules(store):
    """A typed window's unseen rate and the columns holding unseen values are in its alert facts; an
    ``edgekit.summary/1`` window (no unseen_rate) and a numeric model's read as 0."""
    from tests.tabular_helpers import typed_baseline, typed_summary

    ingestor = Ingestor(store)
    v1 = json.loads(summary(BASE, "d1", 1)[1])
    v1["schema"] = "edgekit.summary/1"
    v1["quality"].pop("unseen_rate")
    outcome = feed(
        ingestor,
        ("edgekit/v1/f/d1/summary", json.dumps(v1).encode()),
        summary(BASE, "d2", 1),
        typed_summary(typed_baseline(), "d3", 1, unseen=0.1),
    )
    assert outcome["stored"] == 3
    for device in ("d1", "d2"):
        facts = store.recent_facts(device, 1)[0]
        assert (facts["unseen_rate"], facts["unseen_columns"]) == (0.0, {})
    facts = store.recent_facts("d3", 1)[0]
    assert facts["unseen_rate"] == pytest.approx(0.1, abs=0.03)
    assert facts["unseen_columns"] == {"country": pytest.approx(facts["unseen_rate"], abs=1e-4)}


def test_rows_stored_before_unseen_rates_existed_read_as_zero(file_store):
    feed(Ingestor(file_store), summary(BASE, "d1", 1))
    file_store.db.execute("UPDATE summaries SET facts = json_remove(facts, '$.unseen_rate', '$.unseen_columns')")
    assert "unseen_rate" not in file_store.db.execute("SELECT facts FROM summaries").fetchone()[0]
    facts = file_store.recent_facts("d1", 1)[0]
    assert (facts["unseen_rate"], facts["unseen_columns"], facts["seq"]) == (0.0, {}, 1)


def test_categorical_columns_merge_into_parts_against_the_baseline(store):
    """Windows of a typed model merge per category; each column's rows split into the baseline's
    categories, other, unseen and missing; each column's quality is its share of the merged rows."""
    from edgekit.fleet.merge import device_columns
    from tests.tabular_helpers import typed_baseline, typed_baseline_message, typed_summary

    base, ingestor = typed_baseline(), Ingestor(store)
    windows = [typed_summary(base, "d1", s, shift=0.5, unseen=0.1, missing=0.2) for s in (1, 2, 3)]
    feed(ingestor, typed_baseline_message(base, "d1"), *windows)
    unseen = sum(json.loads(payload)["profile"]["features"][1][2] for _, payload in windows)  # [counts, nulls, unseen]
    (report,) = merged_drift(store, device="d1")
    country = report["categories"]["country"]
    assert country["labels"][-3:] == ["other", "unseen", "missing"] and "IN" in country["labels"]
    assert sum(country["recent"]) == 1500 and country["recent"][-2] == unseen and country["baseline"][-3:] == [0, 0, 0]
    assert report["drift"]["features"]["country"]["drifted"] is True and "amount" not in report["categories"]
    columns = device_columns(store, list(store.summaries(device="d1")))
    assert (columns["windows"], columns["rows"]) == (3, 1500)
    assert [c["column"] for c in columns["categories"]] == ["country", "plan"]
    assert columns["kinds"] == {"amount": "numeric", "country": "categorical", "plan": "categorical"}
    assert columns["quality"]["plan"]["null_rate"] == pytest.approx(0.2, abs=0.03)
    assert columns["quality"]["country"] == {"null_rate": 0.0, "unseen_rate": unseen / 1500}


def test_a_gap_asked_for_long_enough_is_given_up_but_still_counted(store):
    from edgekit.fleet.store.sql import GAP_MAX_REQUESTS

    ingestor = Ingestor(store)
    feed(ingestor, summary(BASE, "d1", 1), summary(BASE, "d1", 3))
    now = time.time() + 100
    asked = 0
    for _ in range(GAP_MAX_REQUESTS + 5):
        asked += len(store.gaps_to_request(now=now).get("d1", []))
        now += 31
    assert asked == GAP_MAX_REQUESTS
    assert store.status()[0]["missing_seqs"] == 1
