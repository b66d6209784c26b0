"""``fleet collect --workers N``: ingest processes sharing the summaries, against a real Mosquitto."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgekit.fleet.alerts import AlertRules, AlertSinks
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.service import FleetService
from edgekit.fleet.store import SqliteStore
from edgekit.fleet.workers import worker_config
from tests import fleet_helpers as fh
from tests.test_fleet_collector import wait

pytestmark = pytest.mark.network

DEVICES, WINDOWS = 12, 30


def publisher(url: str) -> mqtt.Client:
    port = int(url.rsplit(":", 1)[1])
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish_windows(client: mqtt.Client, fleet: str, base, seqs: range, *, drifting: set[str] = frozenset()) -> None:
    infos = []
    for seq in seqs:
        for i in range(DEVICES):
            device = f"dev{i:02d}"
            topic, payload = fh.summary(
                base, device, seq, fleet=fleet, rows=300, shift=3.0 if device in drifting else 0.0
            )
            infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(30)


def test_worker_config_is_an_ingest_only_member_of_the_same_group():
    config = CollectorConfig(broker="mqtt://b:1883", db="f.db", group="g", client_id="c", workers=3, password="secret")
    worker = worker_config(config, 2)
    assert (worker.role, worker.http, worker.client_id, worker.group, worker.db, worker.password) == (
        "ingest",
        None,
        "c-w2",
        "g",
        "f.db",
        "secret",
    )


def test_workers_split_the_summaries_alert_on_what_they_stored_and_a_killed_one_loses_nothing(
    tmp_path, broker, fleet_name
):
    base = fh.baseline()
    collector = FleetService(
        CollectorConfig(
            broker=broker.url, db=str(tmp_path / "fleet.db"), http=None, client_id=f"c-{fleet_name}", workers=2
        ),
        alert_rules=AlertRules(drift_windows=2),
        alert_sinks=AlertSinks(log=False),
    )
    collector.start()
    store = SqliteStore(tmp_path / "fleet.db")
    client = publisher(broker.url)
    try:
        wait(
            lambda: collector.collector.connected.is_set() and len(collector.workers.pids()) == 1,
            what="the collector and its worker",
        )
        time.sleep(1.0)  # the worker's shared subscription is in place
        client.publish(*fh.baseline_message(base, "dev00", fleet=fleet_name), qos=1).wait_for_publish(10)
        publish_windows(client, fleet_name, base, range(1, WINDOWS // 2 + 1), drifting={"dev03"})
        worker = collector.workers.pids()[0]
        os.kill(worker, signal.SIGKILL)  # mid-stream: what it had not acknowledged is redelivered to its next run
        publish_windows(client, fleet_name, base, range(WINDOWS // 2 + 1, WINDOWS + 1), drifting={"dev03"})
        total = DEVICES * WINDOWS
        wait(
            lambda: store.db.execute("SELECT count(*) FROM summaries").fetchone()[0] == total,
            timeout=60,
            what="every summary stored",
        )
        wait(
            lambda: (
                collector.workers.restarts >= 1
                and len(collector.workers.pids()) == 1
                and collector.workers.pids()[0] != worker
            ),
            what="the killed worker restarted",
        )
        by_main = collector.ingestor.counters["stored"]
        assert 0 < by_main < total, f"the main process stored {by_main} of {total}: the worker took none, or all"
        rows = store.db.execute("SELECT device, count(*), min(seq), max(seq) FROM summaries GROUP BY device").fetchall()
        assert [tuple(r)[1:] for r in rows] == [(WINDOWS, 1, WINDOWS)] * DEVICES  # none lost, none twice
        wait(
            lambda: ("drift", "dev03") in {(a["rule"], a["device"]) for a in store.alerts(open_only=True)},
            timeout=15,
            what="the drift alert",
        )
        assert {a["device"] for a in store.alerts(open_only=True)} == {"dev03"}
    finally:
        client.loop_stop()
        client.disconnect()
        pids = collector.workers.pids()
        collector.stop()
        store.close()
    assert not [pid for pid in pids if _alive(pid)]  # the workers stopped with the collector


def test_a_worker_whose_collector_was_killed_exits(tmp_path, broker, fleet_name):
    from tests.mqtt_helpers import ROOT

    main = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgekit.cli",
            "fleet",
            "collect",
            "--broker",
            broker.url,
            "--db",
            str(tmp_path / "fleet.db"),
            "--http",
            "",
            "--client-id",
            f"c-{fleet_name}",
            "--workers",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        children = []
        wait(lambda: children.extend(_children(main.pid)) or children, what="the worker process")
        main.send_signal(signal.SIGKILL)
        main.wait(10)
        wait(lambda: not any(_alive(pid) for pid in children), timeout=15, what="the orphaned worker to exit")
    finally:
        if main.poll() is None:
            main.kill()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]
    except OSError:
        return []


def test_workers_stand_down_on_a_broker_without_shared_subscriptions(tmp_path, fleet_name):
    """amqtt speaks MQTT 3.1.1: a worker there would store every summary a second time, so it exits and is not
    restarted."""
    pytest.importorskip("amqtt")
    from edgekit.local.broker import free_port, wait_for_port

    port = free_port()
    amqtt = subprocess.Popen(
        [sys.executable, "-m", "edgekit.local.embedded_broker", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    collector = None
    try:
        assert wait_for_port(port, process=amqtt)
        collector = FleetService(
            CollectorConfig(
                broker=f"mqtt://127.0.0.1:{port}",
                db=str(tmp_path / "fleet.db"),
                http=None,
                client_id=f"c-{fleet_name}",
                workers=2,
            )
        ).start()
        wait(
            lambda: collector.collector.connected.is_set() and not collector.workers.processes,
            timeout=30,
            what="the worker to stand down",
        )
        assert collector.collector.protocol == "3.1.1" and collector.workers.restarts == 0
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        client.connect("127.0.0.1", port)
        client.loop_start()
        base = fh.baseline()
        for seq in (1, 2, 3):
            client.publish(*fh.summary(base, "dev00", seq, fleet=fleet_name), qos=1).wait_for_publish(10)
        wait(lambda: collector.ingestor.counters["stored"] == 3, what="the main process storing alone")
        client.loop_stop()
        client.disconnect()
    finally:
        if collector is not None:
            collector.stop()
        amqtt.terminate()
        amqtt.wait(10)
