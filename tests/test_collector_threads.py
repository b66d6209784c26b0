"""The collector's threads against each other: the rollout controller's tick (its own thread in a running
collector) and an operator's pause over HTTP (a waitress worker thread), on a real SQLite store and a real
HTTP server. The interleaving is forced from the controller's ``publish`` seam, so the test fails every time
the race is there, not now and then."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest

from edgekit.fleet.rollout_spec import RolloutSpec
from edgekit.fleet.rollouts import RolloutController
from edgekit.fleet.store import SqliteStore
from edgekit.local.broker import free_port

DEVICES = 6
TOKEN = "s3cret"


class PausingPublisher:
    """The controller's ``publish``: records each desired message with the time it went out and, on the first
    one of the armed tick, has an operator pause the rollout over HTTP and waits (a little) for the answer."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, float]] = []  # (device, time.monotonic() when published)
        self.pause_url: str | None = None  # armed: the next publish pauses
        self.paused_at: float | None = None  # when the pause was answered 200
        self.answer: dict | None = None

    def __call__(self, topic: str, payload: bytes, retain: bool) -> bool:
        json.loads(payload)
        if self.pause_url is not None:
            url, self.pause_url = self.pause_url, None
            pauser = threading.Thread(target=self._pause, args=(url,), daemon=True)
            pauser.start()
            pauser.join(1.0)  # answered at once when nothing holds the pause back
        self.sent.append((topic.split("/")[3], time.monotonic()))
        return True

    def _pause(self, url: str) -> None:
        request = urllib.request.Request(url, data=b"", method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            self.answer = json.loads(response.read())
        self.paused_at = time.monotonic()


@pytest.fixture
def fleet(tmp_path, bundle, keypair):
    from device_agent.signing import load_public_key
    from edgekit.fleet.web import serve

    store = SqliteStore(tmp_path / "fleet.db")
    for index in range(DEVICES):
        store.record_state(
            {"device": f"pi-{index}", "fleet": "f", "online": True, "model": {"name": "digits", "version": 2}}, 1.0
        )
    publisher = PausingPublisher()
    controller = RolloutController(
        store, publisher, tmp_path / "bundles", lambda: "http://collector.test", trusted_key=load_public_key(keypair[1])
    )
    sha256 = controller.add_bundle(bundle.read_bytes())["sha256"]
    collector = SimpleNamespace(rollouts=controller, store=store, alerts=None, config=SimpleNamespace(api_token=TOKEN))
    server = serve(collector, f"127.0.0.1:{free_port()}")
    yield SimpleNamespace(
        controller=controller,
        publisher=publisher,
        sha256=sha256,
        url=f"http://127.0.0.1:{server.server_address[1]}",
    )
    server.shutdown()
    server.server_close()
    store.close()


def test_a_pause_answered_mid_tick_lets_no_desired_message_out_after_it(fleet):
    """The operator pauses while the controller's tick is sending the next wave: once the pause is answered
    "paused", no device may be sent the update. Before the fix the pause went straight to the store while the
    tick, holding devices loaded as "running", went on sending the rest of the wave (and would open the next)."""
    controller, publisher = fleet.controller, fleet.publisher
    rollout_id = controller.start(fleet.sha256, "f", RolloutSpec(waves=(1 / DEVICES, 1.0)))
    assert [device for device, _ in publisher.sent] == ["pi-0"]
    controller.record_report(
        {"rollout": rollout_id, "device": "pi-0", "state": "succeeded", "reason": "", "active": {"version": 3}}, 2.0
    )
    publisher.pause_url = f"{fleet.url}/api/rollouts/{rollout_id}/pause"
    ticking = threading.Thread(target=controller.tick, name="edgekit-collector-rollouts")
    ticking.start()
    ticking.join(60)
    deadline = time.monotonic() + 30
    while publisher.paused_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert publisher.answer is not None and publisher.answer["state"] == "paused"
    late = [device for device, at in publisher.sent if at > publisher.paused_at]
    assert late == [], f"sent after the pause was answered: {late}"
    controller.tick()  # paused: the next tick sends nothing either
    assert all(at <= publisher.paused_at for _, at in publisher.sent)
    assert controller.status(rollout_id)["state"] == "paused"


class ReportingClock:
    """The controller's ``clock``: ``now``, and when armed, the first reading of the armed tick (the one
    ``_advance`` takes right after loading the rollout's devices) first has a device's report come in on
    another thread, as the collector's writer thread stores reports, waiting a little for it."""

    def __init__(self, controller: RolloutController, now: float) -> None:
        self.controller, self.now = controller, now
        self.report: dict | None = None  # armed: sent at the next reading
        self.writer: threading.Thread | None = None

    def __call__(self) -> float:
        if self.report is not None:
            report, self.report = self.report, None
            writer = self.writer = threading.Thread(
                target=self.controller.record_report, args=(report, self.now), daemon=True
            )
            writer.start()
            writer.join(1.0)  # stored at once when nothing holds it back
        return self.now


def test_a_report_stored_during_a_tick_is_not_overwritten_by_the_ticks_timeout(fleet):
    """A device reports "succeeded" just as its ``device_timeout`` runs out. The tick had loaded it as "sent"
    and marked it failed for the timeout after the report was stored, so the device that updated stayed failed
    (and counted towards a ``failed>N%`` abort rule) though it never reports again. Either order is fine as
    long as they do not interleave: the timeout, then the report; or the report, then no timeout."""
    controller = fleet.controller
    clock = ReportingClock(controller, now=100.0)
    controller.clock = clock
    rollout_id = controller.start(fleet.sha256, "f", RolloutSpec(devices="pi-0", device_timeout=60.0))
    assert [device for device, _ in fleet.publisher.sent] == ["pi-0"]
    clock.now = 161.0  # past the timeout: the next tick marks pi-0 failed unless it has answered
    clock.report = {
        "rollout": rollout_id,
        "device": "pi-0",
        "state": "succeeded",
        "reason": "running digits v3",
        "active": {"name": "digits", "version": 3},
    }
    ticking = threading.Thread(target=controller.tick, name="edgekit-collector-rollouts")
    ticking.start()
    ticking.join(60)
    assert clock.writer is not None
    clock.writer.join(60)  # a report held back lands after the tick
    device = next(d for d in controller.status(rollout_id)["devices"] if d["device"] == "pi-0")
    assert device["state"] == "succeeded", device
