"""One bad message never blocks its batch: a NUL in any string is refused by the protocol check, and a
message the store refuses anyway is counted and dropped on its own, on SQLite and on PostgreSQL alike;
a retained state with a NUL does not poison a collector (real Mosquitto, real PostgreSQL)."""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt
import pytest

from device_agent.errors import ProtocolError
from device_agent.protocol import STATE_SCHEMA, decode, reported_payload
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.service import FleetService
from tests.fleet_helpers import baseline, baseline_message, state, summary, wait


@pytest.fixture
def store(fleet_store):
    """SQLite and PostgreSQL (``conftest.fleet_store``)."""
    return fleet_store


def _with_nul(topic_payload: tuple[str, bytes], path: tuple[str, ...]) -> tuple[str, bytes]:
    topic, payload = topic_payload
    doc = json.loads(payload)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = f"{target[path[-1]]}\x00tail"
    return topic, json.dumps(doc).encode()


def test_the_protocol_check_refuses_a_nul_anywhere_and_only_a_real_one():
    doc = {"schema": STATE_SCHEMA, "device": "d", "nested": [{"error": "bad\x00text"}]}
    with pytest.raises(ProtocolError) as caught:
        decode(json.dumps(doc).encode(), STATE_SCHEMA)
    assert caught.value.reason == "nul" and "NUL" in str(caught.value)
    with pytest.raises(ProtocolError, match="NUL"):
        decode(json.dumps({"schema": STATE_SCHEMA, "key\x00": 1}).encode(), STATE_SCHEMA)
    # an escaped backslash followed by "u0000" is six ordinary characters, not a NUL
    fine = {"schema": STATE_SCHEMA, "device": "d", "note": "C:\\u0000"}
    assert decode(json.dumps(fine).encode(), STATE_SCHEMA)["note"] == "C:\\u0000"


def test_a_nul_in_a_state_report_or_baseline_is_refused_and_the_batch_goes_on(store):
    base = baseline()
    now = 1.7e9
    reports: list[dict] = []
    ingestor = Ingestor(store, clock=lambda: now, on_report=lambda doc, at: reports.append(doc))
    report = reported_payload(device="d2", fleet="f", rollout="r1", version=3, state="failed", reason="x\x00y")
    bad_baseline = _with_nul(baseline_message(base, "d3"), ("model", "name"))
    messages = [
        _with_nul(state("d1", True), ("agent_version",)),
        ("edgekit/v1/f/d2/reported", json.dumps(report).encode()),
        bad_baseline,
        _with_nul(summary(base, "d4", 1), ("drift", "worst_feature")),
        state("good", True),
        baseline_message(base, "good"),
        summary(base, "good", 1),
    ]
    outcome = ingestor.handle([Message(topic, payload, now) for topic, payload in messages])
    assert outcome["rejected_nul"] == 4
    assert (outcome["states"], outcome["baselines"], outcome["stored"]) == (1, 1, 1)
    assert reports == []
    assert {d["device"] for d in store.status()} == {"good"}


def test_a_message_the_store_refuses_is_dropped_alone_not_the_batch(store):
    """A report the protocol check lets through but no database column holds (a list for a version):
    before, its StoreDataError left ``handle`` and the whole batch was redelivered forever."""
    base = baseline()
    now = 1.7e9
    ingestor = Ingestor(store, clock=lambda: now, on_report=lambda doc, at: store.record_rollout_report(doc, {}, at))
    report = reported_payload(
        device="d2", fleet="f", rollout="r1", version=3, state="succeeded", active={"name": "m", "version": [3]}
    )
    messages = [
        ("edgekit/v1/f/d2/reported", json.dumps(report).encode()),
        state("good", True),
        summary(base, "good", 1),
    ]
    outcome = ingestor.handle([Message(topic, payload, now) for topic, payload in messages])
    assert outcome["rejected_internal"] == 1 and outcome["reports"] == 0
    assert (outcome["states"], outcome["stored"]) == (1, 1)
    assert ingestor.counters["rejected_internal"] == 1


def _publish(url: str, messages: list[tuple[str, bytes]], *, retain: bool) -> None:
    port = int(url.rsplit(":", 1)[1])
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def _collector(broker, postgres_url: str, fleet_name: str) -> FleetService:
    return FleetService(
        CollectorConfig(broker=broker.url, db=postgres_url, http="127.0.0.1:0", client_id=f"c-{fleet_name}")
    ).start()


@pytest.mark.network
def test_a_retained_state_with_a_nul_never_poisons_the_collector(broker, postgres_url, fleet_name):
    """Real Mosquitto and PostgreSQL: the retained bad state comes back at every (re)start; it is refused each
    time while the good device's state and summaries are stored."""
    base = baseline()
    _publish(broker.url, [_with_nul(state("bad", True, fleet=fleet_name), ("agent_version",))], retain=True)
    _publish(broker.url, [state("good", True, fleet=fleet_name)], retain=True)
    collector = _collector(broker, postgres_url, fleet_name)
    try:
        _publish(broker.url, [summary(base, "good", 1, fleet=fleet_name)], retain=False)
        wait(lambda: collector.drain() >= 0 and _windows(collector, "good") == 1, 30, "the first summary stored")
    finally:
        collector.stop()
    again = _collector(broker, postgres_url, fleet_name)
    try:
        _publish(broker.url, [summary(base, "good", 2, fleet=fleet_name)], retain=False)
        wait(lambda: again.drain() >= 0 and _windows(again, "good") == 2, 30, "a summary after the restart")
        assert {d["device"] for d in again.store.status()} == {"good"}
        assert again.ingestor.counters["rejected_nul"] >= 1
    finally:
        again.stop()


def _windows(collector: FleetService, device: str) -> int:
    return next((d["windows"] for d in collector.store.status() if d["device"] == device), 0)
