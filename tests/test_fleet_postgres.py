"""The collector on a real PostgreSQL server (the store's own contract tests run on it in test_fleet_store.py)."""

import json
import time

import paho.mqtt.client as mqtt
import psycopg
import pytest

from edgekit.errors import StoreUnavailable
from edgekit.fleet.collector import Collector
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.store import PostgresStore, open_store
from tests.fleet_helpers import baseline, summary, wait

pytestmark = pytest.mark.network
BASE = baseline()


def publisher(broker, name):
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{name}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def cut_connections(url):
    """What a server restart or a network cut does to the collector: every other session of its database ends."""
    with psycopg.connect(url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    return ended


def stored(store):
    """Windows stored, or -1 while the store's own reading connection is one the cut ended (it reconnects)."""
    try:
        return sum(d["windows"] for d in store.status())
    except StoreUnavailable:
        return -1


def test_a_lost_database_connection_loses_no_summary_and_stores_none_twice(broker, postgres_url, fleet_name):
    messages = [summary(BASE, f"d{d}", seq, fleet=fleet_name, rows=50) for seq in range(1, 31) for d in range(4)]
    collector = Collector(
        CollectorConfig(broker=broker.url, db=postgres_url, http=None, client_id=f"c-{fleet_name}", group=fleet_name)
    ).start()
    client = publisher(broker, fleet_name)
    store = PostgresStore(postgres_url)
    try:
        assert collector.connected.wait(10)
        for topic, payload in messages[:60]:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        wait(lambda: sum(d["windows"] for d in store.status()) == 60, what="the first half stored")
        assert cut_connections(postgres_url) >= 1
        for topic, payload in messages[60:]:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        wait(lambda: stored(store) == 120, what="every summary stored after the cut")
    finally:
        client.loop_stop()
        client.disconnect()
        collector.stop()
    with store.reading() as db:
        counted = db.execute("SELECT count(*), count(DISTINCT (device, seq)) FROM summaries").fetchone()
    assert tuple(counted) == (120, 120)
    assert all(d["missing_seqs"] == 0 and d["windows"] == 30 for d in store.status())
    store.close()


def test_a_collector_process_on_postgres_and_fleet_status_reading_it(cli, broker, postgres_url, fleet_name, tmp_path):
    import subprocess
    import sys

    from tests.mqtt_helpers import ROOT

    with open(tmp_path / "collector.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgekit.cli", "fleet", "collect", "--broker", broker.url, "--db", postgres_url,
             "--http", "", "--client-id", f"c-{fleet_name}"],
            cwd=ROOT, stdout=log, stderr=log,
        )  # fmt: skip
    client = publisher(broker, fleet_name)
    try:
        wait(lambda: _migrated(postgres_url), what="the collector's migrations")
        time.sleep(0.5)  # subscribed
        for seq in (1, 2, 4):
            client.publish(*summary(BASE, "pi-1", seq, fleet=fleet_name, rows=50), qos=1).wait_for_publish(5)
        store = open_store(postgres_url)
        wait(lambda: sum(d["windows"] for d in store.status()) == 3, what="three summaries stored")
        store.close()
    finally:
        client.loop_stop()
        client.disconnect()
        process.terminate()
        process.wait(10)
    result = cli("fleet", "status", "--db", postgres_url, "--json")
    assert result.exit_code == 0, result.stderr
    (device,) = json.loads(result.stdout)
    assert (device["device"], device["windows"], device["missing_seqs"]) == ("pi-1", 3, 1)


def test_an_unreachable_server_is_one_line_naming_the_fix(cli, postgres_server):
    url = postgres_server.url_of("postgres").replace(str(postgres_server.port), "1")
    result = cli("fleet", "status", "--db", url)
    assert result.exit_code != 0
    assert "cannot open the fleet database" in result.stderr and "--db URL" in result.stderr
    assert "Traceback" not in result.stderr


def _migrated(url):
    try:
        with psycopg.connect(url) as connection:
            return connection.execute("SELECT count(*) FROM migrations").fetchone()[0] >= 5
    except psycopg.Error:
        return False
