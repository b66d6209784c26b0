"""Rollouts when collectors race or messages are lost: the database keeps one rollout in progress per fleet and
one content per bundle version (two PostgreSQL connections at once), and a desired message lost between the
mark and the publish is sent again (the device takes it once: real agent, real Mosquitto)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from edgekit.errors import RolloutConflict
from edgekit.fleet.rollout_spec import RolloutSpec
from edgekit.fleet.rollouts import RolloutController
from edgekit.fleet.store import PostgresStore, SqliteStore
from edgekit.fleet.store.schema import MIGRATIONS
from tests.rollout_helpers import Devices
from tests.test_updater import _wait_report, served  # noqa: F401 - served is a fixture

IN_PROGRESS = ("running", "paused", "pending")


def _rollout(rollout_id: str, fleet: str = "f", created_at: float = 1.0) -> dict:
    return {
        "id": rollout_id,
        "fleet": fleet,
        "kind": "install",
        "name": "digits",
        "version": 3,
        "sha256": "a" * 64,
        "spec": json.dumps({"waves": [1.0]}),
        "wave_started_at": created_at,
        "created_at": created_at,
    }


def _in_progress(store, fleet: str = "f") -> list[str]:
    with store.reading() as db:
        rows = db.execute(f"SELECT id FROM rollouts WHERE fleet = ? AND state IN {IN_PROGRESS}", (fleet,)).fetchall()
    return sorted(row[0] for row in rows)


def _behind_an_open_transaction(first, second, write_first, write_second):
    """``write_first`` on ``first`` inside a transaction left open while ``write_second`` runs on ``second`` in a
    thread: the check-then-insert race made certain. What each returned, once the first commits."""
    results: dict[str, object] = {}
    with first.atomic():
        results["first"] = write_first()
        racer = threading.Thread(target=lambda: results.update(second=write_second()))
        racer.start()
        racer.join(1.0)  # with the index, the second insert waits here for the first's commit
    racer.join(30)
    assert not racer.is_alive()
    return results


def test_two_collectors_starting_rollouts_at_once_leave_one_in_progress(postgres_url):
    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)
    try:
        results = _behind_an_open_transaction(
            first,
            second,
            lambda: first.create_rollout(_rollout("r-1"), [("pi-0", 0, 2)]),
            lambda: second.create_rollout(_rollout("r-2"), [("pi-0", 0, 2)]),
        )
        assert results == {"first": None, "second": "r-1"}  # the second is told whose rollout is in the way
        assert _in_progress(first) == ["r-1"]
        assert first.rollout("r-2") is None and len(first.rollout("r-1")[1]) == 1
        assert second.create_rollout(_rollout("r-3", fleet="g"), [("gx-0", 0, 2)]) is None  # another fleet: free
    finally:
        first.close()
        second.close()


def test_two_uploads_of_one_version_with_other_content_keep_the_first(postgres_url):
    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)
    record = {"name": "digits", "version": 3, "size": 10, "path": "/b", "signature": "s", "added_at": 1.0}
    try:
        results = _behind_an_open_transaction(
            first,
            second,
            lambda: first.store_bundle({**record, "sha256": "a" * 64}, b"A" * 10),
            lambda: second.store_bundle({**record, "sha256": "b" * 64}, b"B" * 10),
        )
        assert results == {"first": None, "second": "a" * 64}  # before: None, as if stored
        assert [b["sha256"] for b in first.bundles()] == ["a" * 64]
        assert list(first.bundle_chunks("b" * 64)) == []  # nor its bytes
        assert second.store_bundle({**record, "sha256": "a" * 64}, b"A" * 10) is None  # the same content: fine
    finally:
        first.close()
        second.close()


def test_many_threads_racing_to_start_a_rollout_on_a_fleet_one_wins(postgres_url):
    stores = [PostgresStore(postgres_url) for _ in range(6)]
    barrier, results = threading.Barrier(len(stores)), {}

    def race(index: int) -> None:
        barrier.wait()
        results[index] = stores[index].create_rollout(_rollout(f"r-{index}"), [("pi-0", 0, 2)])

    try:
        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        winners = [i for i, busy in results.items() if busy is None]
        assert len(results) == len(stores) and len(winners) == 1
        assert _in_progress(stores[0]) == [f"r-{winners[0]}"]
        assert {busy for busy in results.values() if busy is not None} == {f"r-{winners[0]}"}
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_migration_fails_the_later_of_two_rollouts_a_race_left_in_progress(dialect, tmp_path, request, monkeypatch):
    """A database where the race already happened still migrates: the older rollout stays, the later is failed."""
    import edgekit.fleet.store.postgres as postgres_module
    import edgekit.fleet.store.sqlite as sqlite_module

    if dialect == "postgresql":
        url = request.getfixturevalue("postgres_url")
        module, opener = postgres_module, lambda: PostgresStore(url)
    else:
        module, opener = sqlite_module, lambda: SqliteStore(tmp_path / "fleet.db")
    before = [m for m in MIGRATIONS if m[0] < "0012"]
    monkeypatch.setattr(module, "MIGRATIONS", before)
    old = opener()
    with old.atomic() as db:
        for rollout_id, created in (("r-old", 1.0), ("r-late", 2.0), ("r-done", 0.5)):
            db.execute(
                "INSERT INTO rollouts (id, fleet, kind, name, version, sha256, state, spec, created_at, updated_at) "
                "VALUES (?, 'f', 'install', 'digits', 3, ?, ?, '{}', ?, ?)",
                (rollout_id, "a" * 64, "succeeded" if rollout_id == "r-done" else "running", created, created),
            )
    old.close()
    monkeypatch.setattr(module, "MIGRATIONS", MIGRATIONS)
    store = opener()
    try:
        assert _in_progress(store) == ["r-old"]
        late = store.rollout("r-late")[0]
        assert late["state"] == "failed" and "two collectors at once" in late["reason"]
        assert store.rollout("r-done")[0]["state"] == "succeeded"
        assert store.create_rollout(_rollout("r-new"), []) == "r-old"
    finally:
        store.close()


def test_two_controllers_starting_at_once_give_the_second_the_usual_error(postgres_url, tmp_path, bundle, keypair):
    from device_agent.signing import load_public_key

    controllers = []
    for index in range(2):
        store = PostgresStore(postgres_url)
        if index == 0:
            store.record_state(
                {"device": "pi-0", "fleet": "f", "online": True, "model": {"name": "digits", "version": 2}}, 1.0
            )
        controllers.append(
            RolloutController(
                store,
                Devices(),
                tmp_path / f"bundles-{index}",
                lambda: "http://collector.test",
                trusted_key=load_public_key(keypair[1]),
            )
        )
    sha256 = controllers[0].add_bundle(bundle.read_bytes())["sha256"]
    assert controllers[1].add_bundle(bundle.read_bytes())["sha256"] == sha256  # the same bundle twice: fine
    barrier, outcomes = threading.Barrier(2), {}

    def start(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = controllers[index].start(sha256, "f", RolloutSpec())
        except RolloutConflict as exc:
            outcomes[index] = exc

    try:
        threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        started = [o for o in outcomes.values() if isinstance(o, str)]
        refused = [o for o in outcomes.values() if isinstance(o, RolloutConflict)]
        assert len(started) == 1 and len(refused) == 1, outcomes
        assert str(refused[0].problem) == f"rollout {started[0]} is still in progress on fleet 'f'"
    finally:
        for controller in controllers:
            controller.store.close()


def test_the_device_takes_a_desired_message_delivered_again_once(tmp_path, bundle, v4_bundle, keypair, served):  # noqa: F811
    """What makes resending safe: the same desired message during the update and after it changes nothing
    (one download, one install, one final report), and a refused one is not refused twice."""
    from device_agent.agent import Agent
    from device_agent.protocol import DESIRED_SCHEMA
    from tests.agent_helpers import config_of, make_device

    v3, v4 = served.add(bundle), served.add(v4_bundle)
    agent = Agent(config_of(make_device(tmp_path / "dev", bundle, keypair[1], http=False))).start(
        http=False, mqtt=False
    )
    reports: list[tuple[str, str]] = []
    real_report = agent.updater._report
    agent.updater._report = lambda doc, state, *a, **k: (
        reports.append((doc["rollout"], state)),
        real_report(doc, state, *a, **k),
    )
    try:

        def desired(rollout: str, stored: dict) -> bytes:
            doc = {
                "schema": DESIRED_SCHEMA,
                "rollout": rollout,
                "action": "install",
                "name": "digits",
                "version": stored["version"],
                "url": f"{served.base}/bundles/{stored['sha256']}",
                "sha256": stored["sha256"],
                "size": stored["size"],
                "health": {"seconds": 0.5},
            }
            return json.dumps(doc).encode()

        up = desired("r-up", v4)
        for _ in range(3):  # the first, then two resends while it installs
            agent.updater.on_desired(up)
            time.sleep(0.05)
        assert _wait_report(agent, "r-up")["state"] == "succeeded"
        agent.updater.on_desired(up)  # a resend after it finished
        down = desired("r-down", v3)
        agent.updater.on_desired(down)
        assert _wait_report(agent, "r-down")["code"] == "downgrade"
        agent.updater.on_desired(down)
        time.sleep(1.0)
        finals = [r for r in reports if r[1] in ("succeeded", "failed", "rolled_back")]
        assert finals == [("r-up", "succeeded"), ("r-down", "failed")], reports
        assert [r for r in reports if r == ("r-up", "downloading")] == [("r-up", "downloading")], reports
        assert agent.model_info["version"] == 4
    finally:
        agent.stop()


@pytest.mark.network
def test_a_device_that_missed_the_first_publish_still_updates(
    tmp_path, broker, bundle, keypair, digits, fleet_name, v4_bundle
):
    """The leader marks the device sent and its publish is lost (as if the leader died in between): before,
    the device waited for nothing until device_timeout failed it; now the desired message is sent again."""
    from tests.rollout_helpers import RolloutFleet

    fleet = RolloutFleet(
        tmp_path, broker, bundle=bundle, public_key=keypair[1], data=digits.test, fleet=fleet_name, devices=1
    )
    controller = fleet.collector.rollouts
    publish, desired = controller.publish, []

    def losing_the_first(topic: str, payload: bytes, retain: bool) -> bool:
        if topic.endswith("/desired"):
            desired.append(topic)
            if len(desired) == 1:
                return True  # "sent", never reached the broker
        return publish(topic, payload, retain)

    controller.publish, controller.resend_seconds = losing_the_first, 2.0
    try:
        started = fleet.client.start(v4_bundle, fleet=fleet.fleet_name, health_seconds=1)
        status = fleet.finished(started["id"], timeout=120)
        assert status["state"] == "succeeded", status
        assert len(desired) >= 2
        assert fleet.versions() == {"emu-00": 4}
    finally:
        fleet.stop()


def test_a_timeout_mark_made_on_an_earlier_state_yields_to_a_report_stored_since(fleet_store):
    """The controller's tick marks a device failed for its timeout from the state it loaded; a report stored in
    between (by the ingest thread, or another collector) must win: ``only_from`` sets it only if still there."""
    assert fleet_store.create_rollout(_rollout("r-1"), [("pi-0", 0, 2), ("pi-1", 0, 2)]) is None
    for device in ("pi-0", "pi-1"):
        fleet_store.set_rollout_device("r-1", device, "sent", "desired state published", 2.0, sent_at=2.0)
    report = {"rollout": "r-1", "device": "pi-0", "state": "succeeded", "reason": "running v3", "version": 3}
    fleet_store.record_rollout_report(report, {}, 3.0)
    marked = [
        fleet_store.set_rollout_device(
            "r-1", d, "failed", "no result within 60 s", 4.0, code="timeout", only_from="sent"
        )
        for d in ("pi-0", "pi-1")
    ]
    states = {d["device"]: d["state"] for d in fleet_store.rollout("r-1")[1]}
    assert marked == [False, True] and states == {"pi-0": "succeeded", "pi-1": "failed"}
