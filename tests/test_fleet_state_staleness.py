"""A device's row follows its current fleet, not the last retained state a broker replays.

A device that moved fleets (a reflashed Pi; ``edgekit emulate`` run again with another ``--fleet`` and the
same device ids) leaves its old fleet's retained ``state`` on the broker, and every collector that connects
gets them all, in topic order. The rule (``sql._STATE_APPLIES``): an online state beats another fleet's
offline one, an offline one never moves a device online elsewhere, and like against like the later
``issued_at`` wins.
"""

from __future__ import annotations

import json
import math
import time

import paho.mqtt.client as mqtt
import pytest

from device_agent.errors import ProtocolError
from device_agent.protocol import check_state, decode, encode, state_payload
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.service import FleetService
from tests.fleet_helpers import MODEL, wait


def state_doc(fleet: str, online: bool, issued_at: float | None, device: str = "emu-00", **extra) -> dict:
    doc = state_payload(
        online=online,
        device=device,
        fleet=fleet,
        model=MODEL if online else None,
        runtime="onnxruntime",
        agent_version="0.1.0",
        issued_at=issued_at if issued_at is not None else 0.0,
        **extra,
    )
    if issued_at is None:  # as an agent that predates the field sends it
        del doc["issued_at"]
    return doc


def row(store, device: str = "emu-00") -> tuple[str, bool | None]:
    found = {d["device"]: d for d in store.status()}[device]
    return found["fleet"], found["online"]


# -- the payload --------------------------------------------------------------------------------------------
def test_a_state_carries_when_it_was_made_and_old_states_still_read():
    before = time.time()
    doc = decode(
        encode(state_payload(online=True, device="d", fleet="f", model=None, runtime=None, agent_version="1")),
        "edgekit.state/1",
    )
    assert before - 0.01 <= check_state(doc)["issued_at"] <= time.time() + 0.01
    old = {k: v for k, v in doc.items() if k != "issued_at"}  # an agent from before the field
    assert check_state(old) == old
    for bad in (-1.0, "yesterday", True, math.inf, 2.0**60):
        with pytest.raises(ProtocolError, match="issued_at"):
            check_state({**doc, "issued_at": bad})


# -- the store's rule, on SQLite and PostgreSQL -------------------------------------------------------------
def test_an_old_fleets_offline_state_never_moves_a_live_device(fleet_store):
    assert fleet_store.record_state(state_doc("lab", True, 100.0), 1.0) is True
    for fleet, issued_at in (("lab2", 500.0), ("lab3", 600.0), ("lab2", None)):  # newer, and time unknown
        assert fleet_store.record_state(state_doc(fleet, False, issued_at), 2.0) is False
    assert row(fleet_store) == ("lab", True)


def test_a_live_device_beats_the_offline_state_of_the_fleet_it_left(fleet_store):
    """The offline state's time is its connect time (the last will is fixed then), not when it went away."""
    fleet_store.record_state(state_doc("lab3", False, 600.0), 1.0)
    assert fleet_store.record_state(state_doc("lab", True, 100.0), 2.0) is True
    assert row(fleet_store) == ("lab", True)


def test_like_against_like_the_later_state_wins(fleet_store):
    fleet_store.record_state(state_doc("lab", True, 200.0), 1.0)
    assert fleet_store.record_state(state_doc("lab2", True, 150.0), 2.0) is False  # an older retained online
    assert row(fleet_store) == ("lab", True)
    assert fleet_store.record_state(state_doc("lab2", True, 250.0), 3.0) is True  # the device moved
    assert row(fleet_store) == ("lab2", True)
    fleet_store.record_state(state_doc("lab2", False, 250.0), 4.0)
    assert fleet_store.record_state(state_doc("lab3", False, 240.0), 5.0) is False
    assert fleet_store.record_state(state_doc("lab3", False, None), 5.0) is False  # not shown to be newer
    assert fleet_store.record_state(state_doc("lab3", False, 260.0), 6.0) is True
    assert row(fleet_store) == ("lab3", False)


def test_in_its_own_fleet_every_state_applies_and_old_agents_still_move(fleet_store):
    fleet_store.record_state(state_doc("lab", True, 300.0), 1.0)
    assert fleet_store.record_state(state_doc("lab", False, 100.0), 2.0) is True  # the will: stamped at connect
    assert row(fleet_store) == ("lab", False)
    assert fleet_store.record_state(state_doc("lab", True, None), 3.0) is True
    assert fleet_store.record_state(state_doc("lab2", True, None), 4.0) is True  # no times: an online state moves
    assert row(fleet_store) == ("lab2", True)


def test_a_stale_state_announces_no_gaps(fleet_store):
    """Its ``last_seq`` counts another instance's windows (another state dir): no resends to ask for."""
    fleet_store.record_state(state_doc("lab", True, 100.0), 1.0)
    fleet_store.record_state(state_doc("lab2", False, 200.0, last_seq=40), 2.0)
    assert fleet_store.gaps_to_request(1e12, retry_after=0.0) == {}
    fleet_store.record_state(state_doc("lab", True, 300.0, last_seq=3), 3.0)
    assert fleet_store.gaps_to_request(1e12, retry_after=0.0) == {"emu-00": [1, 2, 3]}


def test_the_ingestor_counts_what_it_ignored(fleet_store):
    ingestor = Ingestor(fleet_store)
    messages = [
        Message(f"edgekit/v1/{d['fleet']}/emu-00/state", encode(d), 1.0)
        for d in (state_doc("lab", True, 100.0), state_doc("lab2", False, 200.0), state_doc("lab3", False, 300.0))
    ]
    assert ingestor.handle(messages) == {"states": 1, "stale_states": 2}
    assert row(fleet_store) == ("lab", True)


# -- the trial's steps, on a real broker ----------------------------------------------------------------------
def _publisher(broker) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def _publish(client: mqtt.Client, doc: dict) -> None:
    topic = f"edgekit/v1/{doc['fleet']}/{doc['device']}/state"
    client.publish(topic, json.dumps(doc), qos=1, retain=True).wait_for_publish(10)


def _collector(broker, db, name) -> FleetService:
    return FleetService(CollectorConfig(broker=broker.url, db=str(db), http=None, client_id=name)).start()


def _states_seen(service: FleetService) -> int:
    return service.ingestor.counters["states"] + service.ingestor.counters["stale_states"]


def test_a_restarted_collector_keeps_a_device_in_its_live_fleet(tmp_path, broker, fleet_name):
    """Devices emu-00/01 live in fleet -b; the same ids ran in -a and -c and stopped (their retained offline
    states stay). -b sorts between the two, so whichever order the broker replays in, the stale ones are
    not both before it: taken in order, one would win, and the device would show offline in the wrong fleet."""
    live, gone = f"{fleet_name}-b", (f"{fleet_name}-a", f"{fleet_name}-c")
    devices = ("emu-00", "emu-01")
    publisher = _publisher(broker)
    first = _collector(broker, tmp_path / "fleet.db", f"c1-{fleet_name}")
    try:
        wait(first.collector.connected.is_set, what="the collector's connection")
        now = time.time()
        for device in devices:
            _publish(publisher, state_doc(live, True, now - 100, device))
            for fleet in gone:  # another emulator run with the same ids: born, then stopped
                _publish(publisher, state_doc(fleet, True, now - 50, device))
                _publish(publisher, state_doc(fleet, False, now - 50, device))
            _publish(publisher, state_doc(live, True, now, device))  # the live one's periodic state
        wait(lambda: _states_seen(first) >= 12, what="the live states")
        assert {d["device"]: (d["fleet"], d["online"]) for d in first.store.status()} == {
            d: (live, True) for d in devices
        }
    finally:
        first.stop()
    second = _collector(broker, tmp_path / "fleet.db", f"c2-{fleet_name}")  # the restart: every state replayed
    try:
        wait(lambda: _states_seen(second) >= 6, what="the retained states")
        assert {d["device"]: (d["fleet"], d["online"]) for d in second.store.status()} == {
            d: (live, True) for d in devices
        }
        assert second.ingestor.counters["stale_states"] == 4
    finally:
        second.stop()
        publisher.loop_stop()
        publisher.disconnect()
