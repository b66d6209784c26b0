"""``fleet collect`` refuses settings that cannot work before it touches the broker or makes a database.

A second collector started by mistake on a running one's HTTP port used to connect to MQTT first, with the
same client id and a persistent session: the broker closed the running collector's connection ("already
connected, closing old connection") before the second one failed on the port; it also left an empty new
database. A broker URL it cannot use made the database file before being refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.service import FleetService, check_can_start
from edgekit.local.broker import free_port
from tests.fleet_helpers import state, wait

ROOT = Path(__file__).resolve().parent.parent


def collect(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``edgekit fleet collect`` as its own process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "edgekit.cli", "fleet", "collect", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def publish_state(broker, device: str, fleet: str) -> None:
    import paho.mqtt.publish as publish

    topic, payload = state(device, True, fleet=fleet)
    publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=broker.port)


def test_a_second_collector_on_a_taken_port_never_cuts_off_the_first(tmp_path, broker, fleet_name):
    port, client_id = free_port(), f"c-{fleet_name}"
    first = FleetService(
        CollectorConfig(broker=broker.url, db=str(tmp_path / "fleet.db"), http=f"127.0.0.1:{port}", client_id=client_id)
    ).start()
    try:
        wait(first.collector.connected.is_set, what="the first collector's connection")
        publish_state(broker, "before", fleet_name)
        wait(lambda: "before" in {d["device"] for d in first.store.status()}, what="the first state")
        second_db = tmp_path / "second.db"
        result = collect(
            "--broker", broker.url, "--db", str(second_db), "--http", f"127.0.0.1:{port}", "--client-id", client_id,
            "--duration", "20",
        )  # fmt: skip
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"127.0.0.1:{port}" in lines[0] and "--http" in lines[0]
        assert not second_db.exists()
        time.sleep(1.0)  # a takeover would show in the broker's log within this
        log = Path(broker.dir / "mosquitto.log").read_text(errors="replace")
        assert "already connected" not in log, log[-2000:]
        assert first.collector.connected.is_set()
        publish_state(broker, "after", fleet_name)  # and it still receives
        wait(lambda: "after" in {d["device"] for d in first.store.status()}, what="a state after the second try")
    finally:
        first.stop()


def test_a_broker_url_it_cannot_use_makes_no_database(tmp_path):
    db = tmp_path / "fleet.db"
    result = collect("--broker", "http://x", "--db", str(db), "--http", "127.0.0.1:0", "--duration", "5")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "http://x" in lines[0] and "mqtt://" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # no database, no bundle directory beside it


def test_an_http_address_it_cannot_serve_is_refused_before_anything(tmp_path):
    config = CollectorConfig(
        broker="mqtt://127.0.0.1:1", db=str(tmp_path / "fleet.db"), http="no-such-host.invalid:8480"
    )
    with pytest.raises(EdgekitError, match="cannot serve HTTP on no-such-host.invalid:8480"):
        FleetService(config)
    assert list(tmp_path.iterdir()) == []


def test_a_free_port_passes_and_is_let_go(tmp_path):
    from edgekit.fleet.web import serve

    port = free_port()
    check_can_start(CollectorConfig(broker="mqtts://broker.example:8883", http=f"127.0.0.1:{port}"))
    check_can_start(CollectorConfig(http=None))
    service = FleetService(CollectorConfig(db=str(tmp_path / "f.db"), http=f"127.0.0.1:{port}"))
    try:
        serve(service, f"127.0.0.1:{port}").shutdown()  # the probe did not keep the port
    finally:
        service.store.close()
