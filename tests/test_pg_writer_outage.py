"""The leader's writer thread through a database outage between batches (real Mosquitto, real PostgreSQL).

The writer runs the alert rules on the devices with news after a batch, and every ``ALERT_SECONDS`` while
idle. A store call there that raised ended the thread: the collector stayed connected, so the broker kept
handing it its share of the group's summaries, which were neither stored nor acknowledged, with no
warning (found while chasing stalls of ``bench_collector.py --only pair``)."""

import contextlib
import time

import paho.mqtt.client as mqtt
import psycopg
import pytest

from edgekit.fleet.alerts import AlertRules
from edgekit.fleet.collector import ALERT_SECONDS
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.service import FleetService
from tests.fleet_helpers import baseline, summary, wait

pytestmark = pytest.mark.network
BASE = baseline()


@contextlib.contextmanager
def database_refusing_connections(postgres_server, url):
    """An outage of one database: its sessions end and new ones are refused until the block ends."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_server.url_of("postgres"), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def windows(service, device):
    try:
        return next((d["windows"] for d in service.store.status() if d["device"] == device), 0)
    except Exception:  # the store's reading connection was one the outage ended: it reconnects next time
        return -1


def test_the_leaders_writer_outlives_a_database_outage_between_batches(
    broker, postgres_server, postgres_url, fleet_name
):
    service = FleetService(
        CollectorConfig(broker=broker.url, db=postgres_url, http=None, client_id=f"c-{fleet_name}", group=fleet_name),
        alert_rules=AlertRules(),
    ).start()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{fleet_name}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert service.collector.connected.wait(10)
        wait(service.leader.leading, what="the collector to lead (it runs the alert rules in its writer)")
        client.publish(*summary(BASE, "pi-1", 1, fleet=fleet_name, rows=50), qos=1).wait_for_publish(5)
        wait(lambda: windows(service, "pi-1") == 1, what="the first summary stored")
        with database_refusing_connections(postgres_server, postgres_url):
            time.sleep(3 * ALERT_SECONDS)  # idle: the writer's alert check meets the outage (the lease lasts 10 s)
        (writer,) = [t for t in service.collector._threads if t.name == "edgekit-collector-writer"]
        assert writer.is_alive(), "the writer thread ended in the outage"
        client.publish(*summary(BASE, "pi-1", 2, fleet=fleet_name, rows=50), qos=1).wait_for_publish(5)
        wait(lambda: windows(service, "pi-1") == 2, what="a summary sent after the outage stored")
    finally:
        client.loop_stop()
        client.disconnect()
        service.stop()
