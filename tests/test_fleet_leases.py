"""The store's contract for the leader lease and bundles' bytes, on every store implementation (SQLite file,
``:memory:`` and a real PostgreSQL server, as in test_fleet_store.py).

A lease is taken when expired or already the caller's, its fencing token goes up at every change of
holder, its expiry is the database's clock, and a write fenced by a token another holder has since
replaced is refused whole."""

import json
import threading
from types import SimpleNamespace

import pytest

from device_agent.signing import load_public_key
from edgekit.errors import RolloutError, StoreUnavailable
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.leader import Duty, Leadership
from edgekit.fleet.rollouts import RolloutController
from edgekit.fleet.service import FleetService
from edgekit.fleet.store import CHUNK_BYTES, LeaseLost, SqliteStore
from tests.test_fleet_store import STORES


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    opened = STORES[request.param](request, tmp_path)
    yield opened
    opened.close()


def test_the_first_collector_takes_the_lease_and_renews_it_under_the_same_token(store):
    assert store.lease("leader") is None
    first = store.acquire_lease("leader", "c1", 10)
    assert (first.holder, first.token, first.held) == ("c1", 1, True)
    assert first.expires_at - first.now == pytest.approx(10, abs=0.5)  # the database's clock, not the caller's
    refused = store.acquire_lease("leader", "c2", 10)
    assert (refused.holder, refused.token) == ("c1", 1)  # what stands: someone else's
    renewed = store.acquire_lease("leader", "c1", 10)
    assert (renewed.holder, renewed.token, renewed.acquired_at) == ("c1", 1, first.acquired_at)
    assert renewed.expires_at >= first.expires_at
    assert store.lease("leader").holder == "c1" and store.lease("other") is None  # leases are by name


def test_an_expired_lease_is_taken_by_another_under_a_higher_token(store):
    store.acquire_lease("leader", "c1", -1)  # expired the moment it was granted: no sleeping in tests
    stolen = store.acquire_lease("leader", "c2", 10)
    assert (stolen.holder, stolen.token, stolen.held) == ("c2", 2, True)
    assert store.acquire_lease("leader", "c1", 10).holder == "c2"  # the old holder cannot take it back
    store.acquire_lease("leader", "c2", -1)
    back = store.acquire_lease("leader", "c1", 10)
    assert (back.holder, back.token) == ("c1", 3)  # every change of holder raises it, never reuses one


def test_a_deposed_leaders_fenced_write_is_refused_whole(store):
    store.acquire_lease("leader", "c1", -1)
    store.acquire_lease("leader", "c2", 10)
    with pytest.raises(LeaseLost, match="token 1"):
        with store.fenced("leader", 1):
            store.count_reject("from-the-deposed-leader", "d", 1.0)
    with store.fenced("leader", 2):
        store.count_reject("from-the-leader", "d", 1.0)  # joins the fenced transaction
    assert store.rejects() == {"from-the-leader": 1}
    with pytest.raises(RuntimeError):  # a failure inside rolls the whole transaction back
        with store.fenced("leader", 2):
            store.count_reject("rolled-back", "d", 1.0)
            raise RuntimeError("the publish failed")
    assert store.rejects() == {"from-the-leader": 1}


def test_a_released_lease_is_taken_at_once_and_only_its_holder_releases_it(store):
    store.acquire_lease("leader", "c1", 60)
    assert not store.release_lease("leader", "c1", 7)  # not its token
    assert not store.release_lease("leader", "c2", 1)
    assert store.acquire_lease("leader", "c2", 60).holder == "c1"
    assert store.release_lease("leader", "c1", 1)
    assert not store.lease("leader").held
    taken = store.acquire_lease("leader", "c2", 60)
    assert (taken.holder, taken.token) == ("c2", 2)


@pytest.mark.parametrize("kind", ["sqlite-file", "postgresql"])
def test_collectors_racing_for_an_expired_lease_leave_exactly_one_holder(kind, request, tmp_path):
    """Eight connections (as eight collector processes) try at once: one wins, the token goes up once."""
    setup = STORES[kind](request, tmp_path)
    setup.acquire_lease("leader", "old", -1)
    contenders = [STORES[kind](request, tmp_path) for _ in range(8)] if kind == "postgresql" else []
    if kind == "sqlite-file":
        contenders = [SqliteStore(tmp_path / "fleet.db") for _ in range(8)]
    start, won = threading.Barrier(len(contenders)), []

    def attempt(index, contender):
        start.wait()
        if contender.acquire_lease("leader", f"c{index}", 30).holder == f"c{index}":
            won.append(index)

    threads = [threading.Thread(target=attempt, args=(i, c)) for i, c in enumerate(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    lease = setup.lease("leader")
    assert len(won) == 1 and lease.holder == f"c{won[0]}" and lease.token == 2
    for opened in [setup, *contenders]:
        opened.close()


def _record(sha256: str, name: str = "digits", version: int = 1, size: int = 0) -> dict:
    return {"sha256": sha256, "name": name, "version": version, "size": size, "path": "/nowhere",
            "signature": "", "added_at": 1.0}  # fmt: skip


def test_a_bundles_bytes_are_kept_in_chunks_and_read_back_whole(store):
    data = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256) + b"tail"
    assert store.store_bundle(_record("a" * 64, size=len(data)), data) is None
    chunks = list(store.bundle_chunks("a" * 64))
    assert len(chunks) == 3 and b"".join(chunks) == data
    assert store.store_bundle(_record("a" * 64, size=len(data)), data) is None  # idempotent
    assert b"".join(store.bundle_chunks("a" * 64)) == data
    # Other content under a stored name and version: refused, and none of its bytes kept.
    assert store.store_bundle(_record("b" * 64), b"other") == "a" * 64
    assert list(store.bundle_chunks("b" * 64)) == [] and store.bundle(sha256="b" * 64) is None


# -- the leadership a collector keeps (leader.py), on a SQLite file -----------------------------------------


class Clock:
    """The monotonic clock a ``Leadership`` measures its lease by, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Unreachable:
    """A store that has become unreachable (a network cut)."""

    def acquire_lease(self, *args):
        raise StoreUnavailable("PostgreSQL: connection refused", "it is retried")


def test_a_leader_that_cannot_renew_stops_before_its_lease_can_expire(tmp_path):
    clock = Clock()
    leader = Leadership(SqliteStore(tmp_path / "fleet.db"), "c1", lease_seconds=10, clock=clock)
    assert leader.attempt() and leader.leading() and leader.token == 1
    leader.store.close()
    leader.store = Unreachable()
    clock.now += 9.9
    assert leader.attempt() and leader.leading()  # the lease it renewed last still stands
    clock.now += 0.1
    assert not leader.attempt() and not leader.leading()  # stops on its own clock, before anyone may steal
    with pytest.raises(LeaseLost):
        with leader.fenced():
            pass


def test_a_deposed_leader_is_refused_at_once_and_steps_down_at_its_next_attempt(tmp_path):
    store = SqliteStore(tmp_path / "fleet.db")
    first, second = Leadership(store, "c1"), Leadership(SqliteStore(tmp_path / "fleet.db"), "c2")
    assert first.attempt() and not second.attempt()
    store.acquire_lease("leader", "c1", -1)  # as if c1 had been paused past its lease
    assert second.attempt() and second.token == 2
    with pytest.raises(LeaseLost, match="token 1"):  # it still believes it leads: the token says otherwise
        with first.fenced():
            store.count_reject("deposed", "d", 1.0)
    assert store.rejects() == {}
    assert not first.attempt() and not first.leading() and first.token is None
    with second.fenced():
        second.store.count_reject("leader", "d", 1.0)  # in the fenced transaction, on c2's connection
    assert store.rejects() == {"leader": 1}
    second.stop()  # releases: c1 takes it at once
    assert first.attempt() and first.token == 3
    store.close()
    second.store.close()


def test_duties_run_on_the_leader_alone_and_at_once(tmp_path):
    ran = {"c1": threading.Event(), "c2": threading.Event()}
    leaders = [Leadership(SqliteStore(tmp_path / "fleet.db"), name) for name in ("c1", "c2")]
    for leader in leaders:
        leader.start([Duty("note", ran[leader.holder].set, every=3600)])
    try:
        assert ran["c1"].wait(10)  # at once, not an hour later
        assert not ran["c2"].wait(1.0)
    finally:
        for leader in leaders:
            leader.stop()
            leader.store.close()


def test_a_follower_rollout_controller_does_nothing(tmp_path):
    class NoStore:
        def running_rollouts(self):
            raise AssertionError("a follower read the running rollouts")

    controller = RolloutController(NoStore(), None, tmp_path, lambda: "", leader=SimpleNamespace(leading=lambda: False))
    controller.tick()


# -- bundles served by a collector that did not receive them ---------------------------------------------------


def test_a_bundle_uploaded_to_one_collector_is_written_from_the_database_by_another(tmp_path, bundle, keypair):
    store, key = SqliteStore(tmp_path / "fleet.db"), load_public_key(keypair[1])
    received = RolloutController(store, None, tmp_path / "c1", lambda: "", trusted_key=key)
    sha256 = received.add_bundle(bundle.read_bytes())["sha256"]
    other = RolloutController(store, None, tmp_path / "c2", lambda: "", trusted_key=key)
    assert not (tmp_path / "c2").exists()
    path = other.bundle_file(sha256)
    assert path == tmp_path / "c2" / f"{sha256}.edgebundle" and path.read_bytes() == bundle.read_bytes()
    assert other.bundle_file("0" * 64) is None
    with store.atomic() as db:  # the database's copy goes bad: it is never written out, let alone served
        db.execute("UPDATE bundle_blobs SET data = ? WHERE sha256 = ? AND n = 0", (b"garbage", sha256))
    third = RolloutController(store, None, tmp_path / "c3", lambda: "", trusted_key=key)
    with pytest.raises(RolloutError, match="does not match its sha256"):
        third.bundle_file(sha256)
    assert list((tmp_path / "c3").iterdir()) == []
    store.close()


# -- who leads, as people see it -------------------------------------------------------------------------------


def test_fleet_leader_and_status_name_the_leader(cli, tmp_path):
    db = str(tmp_path / "fleet.db")
    store = SqliteStore(db)
    assert cli("fleet", "leader", "--db", db).stdout.startswith("leader: none yet")
    store.acquire_lease("leader", "collector-a", 10)
    shown = json.loads(cli("fleet", "leader", "--db", db, "--json").stdout)
    assert (shown["holder"], shown["held"], shown["token"]) == ("collector-a", True, 1)
    assert 0 < shown["expires_in"] <= 10
    status = cli("fleet", "status", "--db", db)
    assert status.exit_code == 0 and "leader: collector-a since" in status.stdout
    assert json.loads(cli("fleet", "status", "--db", db, "--json").stdout) == []  # still the list of devices
    store.release_lease("leader", "collector-a", 1)
    assert "leader: none (the lease of collector-a ran out" in cli("fleet", "status", "--db", db).stdout
    store.close()


def test_the_leader_gauge_passes_promtool_and_the_dashboard_names_the_leader(tmp_path):
    from edgekit.fleet.metrics import render
    from edgekit.fleet.pages.fleet import render_fleet
    from edgekit.fleet.web import _leader
    from tests.test_metrics_exposition import promtool_check

    services = [FleetService(CollectorConfig(db=str(tmp_path / "fleet.db"), http=None, client_id=c)) for c in "ab"]
    try:
        assert services[0].leader.attempt() and not services[1].leader.attempt()
        texts = [render(service).decode() for service in services]
        page = render_fleet([], [], _leader(services[1].store)).decode()
    finally:
        for service in services:
            service.store.close()
    for text in texts:
        promtool_check(text)
    assert 'edgekit_collector_leader{collector="a"} 1.0' in texts[0]
    assert 'edgekit_collector_leader{collector="b"} 0.0' in texts[1]
    assert "leader: <b>a</b> since" in page
