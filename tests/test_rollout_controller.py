"""The rollout controller, its HTTP API and the bundle endpoint, on a real store and a real HTTP server.
Devices are played by the test through the controller's ``record_report`` seam (end to end runs are in
test_rollout.py and test_rollout_faults.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from edgekit.errors import RolloutConflict, RolloutError
from edgekit.fleet.rollout_spec import RolloutSpec, _assign_waves, parse_abort_rules, parse_waves
from edgekit.fleet.rollouts import RolloutController
from edgekit.fleet.store import SqliteStore
from edgekit.local.broker import free_port
from tests.rollout_helpers import Devices


def test_rules_and_waves_parse_or_say_how_to_write_them():
    assert [str(r) for r in parse_abort_rules("failed>20%, agreement<0.98,p99_ms>50,drift>30%")] == [
        "failed>20%",
        "agreement<0.98",
        "p99_ms>50",
        "drift>30%",
    ]
    assert parse_waves("10%,50%,100%") == (0.1, 0.5, 1.0)
    for bad in ("failed<20%", "latency>5", "agreement<2"):
        with pytest.raises(RolloutError):
            parse_abort_rules(bad)
    for bad in ("50%,10%,100%", "10%,50%", "ten"):
        with pytest.raises(RolloutError, match="waves"):
            parse_waves(bad)
    assert _assign_waves(10, (0.1, 0.5, 1.0)) == [0] + [1] * 4 + [2] * 5
    assert _assign_waves(2, (0.1, 0.5, 1.0)) == [0, 1]  # every wave gets a device while devices remain


@pytest.fixture
def controller(tmp_path, bundle, keypair):
    from device_agent.signing import load_public_key

    store = SqliteStore(tmp_path / "fleet.db")
    for index in range(4):
        store.record_state(
            {"device": f"pi-{index}", "fleet": "f", "online": True, "model": {"name": "digits", "version": 2}}, 1.0
        )
    devices = Devices()
    made = RolloutController(
        store, devices, tmp_path / "bundles", lambda: "http://collector.test", trusted_key=load_public_key(keypair[1])
    )
    made.devices = devices
    made.stored = made.add_bundle(bundle.read_bytes())
    yield made
    store.close()


def _report(controller, rollout_id, device, state, **facts):
    controller.record_report(
        {
            "rollout": rollout_id,
            "device": device,
            "state": state,
            "reason": "",
            "active": {"name": "digits", "version": 3},
            **facts,
        },
        2.0,
    )


def test_waves_advance_only_when_the_wave_is_done_and_survive_a_restart(controller, tmp_path, keypair):
    from device_agent.signing import load_public_key

    rollout_id = controller.start(
        controller.stored["sha256"], "f", RolloutSpec(waves=(0.25, 1.0), shadow_rows=50, devices="pi-*")
    )
    assert set(controller.devices.desired) == {"pi-0"}
    desired = controller.devices.desired["pi-0"]
    assert (
        desired["url"] == f"http://collector.test/bundles/{controller.stored['sha256']}"
        and desired["version"] == 3
        and desired["shadow"]["rows"] == 50
    )
    _report(controller, rollout_id, "pi-0", "shadow")
    controller.tick()
    assert set(controller.devices.desired) == {"pi-0"}
    _report(controller, rollout_id, "pi-0", "succeeded", shadow={"rows": 50, "agreement": 0.99, "p99_ms": 0.1})
    # The collector restarts: a new controller on the same database carries on.
    again = RolloutController(
        SqliteStore(tmp_path / "fleet.db"),
        controller.devices,
        tmp_path / "bundles",
        lambda: "http://collector.test",
        trusted_key=load_public_key(keypair[1]),
    )
    again.tick()
    assert set(controller.devices.desired) == {"pi-0", "pi-1", "pi-2", "pi-3"}
    for device in ("pi-1", "pi-2", "pi-3"):
        _report(again, rollout_id, device, "succeeded")
    again.tick()
    status = again.status(rollout_id)
    assert status["state"] == "succeeded" and status["reason"] == "4 of 4 device(s) updated"


def _signed_revert(bundle, key_path, fleet="f", **options):
    from edgekit.bundle.keys import load_private_key
    from edgekit.fleet.signed import sign_revert

    return sign_revert(bundle, fleet=fleet, key=load_private_key(key_path), **options)


def test_an_abort_rule_reverts_the_devices_that_moved(controller, bundle, keypair):
    revert = _signed_revert(bundle, keypair[0])
    rollout_id = controller.start(
        controller.stored["sha256"],
        "f",
        RolloutSpec(waves=(0.5, 1.0), abort_on=parse_abort_rules("agreement<0.98")),
        revert=revert,
    )
    assert rollout_id == revert["instruction"]["rollout"]  # the id the operator's key signed
    _report(controller, rollout_id, "pi-0", "succeeded", shadow={"rows": 100, "agreement": 0.99})
    _report(controller, rollout_id, "pi-1", "succeeded", shadow={"rows": 100, "agreement": 0.90})  # mean 0.945
    controller.tick()
    status = controller.status(rollout_id)
    assert status["state"] == "aborted" and "agreement<0.98 tripped" in status["reason"]
    sent = controller.devices.desired["pi-0"]
    assert sent["action"] == "revert" and sent["from_version"] == 2 and sent["schema"] == "edgekit.desired/2"
    assert (sent["instruction"], sent["instruction_signature"]) == (revert["instruction"], revert["signature"])
    assert [d["state"] for d in status["devices"][2:]] == ["aborted", "aborted"]
    assert "pi-2" not in controller.devices.desired


def test_a_signed_revert_is_checked_at_the_start_and_without_one_an_abort_leaves_devices(
    controller, bundle, keypair, tmp_path
):
    from edgekit.bundle.keys import generate_keypair, load_private_key
    from edgekit.fleet.signed import sign_revert

    stranger = generate_keypair(tmp_path / "stranger")[0]
    with pytest.raises(RolloutError, match="did not sign|signed by key"):
        sign_revert(bundle, fleet="f", key=load_private_key(stranger))  # the CLI refuses before uploading
    spec = RolloutSpec(waves=(0.5, 1.0))
    with pytest.raises(RolloutError, match="for another fleet"):
        controller.start(controller.stored["sha256"], "f", spec, revert=_signed_revert(bundle, keypair[0], "g"))
    forged = _signed_revert(bundle, keypair[0])
    forged["instruction"] = {**forged["instruction"], "rollout": "r-another"}
    with pytest.raises(RolloutError, match="not signed by the fleet's trusted key"):
        controller.start(controller.stored["sha256"], "f", spec, revert=forged)
    assert controller.list() == []
    installed = _signed_revert(bundle, keypair[0])
    first = controller.start(controller.stored["sha256"], "f", spec, revert=installed)
    controller.abort(first)
    with pytest.raises(RolloutConflict, match="exists already"):
        controller.start(controller.stored["sha256"], "f", spec, revert=installed)
    rollout_id = controller.start(controller.stored["sha256"], "f", spec)  # an older CLI: no revert
    assert controller.status(rollout_id)["signed_revert"] is False
    _report(controller, rollout_id, "pi-0", "succeeded")
    controller.devices.desired.clear()
    status = controller.abort(rollout_id)
    assert controller.devices.desired == {}  # devices would refuse an unsigned revert: none is sent
    assert "2 device(s) sent v3 are not sent back" in status["reason"] and "--key" in status["reason"]


def test_pause_resume_and_one_rollout_per_fleet(controller):
    rollout_id = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(0.25, 1.0)))
    with pytest.raises(RolloutConflict, match="still in progress"):
        controller.start(controller.stored["sha256"], "f", RolloutSpec())
    assert controller.pause(rollout_id)["state"] == "paused"
    _report(controller, rollout_id, "pi-0", "succeeded")
    controller.tick()
    assert set(controller.devices.desired) == {"pi-0"}  # paused: no new wave
    with pytest.raises(RolloutConflict):
        controller.pause(rollout_id)
    assert controller.resume(rollout_id)["state"] == "running"
    controller.tick()
    assert len(controller.devices.desired) == 4


def test_offline_devices_keep_their_update_and_the_rollout_waits_for_them(controller):
    controller.store.record_state(
        {"device": "pi-3", "fleet": "f", "online": False, "model": {"name": "digits", "version": 2}}, 1.5
    )
    rollout_id = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(1.0,)))
    assert "pi-3" in controller.devices.desired  # retained: it gets it when it connects
    for device in ("pi-0", "pi-1", "pi-2"):
        _report(controller, rollout_id, device, "succeeded")
    controller.tick()
    status = controller.status(rollout_id)
    assert status["state"] == "running" and "waiting for 1 offline device" in status["reason"]
    _report(controller, rollout_id, "pi-3", "succeeded")
    controller.tick()
    assert controller.status(rollout_id)["state"] == "succeeded"


def test_start_refuses_unknown_fleets_and_unsigned_uploads(controller, tmp_path):
    with pytest.raises(RolloutError, match="no known device of fleet 'nope'"):
        controller.start(controller.stored["sha256"], "nope", RolloutSpec())
    with pytest.raises(RolloutError, match="refused"):
        controller.add_bundle(b"not a zip")
    assert not list((tmp_path / "bundles").glob("*.upload"))


@pytest.fixture
def http(controller):
    from edgekit.fleet.web import serve

    fake = SimpleNamespace(
        rollouts=controller, store=controller.store, alerts=None, config=SimpleNamespace(api_token="s3cret")
    )
    server = serve(fake, f"127.0.0.1:{free_port()}")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_bundles_are_served_with_ranges_and_only_with_the_token(http, controller, bundle):
    data, url = bundle.read_bytes(), f"{http}/bundles/{controller.stored['sha256']}"
    for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer s3cret\u00e9"}):
        with pytest.raises(urllib.error.HTTPError) as caught:
            _get(url, {**wrong, "Range": "bytes=0-"})
        assert caught.value.code == 401 and b"[update] token_file" in caught.value.read()
        caught.value.close()
    auth = {"Authorization": "Bearer s3cret"}
    assert _get(url, auth)[2] == data
    status, headers, body = _get(url, {**auth, "Range": "bytes=100-"})
    assert status == 206 and body == data[100:] and headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert _get(url, {**auth, "Range": "bytes=-10"})[2] == data[-10:]
    with pytest.raises(urllib.error.HTTPError) as caught:
        _get(url, {**auth, "Range": f"bytes={len(data)}-"})
    assert caught.value.code == 416
    caught.value.close()
    with pytest.raises(urllib.error.HTTPError) as caught:
        _get(f"{http}/bundles/{'0' * 64}", auth)
    assert caught.value.code == 404
    caught.value.close()


def test_the_api_wants_its_token_and_answers_errors_in_one_line(http, controller, cli, monkeypatch):
    from edgekit.fleet.client import CollectorClient

    with pytest.raises(RolloutError, match="API token"):
        CollectorClient(http, token="").act("r-x", "pause")
    with pytest.raises(RolloutError, match="no rollout 'r-x'"):
        CollectorClient(http, token="s3cret").act("r-x", "pause")
    monkeypatch.setenv("EDGEKIT_COLLECTOR_TOKEN", "s3cret")
    rollout_id = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(0.25, 1.0)))
    result = cli("rollout", "pause", rollout_id, "--collector", http)
    assert result.exit_code == 0 and "is paused" in result.output
    result = cli("rollout", "abort", rollout_id, "--collector", http, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["state"] == "aborted"
    result = cli("rollout", "resume", rollout_id, "--collector", http)
    assert result.exit_code == 2 and "is aborted" in result.stderr
    status = cli("rollout", "status", "--collector", http)
    assert rollout_id in status.output and "aborted" in status.output
    page = _get(f"{http}/rollouts/{rollout_id}")[2].decode()
    assert "Waves" in page and "pi-0" in page and "aborted" in page


def test_the_drift_rule_counts_moved_devices_whose_latest_window_drifted(controller):
    rollout_id = controller.start(
        controller.stored["sha256"],
        "f",
        RolloutSpec(waves=(0.5, 1.0), wave_wait=60, abort_on=parse_abort_rules("drift>40%")),
    )
    for device in ("pi-0", "pi-1"):
        _report(controller, rollout_id, device, "succeeded")
        controller.store.db.execute("UPDATE devices SET model_version = 3 WHERE device = ?", (device,))
    controller.tick()
    assert controller.status(rollout_id)["state"] == "running"
    controller.store.db.execute("UPDATE devices SET drifted = 1 WHERE device = 'pi-0'")  # one of two: 50%
    controller.tick()
    status = controller.status(rollout_id)
    assert status["state"] == "aborted" and "drift>40% tripped (drift = 50.0%)" in status["reason"]


def _clocked(controller, start=10.0):
    """The controller on a clock the test moves (``now[0]``)."""
    now = [start]
    controller.clock = lambda: now[0]
    return now


def test_a_rollout_that_cannot_advance_stops_no_other_and_ends_failed(controller, caplog):
    """Its spec was written by a newer collector (a field this one does not know): every tick of it raises. The
    other fleet's rollout goes on; the broken one says why at once and is marked failed after FAIL_AFTER_*."""
    from edgekit.fleet.rollouts import FAIL_AFTER_SECONDS, FAIL_AFTER_TICKS

    for index in range(2):
        controller.store.record_state(
            {"device": f"gx-{index}", "fleet": "g", "online": True, "model": {"name": "digits", "version": 2}}, 1.0
        )
    now = _clocked(controller)
    broken = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(0.25, 1.0)))
    healthy = controller.start(controller.stored["sha256"], "g", RolloutSpec(waves=(0.5, 1.0)))
    spec = json.loads(controller.store.rollout(broken)[0]["spec"])
    controller.store.update_rollout(broken, now[0], spec=json.dumps({**spec, "from_a_newer_collector": 1}))
    _report(controller, healthy, "gx-0", "succeeded")
    controller.tick()  # before: TypeError out of tick, and the healthy rollout never moved again
    assert "gx-1" in controller.devices.desired
    _report(controller, healthy, "gx-1", "succeeded")
    controller.tick()
    assert controller.status(healthy)["state"] == "succeeded"
    status = controller.status(broken)
    assert status["state"] == "running" and "cannot advance it (TypeError" in status["reason"]
    assert controller.tick_errors == 2
    assert any("cannot advance" in r.getMessage() for r in caplog.records)
    for _ in range(FAIL_AFTER_TICKS):  # ticks alone do not fail it: a minute must pass too
        controller.tick()
    assert controller.status(broken)["state"] == "running"
    now[0] += FAIL_AFTER_SECONDS
    controller.tick()
    status = controller.status(broken)
    assert status["state"] == "failed" and "could not advance it for 60 s (TypeError" in status["reason"]
    assert status["finished_at"] == now[0]
    controller.tick()
    assert controller.tick_errors == FAIL_AFTER_TICKS + 3  # a failed rollout is no longer ticked
    from edgekit.fleet.metrics import render

    observed = SimpleNamespace(
        store=controller.store, ingestor=SimpleNamespace(counters={}), alerts=None, leader=None, rollouts=controller
    )
    exposition = render(observed).decode()
    assert f"edgekit_collector_rollout_step_errors_total {float(FAIL_AFTER_TICKS + 3)}" in exposition


class Lossy(Devices):
    """The first publish to each device in ``lose`` is lost (a collector killed between mark and publish)."""

    def __init__(self, lose: set[str]) -> None:
        super().__init__()
        self.lose, self.sent = set(lose), []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> bool:
        device = topic.split("/")[3]
        self.sent.append(device)
        if device in self.lose:
            self.lose.discard(device)
            return True
        return super().__call__(topic, payload, retain)


def test_a_device_whose_desired_message_was_lost_is_sent_it_again(controller):
    lossy = Lossy({"pi-1"})
    controller.publish, controller.resend_seconds = lossy, 30.0
    now = _clocked(controller)
    rollout_id = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(1.0,), device_timeout=900))
    assert set(lossy.desired) == {"pi-0", "pi-2", "pi-3"}
    assert controller.status(rollout_id)["devices"][1]["state"] == "sent"  # marked sent, never delivered
    _report(controller, rollout_id, "pi-0", "downloading")  # answered: never sent again
    now[0] += 29
    controller.tick()
    assert "pi-1" not in lossy.desired
    now[0] += 2
    controller.tick()
    assert lossy.desired["pi-1"]["rollout"] == rollout_id and lossy.desired["pi-1"]["version"] == 3
    assert sorted(lossy.sent) == ["pi-0", "pi-1", "pi-1", "pi-2", "pi-2", "pi-3", "pi-3"]
    controller.tick()  # not again before another interval
    assert len(lossy.sent) == 7
    for device in ("pi-0", "pi-1", "pi-2", "pi-3"):
        _report(controller, rollout_id, device, "succeeded")
    now[0] += 60
    controller.tick()
    assert len(lossy.sent) == 7 and controller.status(rollout_id)["state"] == "succeeded"


def test_the_resend_interval_stays_under_the_device_timeout(controller):
    lossy = Lossy({"pi-0"})
    controller.publish = lossy  # resend_seconds left at its default (60 s)
    now = _clocked(controller)
    rollout_id = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(0.25, 1.0), device_timeout=30))
    now[0] += 10  # a third of the device timeout
    controller.tick()
    assert "pi-0" in lossy.desired
    _report(controller, rollout_id, "pi-0", "succeeded")
    controller.tick()
    assert controller.status(rollout_id)["devices"][0]["state"] == "succeeded"


def test_a_failing_rollout_paused_and_resumed_counts_its_failures_anew(controller):
    """The operator pauses a failing rollout to look into it: once resumed, it gets FAIL_AFTER_* again, not
    marked failed at its first failing tick for the failures counted before the pause."""
    from edgekit.fleet.rollouts import FAIL_AFTER_SECONDS, FAIL_AFTER_TICKS

    now = _clocked(controller)
    rollout_id = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(0.25, 1.0)))
    spec = json.loads(controller.store.rollout(rollout_id)[0]["spec"])
    controller.store.update_rollout(rollout_id, now[0], spec=json.dumps({**spec, "from_a_newer_collector": 1}))
    for _ in range(FAIL_AFTER_TICKS - 1):
        controller.tick()
    now[0] += FAIL_AFTER_SECONDS
    controller.pause(rollout_id)
    controller.tick()
    controller.resume(rollout_id)
    controller.tick()
    status = controller.status(rollout_id)
    assert status["state"] == "running" and "1 tick(s)" in status["reason"]


def test_a_rollout_that_advances_again_loses_the_failing_reason(controller):
    rollout_id = controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(0.25, 1.0)))
    good = controller.store.rollout(rollout_id)[0]["spec"]
    controller.store.update_rollout(rollout_id, 1.0, spec=json.dumps({**json.loads(good), "from_a_newer_collector": 1}))
    controller.tick()
    assert controller.status(rollout_id)["reason"].startswith("the controller cannot advance it (TypeError")
    controller.store.update_rollout(rollout_id, 1.0, spec=good)  # the newer collector leads again, say
    _report(controller, rollout_id, "pi-0", "succeeded")
    controller.tick()
    status = controller.status(rollout_id)
    assert status["state"] == "running" and status["reason"] == "" and len(controller.devices.desired) == 4


def test_a_leader_deposed_mid_tick_resends_nothing(controller):
    """Its resend would replace, as the retained message, what the new leader published since (a revert):
    the resend is fenced. Real leases on one database: the first holder's clock stands still (a paused
    process), so it still believes it leads when the tick starts, after the second has taken the lease."""
    import time

    from edgekit.fleet.leader import Leadership

    lossy = Lossy(set())
    controller.publish, controller.resend_seconds = lossy, 30.0
    now = _clocked(controller)
    controller.start(controller.stored["sha256"], "f", RolloutSpec(waves=(1.0,), device_timeout=900))
    sent = len(lossy.sent)
    first = Leadership(controller.store, "c1", lease_seconds=0.2, clock=lambda: 0.0)
    assert first.attempt()
    time.sleep(0.3)
    assert Leadership(controller.store, "c2", lease_seconds=60).attempt()
    controller.leader, now[0] = first, now[0] + 31
    assert first.leading()  # by its own stopped clock
    controller.tick()
    assert len(lossy.sent) == sent
