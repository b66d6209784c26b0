"""The agent against a real Mosquitto: summaries, drift, and no lost window through crashes."""

import time

import numpy as np
import pytest

from device_agent import Agent
from tests.agent_helpers import config_of, make_device
from tests.mqtt_helpers import AgentProcess, Collector, OutputListener

pytestmark = pytest.mark.network


def emulated_device(
    tmp_path, bundle, keypair, digits, broker, fleet, *, rate=2000, window_rows=100, drift=None, device_id="dev1"
):
    config = make_device(
        tmp_path / device_id,
        bundle,
        keypair[1],
        device_id=device_id,
        fleet=fleet,
        broker=broker.url,
        window_rows=window_rows,
        http=False,
    )
    lines = ["[emulate]", f'data = "{digits.test}"', f"rows_per_second = {rate}"]
    if drift:
        lines += [f'drift_feature = "{drift[0]}"', f"drift_shift = {drift[1]}", "drift_after = 0"]
    with open(config, "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return config


def first_seq(collector, device):
    """Where the device's numbering began: its summaries' ``seq_base`` (a fresh spool numbers from the clock)."""
    return min(s.get("seq_base", 1) for s in collector.of(device))


def no_gaps(collector, device, upto):
    return set(range(first_seq(collector, device), upto + 1)) <= collector.seqs(device)


def fill_gaps(collector, device, upto):
    """What a collector does after an outage: ask the device to resend the seqs it never heard."""
    missing = sorted(set(range(first_seq(collector, device), upto + 1)) - collector.seqs(device))
    if missing:
        collector.resend(device, missing)
    collector.wait(lambda: no_gaps(collector, device, upto), what=f"seqs 1..{upto} (missing {missing[:10]})")


def test_summaries_arrive_with_the_right_row_counts_and_state_is_retained(
    tmp_path, bundle, keypair, digits, broker, fleet_name
):
    collector = Collector(broker.url, fleet_name)
    config = make_device(
        tmp_path / "dev", bundle, keypair[1], fleet=fleet_name, broker=broker.url, window_rows=100, http=False
    )
    X = np.load(digits.test)["X"]
    with Agent(config_of(config)).start() as agent:
        collector.wait(lambda: collector.states.get("dev1", {}).get("online") is True, what="birth message")
        agent.predict(X[:250])
        agent.predict(X[250:500])
        collector.wait(lambda: len(collector.of("dev1")) == 5, what="5 summaries")
        assert (
            agent.spool.depth() == 0 or collector.wait(lambda: agent.spool.depth() == 0, what="spool drained") is None
        )
    summaries = sorted(collector.of("dev1"), key=lambda s: s["seq"])
    first = summaries[0]["seq_base"]
    assert [s["seq"] for s in summaries] == list(range(first, first + 5)) and all(s["rows"] == 100 for s in summaries)
    assert summaries[0]["model"] == {"name": "digits", "version": 3} and summaries[0]["fleet"] == fleet_name
    assert set(summaries[0]["drift"]["features"]) == set(agent.schema.feature_names)
    assert collector.baselines["dev1"]["baseline_id"] == summaries[0]["profile"]["baseline_id"]
    collector.wait(lambda: collector.states["dev1"]["online"] is False, what="offline state on stop")
    collector.close()


def test_a_shifted_feature_is_flagged_and_the_others_are_not(tmp_path, bundle, keypair, digits, broker, fleet_name):
    collector = Collector(broker.url, fleet_name)
    agent = AgentProcess(
        emulated_device(
            tmp_path, bundle, keypair, digits, broker, fleet_name, rate=3000, window_rows=500, drift=("pixel_2_4", 8.0)
        )
    ).start()
    try:
        collector.wait(lambda: len(collector.of("dev1")) >= 4, timeout=30, what="4 summaries")
    finally:
        agent.stop()
    summaries = collector.of("dev1")[:4]
    assert all(s["drift"]["features"]["pixel_2_4"]["drifted"] for s in summaries)
    assert all(s["drift"]["worst_feature"] == "pixel_2_4" for s in summaries)
    false_flags = sum(
        bool(v.get("drifted")) for s in summaries for name, v in s["drift"]["features"].items() if name != "pixel_2_4"
    )
    assert false_flags <= 1
    collector.close()


def test_broker_killed_and_restarted_mid_stream_loses_no_window(tmp_path, bundle, keypair, digits, broker, fleet_name):
    collector = Collector(broker.url, fleet_name)
    agent = AgentProcess(
        emulated_device(tmp_path, bundle, keypair, digits, broker, fleet_name, rate=2000, window_rows=100)
    ).start()
    try:
        collector.wait(lambda: len(collector.of("dev1")) >= 10, timeout=30, what="10 summaries before the outage")
        broker.kill()
        time.sleep(2.0)  # the agent keeps scoring; windows close into the spool
        broker.start()
        collector.wait(
            lambda: max(collector.seqs("dev1")) >= first_seq(collector, "dev1") + 59,
            timeout=40,
            what="summaries after the outage",
        )
    finally:
        agent.stop()
    upto = max(collector.seqs("dev1"))
    agent = AgentProcess(agent.config).start()  # a running device answers resend requests
    try:
        collector.wait(lambda: collector.states.get("dev1", {}).get("online") is True, what="agent back online")
        fill_gaps(collector, "dev1", upto)
    finally:
        agent.stop()
    rows = {s["seq"]: s["rows"] for s in collector.of("dev1")}
    assert all(rows[seq] == 100 for seq in range(first_seq(collector, "dev1"), upto))
    collector.close()


def test_agent_killed_and_restarted_loses_no_closed_window(tmp_path, bundle, keypair, digits, broker, fleet_name):
    collector = Collector(broker.url, fleet_name)
    config = emulated_device(tmp_path, bundle, keypair, digits, broker, fleet_name, rate=2000, window_rows=100)
    agent = AgentProcess(config).start()
    collector.wait(lambda: len(collector.of("dev1")) >= 8, timeout=30, what="summaries before the crash")
    agent.kill()
    spooled = sorted(int(p.stem) for p in (tmp_path / "dev1" / "state" / "spool" / "pending").glob("*.json"))
    closed_before = max([*collector.seqs("dev1"), *spooled])
    agent = AgentProcess(config).start()
    try:
        collector.wait(
            lambda: max(collector.seqs("dev1")) >= closed_before + 5, timeout=30, what="summaries after the restart"
        )
        fill_gaps(collector, "dev1", max(collector.seqs("dev1")))
    finally:
        agent.stop()
    seqs = collector.seqs("dev1")
    first = first_seq(collector, "dev1")
    assert set(range(first, closed_before + 1)) <= seqs  # every window closed before the crash arrived
    assert len([s for s in collector.of("dev1") if s["seq"] > closed_before]) >= 5  # numbering went on, never reused
    collector.close()


def test_malformed_commands_are_ignored_and_the_agent_keeps_reporting(
    tmp_path, bundle, keypair, digits, broker, fleet_name
):
    collector = Collector(broker.url, fleet_name)
    config = make_device(
        tmp_path / "dev", bundle, keypair[1], fleet=fleet_name, broker=broker.url, window_rows=50, http=False
    )
    X = np.load(digits.test)["X"]
    with Agent(config_of(config)).start() as agent:
        collector.wait(lambda: agent.reporter.connected.is_set(), what="connection")
        topic = f"edgekit/v1/{fleet_name}/dev1/cmd"
        # Connected is not yet subscribed: a probe is sent until one is rejected, then the junk follows.
        deadline = time.time() + 20
        while agent.reporter.rejected_commands == 0:
            assert time.time() < deadline, "the agent never subscribed to its command topic"
            collector.client.publish(topic, b"[]", qos=1)
            time.sleep(0.5)
        time.sleep(0.5)  # a probe still in flight arrives before the junk (one publisher, one topic: in order)
        probes = agent.reporter.rejected_commands
        for payload in (
            b"\xff\xfe",
            b"[]",
            b'{"schema": "edgekit.cmd/1", "cmd": "rm -rf"}',
            b'{"schema": "edgekit.cmd/1", "cmd": "resend", "seqs": "all"}',
            b"{" * 10000,
        ):
            collector.client.publish(topic, payload, qos=1)
        collector.wait(lambda: agent.reporter.rejected_commands >= probes + 5, what="5 rejected commands")
        agent.predict(X[:100])
        collector.wait(lambda: len(collector.of("dev1")) == 2, what="summaries after the junk")
    collector.close()


def test_streaming_rows_over_mqtt_are_scored_and_answered(tmp_path, bundle, keypair, digits, broker, fleet_name):
    import json

    config = make_device(
        tmp_path / "dev", bundle, keypair[1], fleet=fleet_name, broker=broker.url, window_rows=100, http=False
    )
    with open(config, "a") as handle:
        handle.write("streaming = true\n")  # appended to the [mqtt] table, the last in the file
    listener = OutputListener(broker.port, fleet_name)
    X = np.load(digits.test)["X"]
    try:
        with Agent(config_of(config)).start() as agent:
            Collector(broker.url, fleet_name).wait(lambda: agent.reporter.connected.is_set(), what="connection")
            time.sleep(0.2)
            listener.publish(json.dumps({"request_id": "r1", "instances": X[:3].tolist()}))
            assert listener.got.wait(10)
            listener.publish(b"not json")
            deadline = time.time() + 10
            while len(listener.answers) < 2 and time.time() < deadline:
                time.sleep(0.05)
    finally:
        listener.close()
    answers = listener.answers
    assert (
        answers[0]["request_id"] == "r1"
        and len(answers[0]["predictions"]) == 3
        and answers[0]["schema"] == "edgekit.output/1"
    )
    assert "error" in answers[1]


def test_a_broker_that_speaks_only_mqtt_3_gets_mqtt_3(tmp_path, bundle, keypair, digits, fleet_name):
    """amqtt (the demo's embedded broker) speaks MQTT 3.1.1 only: the agent falls back and still reports."""
    import json
    import subprocess
    import sys

    import paho.mqtt.client as mqtt

    pytest.importorskip("amqtt")
    from edgekit.local.broker import free_port, wait_for_port

    port = free_port()
    broker = subprocess.Popen(
        [sys.executable, "-m", "edgekit.local.embedded_broker", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_port(port, process=broker)
        summaries = []
        listener = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        listener.on_message = lambda c, u, m: summaries.append(json.loads(m.payload))
        listener.connect("127.0.0.1", port)
        listener.subscribe(f"edgekit/v1/{fleet_name}/+/summary", qos=1)
        listener.loop_start()
        config = make_device(
            tmp_path / "dev",
            bundle,
            keypair[1],
            fleet=fleet_name,
            broker=f"mqtt://127.0.0.1:{port}",
            window_rows=100,
            http=False,
        )
        with Agent(config_of(config)).start() as agent:
            deadline = time.time() + 15
            while not agent.reporter.connected.is_set() and time.time() < deadline:
                time.sleep(0.05)
            assert agent.reporter.protocol == "3.1.1" and agent.reporter.connected.is_set()
            agent.predict(np.load(digits.test)["X"][:200])
            deadline = time.time() + 15
            while len(summaries) < 2 and time.time() < deadline:
                time.sleep(0.05)
        listener.loop_stop()
        listener.disconnect()
        first = summaries[0]["seq_base"]
        assert sorted(s["seq"] for s in summaries) == [first, first + 1]
    finally:
        broker.terminate()
        broker.wait(10)


def test_a_puback_arriving_while_a_summary_is_being_sent_does_not_deadlock(tmp_path):
    """paho calls on_publish holding its outgoing-message lock, and publish() takes that lock. The
    reporter used to take its own lock in on_publish, around publish() elsewhere: a PUBACK landing
    while a summary was being sent froze the device's MQTT for good (seen in CI as a device that
    stopped sending windows and stopped hearing its desired state)."""
    import threading
    from types import SimpleNamespace

    from device_agent.config import MqttConfig
    from device_agent.protocol import Topics
    from device_agent.reporter import MqttReporter
    from device_agent.spool import Spool

    class PahoLike:
        def __init__(self):
            self.out_mutex, self.mid = threading.Lock(), 0

        def publish(self, topic, payload, qos=0, retain=False):
            with self.out_mutex:
                self.mid += 1
                return SimpleNamespace(mid=self.mid, rc=0)

    spool = Spool(tmp_path / "spool")
    reporter = MqttReporter(
        MqttConfig(url="mqtt://127.0.0.1:1"), Topics("f", "d"), spool, client_id="c", birth=dict, offline={}
    )
    reporter._client = client = PahoLike()
    reporter.connected.set()
    for seq in (1, 2):
        spool.put(seq, b"{}")
    reporter.publish(1, b"{}")  # mid 1, in flight

    client.out_mutex.acquire()  # the network thread is handling mid 1's PUBACK ...
    sender = threading.Thread(target=reporter.publish, args=(2, b"{}"), daemon=True)
    sender.start()  # ... while the monitor sends seq 2: it holds the reporter's lock, waiting for paho's
    deadline = time.time() + 5
    while not reporter._lock.locked() and time.time() < deadline:
        time.sleep(0.01)
    ack = threading.Thread(
        target=reporter._on_publish, args=(client, None, 1, SimpleNamespace(is_failure=False), None), daemon=True
    )
    ack.start()
    ack.join(2)
    assert not ack.is_alive(), "on_publish waited for the reporter's lock: deadlock"
    client.out_mutex.release()
    sender.join(2)
    assert not sender.is_alive()
    assert spool.pending() == [2]  # seq 1 acknowledged once the sender let go; seq 2 still in flight
    reporter._on_publish(client, None, 2, SimpleNamespace(is_failure=False), None)
    assert spool.pending() == []
