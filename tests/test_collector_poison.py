"""A message the collector's code cannot store costs only itself: the rest are stored and acknowledged, and
delivery goes on without a reconnect (an unacknowledged QoS 1 message holds one of the broker's inflight slots)."""

from __future__ import annotations

import logging
import sqlite3
import time
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

import edgekit.fleet.collector as collector_module
from edgekit.errors import StoreUnavailable
from edgekit.fleet.collector import Collector
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.ingest import Message
from edgekit.fleet.metrics import render as render_metrics
from tests.fleet_helpers import baseline, summary, wait
from tests.test_metrics_exposition import promtool_check

BASE = baseline()
POISON = "poison"


class BuggyStore:
    """Wraps the real store's ``add_summaries``: a batch holding a summary of the POISON device raises a
    RuntimeError (a bug, not the database); ``down`` makes it raise StoreUnavailable instead."""

    def __init__(self, store, monkeypatch) -> None:
        self.real, self.down, self.calls = store.add_summaries, False, 0
        monkeypatch.setattr(store, "add_summaries", self)

    def __call__(self, records, now):
        self.calls += 1
        if self.down:
            raise StoreUnavailable("the fleet database is gone for a moment", "it is retried")
        if any(r.device == POISON for r in records):
            raise RuntimeError("a bug that only this device's summaries reach")
        return self.real(records, now)


def stored(db) -> list[tuple[str, int, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT device, seq, count(*) FROM summaries GROUP BY device, seq").fetchall()


def good(fleet: str, seqs: range) -> list[tuple[str, bytes]]:
    return [summary(BASE, f"d{d}", seq, fleet=fleet, rows=20) for seq in seqs for d in range(4)]


@pytest.mark.network
def test_a_poison_summary_is_counted_and_acknowledged_and_the_rest_keep_flowing(
    tmp_path, broker, fleet_name, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="edgekit.fleet")
    # A window the first batch fills: unacknowledged, it would leave the broker no slot to send anything more.
    first = good(fleet_name, range(1, 6))
    first.insert(7, summary(BASE, POISON, 1, fleet=fleet_name, rows=20))
    monkeypatch.setattr(collector_module, "RECEIVE_MAXIMUM", len(first))
    db = tmp_path / "fleet.db"
    config = CollectorConfig(
        broker=broker.url, db=str(db), http=None, client_id=f"c-{fleet_name}", group=fleet_name[-6:]
    )
    collector = Collector(config)
    store = BuggyStore(collector.store, monkeypatch)
    publisher = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        collector.start()
        assert collector.subscribed.wait(10)  # published before it, a summary reaches no one
        collector._store_retry_at = time.monotonic() + 3600  # the writer waits: the whole burst is one batch
        for topic, payload in first:
            publisher.publish(topic, payload, qos=1).wait_for_publish(5)
        wait(lambda: collector.received == len(first), timeout=10, what="the first burst received")
        collector._store_retry_at = 0.0
        wait(lambda: len(stored(db)) == len(first) - 1, timeout=10, what="the good summaries of the first burst")
        wait(lambda: collector.ingestor.counters["failed"] == 1, timeout=10, what="the poison summary counted")

        later = good(fleet_name, range(6, 11))  # past a full window: the broker sends only if all were acked
        for topic, payload in later:
            publisher.publish(topic, payload, qos=1).wait_for_publish(5)
        wait(lambda: len(stored(db)) == len(first) + len(later) - 1, timeout=10, what="the later summaries")
        exposition = render_metrics(collector).decode()
        assert 'edgekit_collector_messages_total{outcome="failed"} 1.0' in exposition
        promtool_check(exposition)
    finally:
        collector.stop()
    assert sorted(stored(db)) == sorted((f"d{d}", seq, 1) for seq in range(1, 11) for d in range(4))
    assert collector.ingestor.counters["failed"] == 1 and collector.ingestor.counters["stored"] == 40
    dropped = [r for r in caplog.records if r.getMessage().startswith("dropped a message the collector cannot")]
    assert len(dropped) == 1 and f"{fleet_name}/{POISON}/summary" in dropped[0].getMessage()
    assert dropped[0].exc_info and "only this device" in str(dropped[0].exc_info[1])
    assert sum("collector connected to" in r.getMessage() for r in caplog.records) == 1  # no reconnect
    assert store.calls > 2  # the batch was split

    # Everything was acknowledged, the poison summary included: the session holds nothing to redeliver.
    again = Collector(config)
    try:
        again.start()
        assert again.connected.wait(10)
        time.sleep(1.5)
        assert again.received == 0
        assert again.store.rejects().get("failed") == 1  # counted for every collector on this store
    finally:
        again.stop()
        publisher.loop_stop()
        publisher.disconnect()


def offline_collector(tmp_path, monkeypatch, batch):
    """A collector that is not connected: its queue filled by hand, its acknowledgements recorded."""
    collector = Collector(CollectorConfig(db=str(tmp_path / "fleet.db"), http=None))
    acked: list[int] = []
    collector._client = SimpleNamespace(ack=lambda mid, qos: acked.append(mid), disconnect=list, loop_stop=list)
    for mid, (topic, payload) in enumerate(batch, start=1):
        collector._queue.append((Message(topic, payload, time.time()), mid, 1))
    return collector, BuggyStore(collector.store, monkeypatch), acked


def test_the_database_going_away_mid_split_puts_the_rest_back_unacknowledged(tmp_path, monkeypatch):
    batch = good("f", range(1, 3))  # d0..d3 seq 1, then seq 2
    batch.insert(2, summary(BASE, POISON, 1, rows=20))
    collector, store, acked = offline_collector(tmp_path, monkeypatch, batch)
    real = store.real

    def first_part_then_down(records, now):  # the first part that goes through is the last before the outage
        result = real(records, now)
        store.down = True
        return result

    store.real = first_part_then_down
    try:
        assert collector.drain() == 2  # [d0, d1] stored; then [poison, d2] meets the outage
        assert acked == [1, 2]
        assert [mid for _, mid, _ in collector._queue] == list(range(3, len(batch) + 1))
        assert collector.ingestor.counters["failed"] == 0 and collector._store_retry_at > time.monotonic()
        assert collector.drain() == 0  # backing off

        store.real, store.down, collector._store_retry_at = real, False, 0.0  # the database is back
        assert collector.drain() == len(batch) - 3  # all but the two stored before and the poison
        assert sorted(acked) == list(range(1, len(batch) + 1)) and not collector._queue
        assert collector.ingestor.counters["failed"] == 1 and collector._store_backoff == 0.0
        assert len(stored(tmp_path / "fleet.db")) == len(batch) - 1
    finally:
        collector.stop()


def test_a_bug_that_fails_every_message_acknowledges_none(tmp_path, monkeypatch):
    """Nothing in the batch went through: a bug, not one bad message; the batch waits, unacknowledged."""
    batch = [summary(BASE, POISON, seq, rows=20) for seq in range(1, 4)]
    collector, _, acked = offline_collector(tmp_path, monkeypatch, batch)
    try:
        assert collector.drain() == 0
        assert acked == [] and len(collector._queue) == 3 and collector.ingestor.counters["failed"] == 0
        # What arrives next shows the code works: the poison messages are then given up, the good one stored.
        topic, payload = summary(BASE, "d0", 1, rows=20)
        collector._queue.append((Message(topic, payload, time.time()), 99, 1))
        collector._store_retry_at = 0.0
        assert collector.drain() == 1
        assert sorted(acked) == [1, 2, 3, 99] and collector.ingestor.counters["failed"] == 3
    finally:
        collector.stop()
