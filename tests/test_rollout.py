"""OTA rollouts end to end: collector controller, HTTP bundle serving, device updater, real agents."""

from __future__ import annotations

import pytest

from tests.rollout_helpers import RolloutFleet

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def v4(digits, digits_onnx, keypair, tmp_path_factory):
    """A good next version: the float32 model, agreeing with the int8 v3 on almost every row."""
    from edgekit.bundle.package import build_bundle

    path = tmp_path_factory.mktemp("v4") / "digits-4.edgebundle"
    build_bundle(
        str(digits_onnx),
        name="digits",
        version=4,
        baseline_path=str(digits.train),
        key_path=str(keypair[0]),
        output=str(path),
    )
    return path


@pytest.fixture
def fleet(tmp_path, broker, bundle, keypair, digits, fleet_name):
    running = RolloutFleet(
        tmp_path, broker, bundle=bundle, public_key=keypair[1], data=digits.test, fleet=fleet_name, devices=3
    )
    yield running
    running.stop()


def test_rollout_moves_every_device_in_waves_with_shadow(fleet, v4):
    started = fleet.client.start(
        v4,
        fleet=fleet.fleet_name,
        waves="33%,100%",
        shadow_rows=100,
        health_seconds=2,
        abort_on="failed>20%,agreement<0.95",
    )
    status = fleet.finished(started["id"])
    assert status["state"] == "succeeded", status
    assert {d["state"] for d in status["devices"]} == {"succeeded"}
    assert [d["wave"] for d in status["devices"]] == [1, 2, 2]
    assert all(d["shadow"]["rows"] >= 100 and d["shadow"]["agreement"] >= 0.95 for d in status["devices"])
    assert all(d["download"]["bytes"] == v4.stat().st_size for d in status["devices"])
    assert fleet.versions() == {"emu-00": 4, "emu-01": 4, "emu-02": 4}
    fleet.wait(
        lambda: all(d["model_version"] == 4 for d in fleet.collector.store.status()),
        20,
        "the collector to see v4 everywhere",
    )


def test_abort_sends_the_devices_that_moved_back(tmp_path, broker, bundle, keypair, digits, fleet_name, v4, cli):
    """``rollout start --key`` signs the revert on this machine; ``rollout abort`` has the collector send it."""
    fleet = RolloutFleet(
        tmp_path, broker, bundle=bundle, public_key=keypair[1], data=digits.test, fleet=fleet_name, devices=2
    )
    try:
        common = ("--fleet", fleet_name, "--waves", "50%,100%", "--wave-wait", "10m", "--health-seconds", "1")
        unsigned = cli("rollout", "start", str(v4), *common, "--collector", fleet.client.url)
        assert unsigned.exit_code == 2 and "needs --key" in unsigned.stderr and "--no-revert" in unsigned.stderr
        started = cli("rollout", "start", str(v4), *common, "--key", str(keypair[0]), "--collector", fleet.client.url)
        assert started.exit_code == 0, started.output
        rollout_id = started.stdout.split()[1]
        assert fleet.client.status(rollout_id)["signed_revert"] is True
        fleet.wait(lambda: fleet.client.status(rollout_id)["devices"][0]["state"] == "succeeded", 30, "wave 1")
        assert fleet.versions() == {"emu-00": 4, "emu-01": 3}  # soaking: wave 2 waits 10 minutes
        result = cli("rollout", "abort", rollout_id, "--collector", fleet.client.url)
        assert result.exit_code == 0 and "is aborted" in result.output
        status = fleet.wait(
            lambda: (lambda s: s if s["devices"][0]["state"] == "rolled_back" else None)(
                fleet.client.status(rollout_id)
            ),
            30,
            "the revert",
        )
        assert status["devices"][0]["code"] == "aborted" and status["devices"][1]["state"] == "aborted"
        assert fleet.versions() == {"emu-00": 3, "emu-01": 3}
    finally:
        fleet.stop()
