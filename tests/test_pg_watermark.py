"""PostgreSQL summary writers that overlap: the alert evaluator's watermark misses nothing, and the per-device
bookkeeping neither loses an update nor deadlocks (postgres.py: no lock serializes the writers)."""

import random
import threading

from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.store import PostgresStore
from tests.fleet_helpers import baseline, summary

BASE = baseline()


def feed(store, *messages):
    return Ingestor(store).handle([Message(topic, payload, 1.7e9) for topic, payload in messages])


def test_a_summary_committed_after_a_later_id_is_still_seen_by_the_watermark(postgres_url):
    """Writer A inserts first (the smaller id) and commits last; the evaluator looks in between."""
    late, early, evaluator = PostgresStore(postgres_url), PostgresStore(postgres_url), PostgresStore(postgres_url)
    inserted, release = threading.Event(), threading.Event()
    lock_devices = late._lock_devices

    def paused_after_insert(db, records, now):  # inside A's transaction, its row inserted and not committed
        inserted.set()
        assert release.wait(30)
        lock_devices(db, records, now)

    late._lock_devices = paused_after_insert
    outcome = {}
    writer = threading.Thread(target=lambda: outcome.update(feed(late, summary(BASE, "late", 1))))
    try:
        mark = evaluator.summary_watermark()
        writer.start()
        assert inserted.wait(30)
        feed(early, summary(BASE, "early", 1))
        seen, mark = evaluator.devices_with_summaries_after(mark)
        assert seen == {"early"}
        release.set()
        writer.join(30)
        assert outcome["stored"] == 1
        with evaluator.reading() as db:
            ids = dict(db.execute("SELECT device, id FROM summaries").fetchall())
        assert ids["late"] < ids["early"]  # committed out of id order: a max(id) watermark would skip "late"
        seen, mark = evaluator.devices_with_summaries_after(mark)
        assert "late" in seen
        assert evaluator.devices_with_summaries_after(evaluator.summary_watermark())[0] == set()
    finally:
        release.set()
        for store in (late, early, evaluator):
            store.close()


def test_two_writers_sharing_devices_lose_no_update_and_do_not_deadlock(postgres_url):
    """Odd seqs through one store, even through the other, at once, each batch in its own device order."""
    devices = [f"d{i:02d}" for i in range(20)]
    messages = {seq: [summary(BASE, d, seq, rows=50, seed=seq) for d in devices] for seq in range(1, 21)}
    stores = [PostgresStore(postgres_url), PostgresStore(postgres_url)]
    failures = []

    def write(store, seqs, rng):
        try:
            for seq in seqs:
                batch = list(messages[seq])
                rng.shuffle(batch)
                assert feed(store, *batch)["stored"] == len(devices)
        except Exception as exc:  # a deadlock or a failed batch ends the run, and the test
            failures.append(exc)

    threads = [
        threading.Thread(target=write, args=(stores[parity], range(1 + parity, 21, 2), random.Random(parity)))
        for parity in (0, 1)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []
        status = stores[0].status()
        with stores[0].reading() as db:
            max_seqs = dict(db.execute("SELECT device, max_seq FROM devices").fetchall())
    finally:
        for store in stores:
            store.close()
    assert {d["device"]: (d["windows"], d["missing_seqs"]) for d in status} == {d: (20, 0) for d in devices}
    assert max_seqs == {d: 20 for d in devices}
