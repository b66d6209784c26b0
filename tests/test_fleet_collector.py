"""The collector against a real Mosquitto and real agent processes."""

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from edgekit.fleet.alerts import AlertRules, AlertSinks
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.service import FleetService
from edgekit.fleet.store import SqliteStore
from tests.fleet_helpers import wait
from tests.mqtt_helpers import ROOT, AgentProcess
from tests.test_agent_mqtt import emulated_device

pytestmark = pytest.mark.network


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read()


def screenshot(url, path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={path.parent / 'chromium-profile'}",
            "--window-size=1100,900",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


def test_collector_ingests_a_fleet_shows_it_and_alerts(tmp_path, bundle, keypair, digits, broker, fleet_name):
    collector = FleetService(
        CollectorConfig(
            broker=broker.url, db=str(tmp_path / "fleet.db"), http="127.0.0.1:0", client_id=f"c-{fleet_name}"
        ),
        alert_rules=AlertRules(drift_windows=2),
        alert_sinks=AlertSinks(log=False),
    )
    collector.start()
    agents = [
        AgentProcess(
            emulated_device(
                tmp_path,
                bundle,
                keypair,
                digits,
                broker,
                fleet_name,
                rate=2000,
                window_rows=300,
                drift=("pixel_2_4", 8.0) if i == 0 else None,
                device_id=f"dev{i}",
            )
        ).start()
        for i in range(2)
    ]
    try:
        wait(
            lambda: all(d["windows"] >= 4 for d in collector.store.status()) and len(collector.store.status()) == 2,
            what="4 windows from each device",
        )
    finally:
        for agent in agents:
            agent.stop()
    wait(lambda: all(d["online"] is False for d in collector.store.status()), what="offline states")
    port = collector.server.server_address[1]
    status = {d["device"]: d for d in json.loads(get(port, "/api/status")[1])}
    assert status["dev0"]["drifted"] is True and status["dev0"]["worst_feature"] == "pixel_2_4"
    assert (
        status["dev1"]["missing_seqs"] == 0
        and status["dev0"]["model"] == "digits"
        and status["dev0"]["model_version"] == 3
    )
    drift = {tuple(r["devices"]): r for r in json.loads(get(port, "/api/drift?device=dev0")[1])}
    assert drift[("dev0",)]["drift"]["features"]["pixel_2_4"]["drifted"] is True
    collector.alerts.evaluate()
    assert ("drift", "dev0", "pixel_2_4") in {
        (a["rule"], a["device"], a["subject"]) for a in collector.store.alerts(open_only=True)
    }
    metrics = get(port, "/metrics")[1].decode()
    assert 'edgekit_device_drifted{device="dev0"' in metrics and "edgekit_collector_messages_total" in metrics
    html_page = get(port, "/devices/dev0")[1].decode()
    assert "<svg" in html_page and "pixel_2_4" in html_page
    fleet_drift = get(port, "/drift?feature=pixel_2_4")[1].decode()
    assert "distribution of pixel_2_4" in fleet_drift and "merged verdict" in fleet_drift
    screenshot(f"http://127.0.0.1:{port}/drift?feature=pixel_2_4", tmp_path / "dashboard-fleet-drift.png")
    shot = screenshot(f"http://127.0.0.1:{port}/devices/dev0", tmp_path / "dashboard-device.png")
    fleet_shot = screenshot(f"http://127.0.0.1:{port}/", tmp_path / "dashboard-fleet.png")
    assert shot.stat().st_size > 10_000 and fleet_shot.stat().st_size > 5_000
    print(f"dashboard screenshots: {shot} {fleet_shot}")
    collector.stop()


def test_collector_killed_and_restarted_mid_stream_loses_no_summary(
    tmp_path, bundle, keypair, digits, broker, fleet_name
):
    db = tmp_path / "fleet.db"

    def start_collector():
        with open(tmp_path / "collector.log", "ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgekit.cli",
                    "fleet",
                    "collect",
                    "--broker",
                    broker.url,
                    "--db",
                    str(db),
                    "--http",
                    "",
                    "--client-id",
                    f"c-{fleet_name}",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )

    collector = start_collector()
    agent = AgentProcess(
        emulated_device(tmp_path, bundle, keypair, digits, broker, fleet_name, rate=2000, window_rows=50)
    ).start()
    store = SqliteStore(db)
    try:
        wait(lambda: any(d["windows"] >= 20 for d in store.status()), what="20 windows stored")
        collector.send_signal(signal.SIGKILL)
        collector.wait(10)
        time.sleep(2.0)  # summaries keep coming; the broker keeps them for the session (120 s after the kill)
        collector = start_collector()
        wait(lambda: store.status()[0]["windows"] >= 100, timeout=40, what="windows after the restart")
        # Windows published before the first collector subscribed are asked for again (after 10 s):
        # the device must still be running to resend them.
        wait(lambda: store.status()[0]["missing_seqs"] == 0, timeout=40, what="gaps filled")
    finally:
        agent.stop()
        collector.terminate()
        collector.wait(10)
    wait(lambda: store.status()[0]["missing_seqs"] == 0, timeout=20, what="gaps filled after the device stopped")
    seqs = [row[0] for row in store.db.execute("SELECT seq FROM summaries ORDER BY seq")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) >= 100  # from the spool's base


def test_the_device_page_shows_drifted_features_before_high_psi_ones():
    from edgekit.fleet.pages.device import render_device

    def window(seq, noisy_psi, drifted_psi):
        features = {
            "noisy": {"psi": noisy_psi, "ks": 0.1, "js": 0.1, "drifted": False},
            "moved": {"psi": drifted_psi, "ks": 0.3, "js": 0.2, "drifted": True},
        }
        features.update({f"f{i}": {"psi": 0.5 + i, "ks": 0.1, "js": 0.1, "drifted": False} for i in range(20)})
        return {
            "seq": seq,
            "drift": {"features": features},
            "model": {"name": "m", "version": 1},
            "window": {"end": "now"},
        }

    page = render_device("dev0", [window(1, 9.2, 0.4), window(2, 8.0, 0.6)]).decode()
    table = page.split("<h2>Latest window</h2>")[1]
    assert table.index("moved") < table.index("noisy")  # the drifted feature heads the table
    assert "moved" in page.split("</svg>")[0]  # and is in the chart, though 20 features have a higher PSI
