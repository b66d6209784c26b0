"""OTA faults end to end, on emulated devices (real agent processes) and a real broker and collector.
Each ends with every device serving a working model."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

from tests.rollout_helpers import BundleProxy, RolloutFleet, nan_beyond_range, tamper_selftest

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def candidates(digits, digits_onnx, keypair, tmp_path_factory):
    """Signed v4 bundles: good, failing its self-test, disagreeing, NaN on saturated pixels; and one signed by a
    stranger."""
    import joblib
    from sklearn.tree import DecisionTreeClassifier

    from edgekit.build.convert import convert_model
    from edgekit.bundle.keys import generate_keypair
    from edgekit.bundle.package import build_bundle

    root = tmp_path_factory.mktemp("candidates")

    def package(model, name, key=keypair[0], version=4):
        path = root / f"{name}.edgebundle"
        build_bundle(
            str(model),
            name="digits",
            version=version,
            baseline_path=str(digits.train),
            key_path=str(key),
            output=str(path),
        )
        return path

    data = np.load(digits.train)
    stump = DecisionTreeClassifier(max_depth=2, random_state=0).fit(data["X"], data["y"])
    joblib.dump(stump, root / "stump.joblib")
    convert_model(str(root / "stump.joblib"), str(root / "stump.onnx"))
    stranger = generate_keypair(root / "stranger")[0]
    good = package(digits_onnx, "good")
    return {
        "good": good,
        "selftest": tamper_selftest(good, root / "selftest.edgebundle", keypair[0]),
        "disagrees": package(root / "stump.onnx", "disagrees"),
        "nan": package(nan_beyond_range(digits_onnx, root / "nan.onnx"), "nan"),
        "stranger": package(digits_onnx, "stranger", key=stranger),
        "stranger_pub": stranger.with_suffix(".pub"),
    }


def _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, **options):
    return RolloutFleet(
        tmp_path, broker, bundle=bundle, public_key=keypair[1], data=digits.test, fleet=fleet_name, **options
    )


def _device_state(fleet, rollout_id, device="emu-00"):
    return next(d for d in fleet.client.status(rollout_id)["devices"] if d["device"] == device)


def test_a_cut_download_resumes_where_it_stopped(tmp_path, broker, bundle, keypair, digits, fleet_name, candidates):
    proxy = BundleProxy("cut")
    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=1, proxy=proxy)
    try:
        status = fleet.finished(
            fleet.client.start(candidates["good"], fleet=fleet_name, waves="100%", health_seconds=1)["id"]
        )
        assert status["state"] == "succeeded", status
        size = candidates["good"].stat().st_size
        assert (
            proxy.seen[0] is None and proxy.seen[1] == f"bytes={size // 2}-"
        )  # the second request asks only for the rest
        assert status["devices"][0]["download"]["bytes"] == size  # half + half: nothing fetched twice
        assert fleet.versions() == {"emu-00": 4}
    finally:
        fleet.stop()
        proxy.stop()


def test_a_corrupted_download_fails_on_its_hash_and_the_device_stays(
    tmp_path, broker, bundle, keypair, digits, fleet_name, candidates
):
    proxy = BundleProxy("corrupt")
    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=2, proxy=proxy)
    try:
        status = fleet.finished(
            fleet.client.start(candidates["good"], fleet=fleet_name, waves="50%,100%", health_seconds=1)["id"]
        )
        assert status["state"] == "aborted" and "failed>20%" in status["reason"]
        first, second = status["devices"]
        assert first["state"] == "failed" and first["code"] == "hash" and "sha256" in first["reason"]
        assert second["state"] == "aborted"  # its wave never started
        assert fleet.versions() == {"emu-00": 3, "emu-01": 3}
    finally:
        fleet.stop()
        proxy.stop()


def test_the_collector_refuses_a_bundle_its_key_did_not_sign(
    tmp_path, broker, bundle, keypair, digits, fleet_name, candidates
):
    from edgekit.errors import RolloutError

    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=1)
    try:
        with pytest.raises(RolloutError, match="signed by key"):
            fleet.client.start(candidates["stranger"], fleet=fleet_name)
        assert fleet.client.status() == []
    finally:
        fleet.stop()


def test_devices_refuse_a_bundle_signed_by_another_key_even_from_their_collector(
    tmp_path, broker, bundle, keypair, digits, fleet_name, candidates
):
    """A compromised collector (trusting the wrong key) still cannot install on devices."""
    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=1, trust=candidates["stranger_pub"])
    try:
        status = fleet.finished(fleet.client.start(candidates["stranger"], fleet=fleet_name, waves="100%")["id"])
        device = status["devices"][0]
        assert status["state"] == "aborted" and device["code"] == "signature" and "trusted key" in device["reason"]
        assert fleet.versions() == {"emu-00": 3}
    finally:
        fleet.stop()


def test_an_older_version_is_refused_unless_a_signed_rollback_says_so(
    tmp_path, broker, bundle, keypair, digits, fleet_name, candidates, cli
):
    from paho.mqtt import client as mqtt

    from device_agent.protocol import DESIRED_SCHEMA

    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=1)
    try:
        status = fleet.finished(
            fleet.client.start(candidates["good"], fleet=fleet_name, waves="100%", health_seconds=1)["id"]
        )
        assert status["state"] == "succeeded"
        fleet.wait(lambda: fleet.collector.store.status()[0]["model_version"] == 4, 20, "the collector to see v4")
        v3 = fleet.client.upload_bundle(bundle)
        # The controller refuses to send a device down ...
        from edgekit.errors import RolloutError

        with pytest.raises(RolloutError, match="newer"):
            fleet.client.start(bundle, fleet=fleet_name)
        # ... and a device refuses a replayed or forged desired state that goes down without a signed instruction.
        desired = {
            "schema": DESIRED_SCHEMA,
            "rollout": "r-forged",
            "action": "install",
            "name": "digits",
            "version": 3,
            "url": f"{fleet.client.url}/bundles/{v3['sha256']}",
            "sha256": v3["sha256"],
            "size": v3["size"],
        }
        reports = []
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        client.on_message = lambda c, u, m: reports.append(json.loads(m.payload))
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect("127.0.0.1", broker.port)
        client.subscribe(f"edgekit/v1/{fleet_name}/emu-00/reported", 1)
        client.loop_start()
        assert subscribed.wait(10), "the test client could not subscribe"
        client.publish(f"edgekit/v1/{fleet_name}/emu-00/desired", json.dumps(desired), qos=1, retain=True)
        fleet.wait(
            lambda: any(r["rollout"] == "r-forged" and r["state"] == "failed" for r in reports),
            60,
            "the device to refuse",
        )
        refused = next(r for r in reports if r["rollout"] == "r-forged" and r["state"] == "failed")
        assert refused["code"] == "downgrade" and "not newer" in refused["reason"]
        assert fleet.versions() == {"emu-00": 4}
        # The fleet key's signed rollback goes down.
        result = cli(
            "rollout",
            "rollback",
            "--fleet",
            fleet_name,
            "--to",
            "3",
            "--key",
            keypair[0],
            "--collector",
            fleet.client.url,
            "--wait",
            "--json",
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["state"] == "succeeded"
        assert fleet.versions() == {"emu-00": 3}
        client.loop_stop()
        client.disconnect()
    finally:
        fleet.stop()


def test_a_candidate_failing_its_self_test_never_serves(
    tmp_path, broker, bundle, keypair, digits, fleet_name, candidates
):
    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=1)
    try:
        status = fleet.finished(fleet.client.start(candidates["selftest"], fleet=fleet_name, waves="100%")["id"])
        device = status["devices"][0]
        assert device["state"] == "failed" and device["code"] == "selftest" and "test vectors" in device["reason"]
        assert fleet.versions() == {"emu-00": 3}
    finally:
        fleet.stop()


def test_low_shadow_agreement_halts_the_rollout(tmp_path, broker, bundle, keypair, digits, fleet_name, candidates):
    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=3)
    try:
        status = fleet.finished(
            fleet.client.start(
                candidates["disagrees"], fleet=fleet_name, waves="33%,100%", shadow_rows=150, abort_on="agreement<0.95"
            )["id"]
        )
        assert status["state"] == "aborted" and "agreement<0.95" in status["reason"]
        first = status["devices"][0]
        assert first["state"] == "failed" and first["code"] == "shadow" and first["shadow"]["agreement"] < 0.7
        assert [d["state"] for d in status["devices"][1:]] == ["aborted", "aborted"]
        assert fleet.versions() == {"emu-00": 3, "emu-01": 3, "emu-02": 3}
    finally:
        fleet.stop()


def test_a_model_that_fails_after_the_swap_is_rolled_back(
    tmp_path, broker, bundle, keypair, digits, fleet_name, candidates
):
    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=1)
    try:
        rollout_id = fleet.client.start(candidates["nan"], fleet=fleet_name, waves="100%", health_seconds=30)["id"]
        fleet.wait(lambda: _device_state(fleet, rollout_id)["state"] == "watching", 30, "the swap")
        assert fleet.versions() == {"emu-00": 4}
        http = json.loads((fleet.configs[0].parent / "state" / "http.json").read_text())
        saturated = np.full((1, 64), 20.0).tolist()
        request = urllib.request.Request(
            f"http://127.0.0.1:{http['port']}/v1/models/digits:predict",
            data=json.dumps({"instances": saturated}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=10)
        status = fleet.finished(rollout_id, timeout=30)
        device = status["devices"][0]
        assert device["state"] == "rolled_back" and device["code"] == "health" and "NaN" in device["reason"]
        assert fleet.versions() == {"emu-00": 3}
    finally:
        fleet.stop()


@pytest.mark.parametrize("step", ["shadow", "watching"])
def test_sigkill_during_an_update_comes_back_on_a_working_model(
    tmp_path, broker, bundle, keypair, digits, fleet_name, candidates, step
):
    fleet = _fleet(tmp_path, broker, bundle, keypair, digits, fleet_name, devices=1)
    try:
        rollout_id = fleet.client.start(
            candidates["good"], fleet=fleet_name, waves="100%", shadow_rows=300, health_seconds=4
        )["id"]
        fleet.wait(lambda: _device_state(fleet, rollout_id)["state"] == step, 30, f"step {step}")
        fleet.devices.processes[0].kill()
        fleet.devices.processes[0].wait(10)
        fleet.devices.processes.clear()
        fleet.devices.start()
        assert set(fleet.wait(lambda: _try_versions(fleet), 30, "the device to serve again").values()) <= {3, 4}
        status = fleet.finished(rollout_id)
        assert status["state"] == "succeeded", status
        assert fleet.versions() == {"emu-00": 4}
    finally:
        fleet.stop()


def _try_versions(fleet):
    try:
        return fleet.versions()
    except (OSError, ValueError):
        return None
