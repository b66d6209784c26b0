"""A device whose state dir was reset (a reflashed Pi, a new SD card, a wiped /var) must not lose its windows.

Its new spool numbers from where a reinstall cannot repeat (the clock in ms when its first window closes) and says
so in every summary (``seq_base``): the collector stores the new windows, shows their verdict, and takes the jump
for a new install (no gaps asked for, no history holes), while a device that does reuse seqs (an older agent,
wiped) is counted and logged (``seq-reused``), never taken for redeliveries in silence.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest

from device_agent.errors import ProtocolError
from device_agent.protocol import READABLE_SUMMARY_SCHEMAS, check_state, check_summary, decode
from device_agent.spool import Spool
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.retention import RetentionPolicy, run_pass
from edgekit.fleet.service import FleetService
from edgekit.fleet.store import SqliteStore
from tests.fleet_helpers import baseline, baseline_message, summary, wait
from tests.mqtt_helpers import AgentProcess
from tests.test_agent_mqtt import emulated_device

BASE = baseline()
NOW = 1.8e9
REINSTALLED_AT_MS = 1_790_000_000_000  # the clock (ms) when the new install's first window closed


def window(device: str, seq: int, *, minute: int, seq_base: int | None = None, shift: float = 0.0) -> Message:
    """A real summary of ``device`` numbered ``seq`` that ends ``minute`` minutes after 1.7e9 (its window does
    not follow from its seq: a new install's seqs are ms of the clock), from an agent that says ``seq_base``."""
    topic, payload = summary(BASE, device, seq, start=1.7e9 + (minute - seq) * 60, shift=shift, seed=minute)
    doc = json.loads(payload)
    if seq_base is not None:
        doc["seq_base"] = seq_base
    return Message(topic, json.dumps(doc).encode(), NOW)


def old_install(device: str = "pi", upto: int = 19, *, missing: tuple[int, ...] = ()) -> list[Message]:
    """Windows 1..upto from an agent numbering from 1 (no ``seq_base``), some of them lost."""
    return [window(device, s, minute=s) for s in range(1, upto + 1) if s not in missing]


def new_install(device: str = "pi", count: int = 5, *, after: int = 19, shift: float = 8.0, skip=()) -> list[Message]:
    base = REINSTALLED_AT_MS
    return [
        window(device, base + k, minute=after + 10 + k, seq_base=base, shift=shift)
        for k in range(count)
        if k not in skip
    ]


def gaps_of(store, device: str) -> list[int]:
    with store.reading() as db:
        return [r[0] for r in db.execute("SELECT seq FROM gaps WHERE device = ? ORDER BY seq", (device,))]


def status_of(store, device: str) -> dict:
    return next(d for d in store.status() if d["device"] == device)


# -- the device side ---------------------------------------------------------------------------------------------


def test_a_fresh_spool_numbers_from_the_clock_and_a_reinstall_numbers_past_it(tmp_path):
    """Before the fix a fresh spool numbered from 1, whatever had been numbered before it."""
    clock = [1_700_000_000.0]
    spool = Spool(tmp_path / "spool", clock=lambda: clock[0])
    assert spool.seq_base() is None and spool.last_seq() == 0  # nothing chosen before the first window closes
    clock[0] += 90.5
    first = spool.next_seq()
    assert first == 1_700_000_090_500 == spool.seq_base()
    for seq in range(first, first + 3):
        assert spool.next_seq() == seq
        spool.put(seq, b"{}")
    clock[0] += 3600
    again = Spool(tmp_path / "spool", clock=lambda: clock[0])  # a restart keeps the install's numbering
    assert again.next_seq() == first + 3 and again.seq_base() == first and again.last_seq() == first + 2
    shutil.rmtree(tmp_path / "spool")  # the state dir wiped: a new install
    wiped = Spool(tmp_path / "spool", clock=lambda: clock[0])
    assert wiped.next_seq() == wiped.seq_base() > first + 3


def test_a_fresh_spool_keeps_its_base_through_a_crash_before_its_first_window_is_written(tmp_path):
    clock = [1_700_000_000.0]
    base = Spool(tmp_path / "spool", clock=lambda: clock[0]).next_seq()  # then a crash, before put
    clock[0] += 10
    assert Spool(tmp_path / "spool", clock=lambda: clock[0]).next_seq() == base


def test_a_spool_that_numbered_from_1_keeps_its_numbering_and_announces_no_base(tmp_path):
    """An agent upgraded in place: its collector has its windows under 1, 2, 3..., and must go on receiving them."""
    (tmp_path / "spool" / "acked").mkdir(parents=True)
    (tmp_path / "spool" / "seq").write_text("41")
    (tmp_path / "spool" / "acked" / f"{40:012d}.json").write_bytes(b"{}")
    spool = Spool(tmp_path / "spool")
    assert spool.next_seq() == 42 and spool.seq_base() is None
    spool.put(42, b"{}")
    assert Spool(tmp_path / "spool").next_seq() == 43 and not (tmp_path / "spool" / "base").exists()


def test_summaries_carry_seq_base_and_summaries_without_it_still_pass():
    """``seq_base`` is optional within edgekit.summary/2: an old agent's summary is read unchanged, a new one's
    base is checked (from 1 to the summary's seq)."""
    old = window("pi", 7, minute=7).payload
    assert "seq_base" not in json.loads(old)
    assert check_summary(decode(old, READABLE_SUMMARY_SCHEMAS))["seq"] == 7
    new = decode(new_install(count=2)[1].payload, READABLE_SUMMARY_SCHEMAS)
    assert check_summary(new)["seq_base"] == REINSTALLED_AT_MS == new["seq"] - 1
    for bad in (new["seq"] + 1, 0, True, "1"):
        with pytest.raises(ProtocolError, match="seq_base"):
            check_summary({**new, "seq_base": bad})


# -- the collector: SQLite and PostgreSQL (fleet_store) -------------------------------------------------------------


def test_a_reinstalled_device_windows_are_stored_and_shown_with_no_gap_for_the_jump(fleet_store):
    """Before the fix (agents numbering from 1 again) the new windows collided with seqs 1-19 and were dropped
    as redeliveries, the old verdict stayed; here the new install's windows number past them, and the jump to
    its base is neither a gap asked for nor left behind: the old install's lost window (seq 7) can never be
    resent (its spool is gone), so its gap goes too."""
    ingestor = Ingestor(fleet_store, clock=lambda: NOW)
    ingestor.handle(old_install(missing=(7,)))
    assert gaps_of(fleet_store, "pi") == [7] and status_of(fleet_store, "pi")["drifted"] is False
    outcome = ingestor.handle(new_install(count=5))
    assert outcome["stored"] == 5 and not outcome["duplicates"]
    status = status_of(fleet_store, "pi")
    assert status["windows"] == 18 + 5 and status["drifted"] is True and status["worst_feature"] == "f0"
    assert status["missing_seqs"] == 0 and status["redeliveries"] == 0 and status["rejected"] == 0
    assert gaps_of(fleet_store, "pi") == [] and fleet_store.gaps_to_request(NOW + 3600) == {}
    with fleet_store.reading() as db:
        assert db.execute("SELECT seq_base FROM devices WHERE device = 'pi'").fetchone()[0] == REINSTALLED_AT_MS


def test_a_window_lost_within_the_new_install_is_still_a_gap(fleet_store):
    ingestor = Ingestor(fleet_store, clock=lambda: NOW)
    ingestor.handle(old_install())
    ingestor.handle(new_install(count=4, skip=(2,)))
    assert gaps_of(fleet_store, "pi") == [REINSTALLED_AT_MS + 2]
    ingestor.handle(new_install(count=3, skip=(0, 1)))  # resent: filled
    assert gaps_of(fleet_store, "pi") == []


def test_a_new_install_whose_first_windows_are_lost_asks_for_them_only(fleet_store):
    ingestor = Ingestor(fleet_store, clock=lambda: NOW)
    ingestor.handle(old_install())
    ingestor.handle(new_install(count=4, skip=(0, 1)))
    assert gaps_of(fleet_store, "pi") == [REINSTALLED_AT_MS, REINSTALLED_AT_MS + 1]


def test_a_new_install_that_lost_its_first_windows_and_went_quiet_announces_them_in_its_state(fleet_store):
    """No summary of the new install has arrived, so only its retained state says windows were made: its
    ``last_seq`` is far past the old install's end, and its ``seq_base`` is where the losses are counted from
    (without it, nothing was recorded until a summary of the new install was stored)."""
    from device_agent.protocol import state_payload, with_last_seq

    ingestor = Ingestor(fleet_store, clock=lambda: NOW)
    ingestor.handle(old_install())
    state = with_last_seq(
        state_payload(online=True, device="pi", fleet="f", model=None, runtime=None, agent_version="t"),
        REINSTALLED_AT_MS + 2,
        REINSTALLED_AT_MS,
    )
    ingestor.handle([Message("edgekit/v1/f/pi/state", json.dumps(state).encode(), NOW)])
    assert gaps_of(fleet_store, "pi") == [REINSTALLED_AT_MS + k for k in range(3)]
    with pytest.raises(ProtocolError, match="seq_base must be a seq from 1 to last_seq"):
        check_state({**state, "seq_base": REINSTALLED_AT_MS + 3})


def test_a_device_that_reuses_its_seqs_is_counted_and_logged_not_taken_for_redeliveries(fleet_store, caplog):
    """An agent without seq bases whose state dir was wiped numbers from 1 again: those windows cannot be stored
    under (device, seq), but they differ from the stored ones, so they are rejects (``seq-reused``, shown by
    ``fleet status`` and /metrics) with a log line. Before the fix they counted as redeliveries, silently."""
    caplog.set_level(logging.WARNING, logger="edgekit.fleet")
    ingestor = Ingestor(fleet_store, clock=lambda: NOW)
    ingestor.handle(old_install())
    redelivered = ingestor.handle(old_install(upto=2))  # the same windows again: QoS 1 redeliveries
    assert redelivered["duplicates"] == 2 and not redelivered["rejected_seq-reused"]
    wiped = [window("pi", s, minute=100 + s, shift=8.0) for s in (1, 2, 3)]
    outcome = ingestor.handle(wiped)
    assert outcome["rejected_seq-reused"] == 3 and not outcome["duplicates"] and not outcome["stored"]
    assert fleet_store.rejects()["seq-reused"] == 3
    status = status_of(fleet_store, "pi")
    assert status["rejected"] == 3 and status["redeliveries"] == 2 and status["windows"] == 19
    said = [r.getMessage() for r in caplog.records if "seq-reused" in r.getMessage()]
    assert len(said) == 1 and "pi" in said[0] and "seq_base" in said[0]  # once a minute per device, not a window
    twice = ingestor.handle([window("pi", 20, minute=120), window("pi", 20, minute=121)])  # one batch, two windows
    assert twice["stored"] == 1 and twice["rejected_seq-reused"] == 1


def test_retention_leaves_no_hole_for_the_jump_to_a_new_install(fleet_store):
    """A rollup that passes from the old install's windows to the new one's would have noted every seq between
    them (a trillion) as one hole that no window fills; late windows of either install still get theirs."""
    day, per_day = 86400.0, 48
    t0 = 1.7e9 - 1.7e9 % day
    policy = RetentionPolicy.parse("2d", "10d", "forever")
    ingestor = Ingestor(fleet_store, clock=lambda: NOW)
    ingestor.handle([Message(*baseline_message(BASE, "pi"), t0)])

    def at(k: int, seq: int, seq_base: int | None = None) -> Message:
        """The k-th window of the run (one every half hour from t0), numbered ``seq``."""
        doc = json.loads(summary(BASE, "pi", seq, start=t0 + (k - 1) * 1800 - seq * 60, seed=k)[1])
        if seq_base is not None:
            doc["seq_base"] = seq_base
        return Message("edgekit/v1/f/pi/summary", json.dumps(doc).encode(), NOW)

    base = REINSTALLED_AT_MS
    ingestor.handle([at(k, k) for k in range(1, 2 * per_day + 1) if k != 90])  # two days, one window lost
    ingestor.handle([at(2 * per_day + k, base + k - 1, base) for k in range(1, 2 * per_day + 1) if k != 3])
    run_pass(fleet_store, policy, t0 + 3 * day)  # the old install's first day
    run_pass(fleet_store, policy, t0 + 5 * day)  # past the boundary: the new install's first day too
    with fleet_store.reading() as db:
        holes = [tuple(r) for r in db.execute("SELECT first_seq, last_seq FROM history_holes ORDER BY first_seq")]
    assert holes == [(90, 90), (base + 2, base + 2)]


# -- end to end: real agents, real Mosquitto, a real collector on SQLite ----------------------------------------------


class ResendListener:
    """The seqs the collector asks the device for again (its ``cmd`` topic)."""

    def __init__(self, broker, fleet: str, device: str) -> None:
        import paho.mqtt.client as mqtt

        self.asked: list[int] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.asked.extend(json.loads(m.payload).get("seqs", []))
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe(f"edgekit/v1/{fleet}/{device}/cmd", qos=1)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.network
def test_a_device_whose_state_dir_is_wiped_goes_on_being_stored_and_shown(
    tmp_path, bundle, keypair, digits, broker, fleet_name
):
    """The new-user trial: a device had sent windows numbered from 1 (its spool's ``base`` file says 1, as an agent
    before seq bases numbered), its state dir is wiped and the agent runs again, now drifting. Before the fix its
    new windows were numbered 1, 2, ... again and dropped as redeliveries: the wait for them timed out and the old
    verdict stayed. Now they are stored, the drift is shown, nothing is rejected, and no gap is asked for."""
    db = tmp_path / "fleet.db"
    collector = FleetService(
        CollectorConfig(broker=broker.url, db=str(db), http=None, client_id=f"c-{fleet_name}", gap_retry_seconds=1.0)
    )
    collector.start()
    resends = ResendListener(broker, fleet_name, "dev1")
    store = SqliteStore(db)
    try:
        config = emulated_device(tmp_path, bundle, keypair, digits, broker, fleet_name, rate=2000, window_rows=300)
        (tmp_path / "dev1" / "state" / "spool").mkdir(parents=True, exist_ok=True)
        (tmp_path / "dev1" / "state" / "spool" / "base").write_text("1")  # numbered from 1, as agents did
        agent = AgentProcess(config).start()
        try:
            wait(lambda: any(d["windows"] >= 5 for d in store.status()), what="5 windows of the first install")
        finally:
            agent.stop()
        wait(lambda: store.status()[0]["online"] is False, what="the first install's offline state")
        first = store.status()[0]
        assert first["drifted"] is False

        shutil.rmtree(tmp_path / "dev1")  # reflashed: a new state dir, the same device id
        config = emulated_device(
            tmp_path, bundle, keypair, digits, broker, fleet_name, rate=2000, window_rows=300, drift=("pixel_2_4", 8.0)
        )
        agent = AgentProcess(config).start()
        try:
            wait(
                lambda: store.status()[0]["windows"] >= first["windows"] + 5 and store.status()[0]["drifted"],
                what="the new install's windows stored and its drift shown",
            )
        finally:
            agent.stop()
        time.sleep(3.0)  # a few gap-request rounds (every second) after the last window
        status = store.status()[0]
        assert status["drifted"] is True and status["worst_feature"] == "pixel_2_4"
        assert status["missing_seqs"] == 0 and status["rejected"] == 0 and status["redeliveries"] == 0
        seqs = [r[0] for r in store.db.execute("SELECT seq FROM summaries ORDER BY seq")]
        old, new = [s for s in seqs if s <= first["windows"]], [s for s in seqs if s > first["windows"]]
        assert old == list(range(1, first["windows"] + 1)) and new == list(range(new[0], new[0] + len(new)))
        bases = {json.loads(r[0]).get("seq_base") for r in store.db.execute("SELECT payload FROM summaries")}
        assert bases == {1, new[0]} and new[0] > time.time() * 1000 - 600_000  # numbered from the clock (ms)
        assert store.gaps_to_request(time.time() + 3600) == {}
        assert not [s for s in resends.asked if first["windows"] < s < new[0]]  # the jump was never asked for
    finally:
        resends.close()
        store.close()
        collector.stop()
