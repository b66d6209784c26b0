"""A collector that dies for good costs nothing (issue 17).

A broker keeps giving a share of a shared-subscription group's summaries, and of the resends they
cause, to a member that is down but whose session lives. The collector's session therefore expires
(``session_expiry_seconds``), gap requests repeat until the window arrives, devices keep acknowledged
summaries past their acknowledgement, and the retained ``state`` announces ``last_seq`` so windows
lost last are seen too. The network test SIGKILLs one of two collector processes of a group and
checks every device ends with every window stored once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from device_agent import protocol
from device_agent.config import MqttConfig, parse_config
from device_agent.errors import ConfigError, ProtocolError
from device_agent.protocol import Topics, check_state, state_payload, with_last_seq
from device_agent.reporter import MqttReporter
from device_agent.spool import Spool
from edgekit.errors import EdgekitError
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.store import GAP_GRACE_SECONDS, SqliteStore
from tests.fleet_helpers import baseline, summary, wait
from tests.mqtt_helpers import ROOT

FLEET = "f"


def state_message(device: str, last_seq: int | None, *, online: bool = True) -> Message:
    doc = state_payload(
        online=online,
        device=device,
        fleet=FLEET,
        model={"name": "m", "version": 1},
        runtime="onnxruntime",
        agent_version="0.1.0",
        last_seq=last_seq,
    )
    return Message(f"edgekit/v1/{FLEET}/{device}/state", protocol.encode(doc), time.time())


def summary_messages(base, device: str, seqs) -> list[Message]:
    return [Message(*summary(base, device, s, fleet=FLEET, rows=50), time.time()) for s in seqs]


# -- the state's last_seq ---------------------------------------------------------------------------------


def test_state_carries_last_seq_only_when_there_is_one_and_checks_it():
    plain = state_payload(online=True, device="d", fleet=FLEET, model=None, runtime=None, agent_version="0.1.0")
    assert "last_seq" not in plain and check_state(plain) == plain  # states without it still read
    assert with_last_seq(plain, 0) == plain and "last_seq" not in plain  # a copy; 0 means "no window yet"
    announced = with_last_seq(plain, 42)
    assert announced["last_seq"] == 42 and announced["schema"] == "edgekit.state/1"  # no version bump
    assert check_state(json.loads(protocol.encode(announced)))["last_seq"] == 42
    for bad in (-1, "42", 4.0, True, 2**60):
        with pytest.raises(ProtocolError, match="last_seq"):
            check_state({**plain, "last_seq": bad})


def test_a_collector_that_predates_last_seq_still_accepts_the_state():
    """``check_state`` as released before ``last_seq`` (a frozen copy): it names the fields it needs and
    lets others through, so new devices do not make old collectors refuse their state."""

    def check_state_before_last_seq(doc):
        protocol._require(doc, {"device": str, "fleet": str, "online": bool})
        if doc.get("model") is not None:
            protocol._require(doc["model"], {"name": str, "version": int}, "model.")
        protocol._optional(doc, {"runtime": str, "agent_version": str})
        return doc

    doc = protocol.decode(state_message("d", 7).payload, protocol.STATE_SCHEMA)
    assert check_state_before_last_seq(doc)["last_seq"] == 7


# -- the device side ------------------------------------------------------------------------------------


def test_the_spool_keeps_an_acknowledged_summary_from_its_acknowledgement(tmp_path):
    """A window spooled through a long outage is acknowledged late; it must still be there for the
    resend a collector asks for after its acknowledgement, however old the file is."""
    spool = Spool(tmp_path / "spool", keep_seconds=600)
    assert spool.last_seq() == 0
    spool.put(1, b"{}")
    spool.put(2, b"{}")
    hours_ago = time.time() - 7200
    for path in (tmp_path / "spool" / "pending").glob("*.json"):
        os.utime(path, (hours_ago, hours_ago))
    spool.ack(1)
    assert spool.prune() == 0 and spool.get(1) == b"{}"
    assert spool.last_seq() == 2 and spool.next_seq() == 3
    assert spool.prune(now=time.time() + 601) == 1 and spool.get(1) is None  # kept keep_seconds, not forever
    assert spool.last_seq() == 2  # the counter remembers what was pruned


class PahoLike:
    """What the reporter calls on paho's client, recorded (the seam test of the announcements)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict, bool]] = []
        self.mid = 0

    def publish(self, topic, payload, qos=0, retain=False):
        self.mid += 1
        self.published.append((topic, json.loads(payload), retain))
        return SimpleNamespace(mid=self.mid, rc=0, wait_for_publish=lambda timeout: None)

    def states(self) -> list[dict]:
        return [doc for topic, doc, _ in self.published if topic.endswith("/state")]

    def disconnect(self):
        pass

    def loop_stop(self):
        pass


def test_the_reporter_announces_last_seq_and_again_when_windows_closed(tmp_path):
    spool = Spool(tmp_path / "spool")
    birth = state_payload(online=True, device="d", fleet=FLEET, model=None, runtime=None, agent_version="0.1.0")
    offline = {**birth, "online": False}
    reporter = MqttReporter(
        MqttConfig(url="mqtt://127.0.0.1:1", state_seconds=0.05),
        Topics(FLEET, "d"),
        spool,
        client_id="c",
        birth=lambda: birth,
        offline=offline,
    )
    reporter._client = client = PahoLike()
    reporter.connected.set()
    reporter.announce()
    assert "last_seq" not in client.states()[-1]  # no window yet: the state is as before
    announcer = threading.Thread(target=reporter._announce_seq, daemon=True)
    announcer.start()
    for seq in (1, 2, 3):
        spool.put(seq, b"{}")
    wait(lambda: client.states()[-1].get("last_seq") == 3, timeout=10, what="a state announcing seq 3")
    count = len(client.states())
    time.sleep(0.3)  # several periods with no new window: nothing republished
    assert len(client.states()) == count
    reporter.stop()
    announcer.join(5)
    final = client.states()[-1]
    assert final["online"] is False and final["last_seq"] == 3 and client.published[-1][2] is True


def test_agent_settings_for_resends_and_announcements():
    base = {"device_id": "d", "state_dir": "s", "trust": {"public_key": "k"}}
    config = parse_config(base)
    assert config.mqtt.state_seconds == 300.0 and config.monitor.keep_acked_seconds == 3600.0
    assert config.monitor.keep_acked_seconds > CollectorConfig().session_expiry_seconds + 3 * 30
    tuned = parse_config({**base, "mqtt": {"state_seconds": 60}, "monitor": {"keep_acked_seconds": 7200}})
    assert tuned.mqtt.state_seconds == 60 and tuned.monitor.keep_acked_seconds == 7200
    with pytest.raises(ConfigError, match="state_seconds must be positive"):
        parse_config({**base, "mqtt": {"state_seconds": 0}})
    with pytest.raises(ConfigError, match="keep_acked_seconds must be 0 or more"):
        parse_config({**base, "monitor": {"keep_acked_seconds": -1}})


# -- the collector side -----------------------------------------------------------------------------------


def test_collector_settings_bound_the_session():
    assert CollectorConfig().session_expiry_seconds == 120
    assert CollectorConfig(session_expiry_seconds=0).session_expiry_seconds == 0
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(EdgekitError, match="session_expiry_seconds"):
            CollectorConfig(session_expiry_seconds=bad)
    with pytest.raises(EdgekitError, match="gap_retry_seconds"):
        CollectorConfig(gap_retry_seconds=0)


def test_a_missing_window_is_asked_for_again_every_retry_interval_until_it_arrives():
    """Nothing caps the requests: a resend that went into a dead member's session is asked for again."""
    store, base = SqliteStore(":memory:"), baseline()
    ingestor = Ingestor(store)
    ingestor.handle(summary_messages(base, "d", [1, 2, 4]))
    now = time.time() + GAP_GRACE_SECONDS + 1
    assert store.gaps_to_request(now, retry_after=5) == {"d": [3]}
    assert store.gaps_to_request(now + 4, retry_after=5) == {}  # asked for 4 s ago: not yet again
    for attempt in range(1, 20):
        assert store.gaps_to_request(now + 6 * attempt, retry_after=5) == {"d": [3]}, attempt
    ingestor.handle(summary_messages(base, "d", [3]))
    assert store.gaps_to_request(now + 500, retry_after=5) == {} and store.status()[0]["missing_seqs"] == 0


def test_windows_lost_last_are_seen_through_last_seq():
    """The collector that took seqs 6-8 died; nothing after them came: the retained state's last_seq
    shows them missing, they are asked for, and once resent nothing is missing.
    (Needs the store's contract: record_state registers gaps max_seq+1 .. last_seq.)"""
    store, base = SqliteStore(":memory:"), baseline()
    ingestor = Ingestor(store)
    ingestor.handle([state_message("d", None), *summary_messages(base, "d", range(1, 6))])
    assert store.status()[0]["missing_seqs"] == 0
    ingestor.handle([state_message("d", 5)])  # what the store has: nothing missing
    assert store.status()[0]["missing_seqs"] == 0
    ingestor.handle([state_message("d", 8)])
    assert store.status()[0]["missing_seqs"] == 3
    assert store.gaps_to_request(time.time() + GAP_GRACE_SECONDS + 1) == {"d": [6, 7, 8]}
    ingestor.handle(summary_messages(base, "d", [6, 7, 8]))
    status = store.status()[0]
    assert status["missing_seqs"] == 0 and status["windows"] == 8


def test_a_late_state_does_not_reopen_windows_already_stored():
    """The state with last_seq may arrive after its summaries (another topic, another collector)."""
    store, base = SqliteStore(":memory:"), baseline()
    ingestor = Ingestor(store)
    ingestor.handle(summary_messages(base, "d", range(1, 9)))
    ingestor.handle([state_message("d", 8), state_message("d", 3, online=False)])
    assert store.status()[0]["missing_seqs"] == 0 and store.gaps_to_request(time.time() + 100) == {}


# -- two collector processes, one SIGKILLed for good --------------------------------------------------------

# The collector as `edgekit fleet collect` runs it (FleetService), with settings the CLI has no flags for.
COLLECTOR = """
import json, logging, sys, threading
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.service import FleetService
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
FleetService(CollectorConfig(**json.loads(sys.argv[1]))).start()
threading.Event().wait()
"""


def start_collector(tmp_path, name: str, settings: dict) -> tuple[subprocess.Popen, object]:
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", COLLECTOR, json.dumps(settings)], cwd=ROOT, stdout=log, stderr=log
        )
    return process, log_path


class Device:
    """A device's reporting half, in process: its real spool and MQTT reporter, windows made by the
    device's own summary code."""

    def __init__(self, tmp_path, broker, fleet: str, name: str, base) -> None:
        self.name, self.fleet, self.base = name, fleet, base
        (tmp_path / name / "spool").mkdir(parents=True)
        (tmp_path / name / "spool" / "base").write_text("1")  # numbered from 1: its seqs count its windows
        self.spool = Spool(tmp_path / name / "spool")
        state = {"device": name, "fleet": fleet, "model": {"name": "m", "version": 1}}
        state.update(runtime="onnxruntime", agent_version="0.1.0")
        self.reporter = MqttReporter(
            MqttConfig(url=broker.url, state_seconds=1.0),
            Topics(fleet, name),
            self.spool,
            client_id=f"{fleet}-{name}",
            birth=lambda: state_payload(online=True, **state),
            offline=state_payload(online=False, **state),
        )
        self.reporter.start()
        self.reporting = True

    def close_window(self) -> None:
        seq = self.spool.next_seq()
        payload = summary(self.base, self.name, seq, fleet=self.fleet, rows=50)[1]
        self.spool.put(seq, payload)
        self.reporter.publish(seq, payload)


class ResendRequests:
    """Listens on the devices' command topics and counts the seqs the collectors ask for again."""

    def __init__(self, broker, fleet: str) -> None:
        import paho.mqtt.client as mqtt

        self._seqs: list[tuple[str, int]] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self._seqs.extend(
            (m.topic.split("/")[-2], s) for s in json.loads(m.payload)["seqs"]
        )
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe(f"edgekit/v1/{fleet}/+/cmd", qos=1)
        self.client.loop_start()

    def counts(self) -> Counter:
        """How often each (device, seq) was asked for."""
        return Counter(self._seqs)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stored_seqs(store: SqliteStore, device: str) -> list[int]:
    with store.reading() as db:
        return [r[0] for r in db.execute("SELECT seq FROM summaries WHERE device = ? ORDER BY seq", (device,))]


EXPIRY = 15  # the test collectors' session expiry, in seconds


@pytest.mark.network
def test_a_collector_killed_for_good_strands_none_of_its_share(tmp_path, broker, fleet_name):
    db = tmp_path / "fleet.db"
    store = SqliteStore(db)  # migrated once, before two processes open it
    # The session outlives the gaps' grace (10 s) and a request period (2 s), so the first resends are
    # shared with the dead member too and must be asked for again.
    settings = {"broker": broker.url, "db": str(db), "http": None, "group": f"g-{fleet_name}"}
    settings.update(session_expiry_seconds=EXPIRY, gap_retry_seconds=2.0)
    collectors = [start_collector(tmp_path, c, {**settings, "client_id": f"{fleet_name}-{c}"}) for c in ("c1", "c2")]
    devices: list[Device] = []
    stop = threading.Event()

    def report():
        while not stop.wait(0.05):
            for device in devices:
                if device.reporting:
                    device.close_window()

    publisher = threading.Thread(target=report, daemon=True)
    requests = ResendRequests(broker, fleet_name)
    try:
        for _, log_path in collectors:
            wait(lambda p=log_path: "collector connected" in p.read_text(), timeout=30, what=f"{log_path.name}")
        base = baseline()
        devices.extend(Device(tmp_path, broker, fleet_name, f"d{i}", base) for i in range(4))
        wait(lambda: all(d.reporter.connected.is_set() for d in devices), what="devices connected")
        publisher.start()
        wait(lambda: sum(d["windows"] for d in store.status()) >= 100, timeout=20, what="windows from both")
        killed = collectors[1][0]
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        killed_at = time.time()
        time.sleep(1.0)
        devices[3].reporting = False  # its last windows, partly in the dead session, have no successor
        time.sleep(killed_at + EXPIRY + 2 - time.time())  # past the session expiry: everything reaches c1
        expired = {d.name: d.spool.last_seq() for d in devices}
        time.sleep(3.0)
        stop.set()
        publisher.join(5)
        last = {d.name: d.spool.last_seq() for d in devices}
        assert min(last.values()) >= 20, last

        def complete():
            rows = {d["device"]: d for d in store.status()}
            return all(rows[n]["missing_seqs"] == 0 and rows[n]["windows"] == last[n] for n in last)

        wait(complete, timeout=40, what=f"every window of every device stored: {last}")
        elapsed = time.time() - killed_at
    finally:
        stop.set()
        requests.close()
        for device in devices:
            device.reporter.stop()
        for process, _ in collectors:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
    for name, n in last.items():
        assert stored_seqs(store, name) == list(range(1, n + 1)), name  # every seq once (the key is (device, seq))
    # The dead member's share was real: windows went missing and were asked for, and resends routed into
    # its session before it expired were asked for again.
    asked = requests.counts()
    assert asked and max(asked.values()) >= 2, asked
    # Once the session expired the dead member got nothing more: no later window had to be asked for.
    assert not [(name, seq) for name, seq in asked if seq > expired[name]], expired
    print(
        f"every window of {len(last)} devices stored {elapsed:.1f} s after the kill: {last}; "
        f"{len(asked)} windows asked for again, {sum(asked.values())} requests"
    )
