"""Signed reverts and the bundle endpoint's token (issue 17).

A revert undoes an aborted rollout on the devices it moved; devices take one only with the fleet key's
signed instruction for that rollout, never twice. Bundle downloads need the collector's API token when
it has one. The end-to-end tests run real agent processes, Mosquitto, the collector and its HTTP API;
the first ones check the pieces on their own."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from device_agent.config import UpdateConfig, parse_config
from device_agent.errors import ConfigError, UpdateError
from device_agent.instructions import ACTIVE_BY, applied_revert, check_revert, moved_by
from device_agent.protocol import (
    DESIRED_SCHEMA,
    LEGACY_DESIRED_SCHEMA,
    READABLE_DESIRED_SCHEMAS,
    check_desired,
    decode,
    desired_payload,
    encode,
)
from edgekit.local.broker import free_port
from tests.rollout_helpers import DeviceTopics, RolloutFleet


@pytest.fixture(scope="module")
def signer(keypair):
    from edgekit.bundle.keys import load_private_key

    return load_private_key(keypair[0])


def _revert_doc(revert: dict, **changes) -> dict:
    instruction = revert["instruction"]
    doc = desired_payload(
        rollout=instruction["rollout"],
        action="revert",
        name=instruction["name"],
        version=instruction["version"],
        from_version=3,
        instruction=instruction,
        instruction_signature=revert["signature"],
    )
    return {**doc, **changes}


def test_a_revert_is_desired_2_and_install_stays_desired_1_so_older_agents_still_update():
    revert = desired_payload(rollout="r-1", action="revert", name="m", version=4, from_version=3)
    install = desired_payload(
        rollout="r-1", action="install", name="m", version=4, url="http://c/b", sha256="0" * 64, size=1
    )
    assert revert["schema"] == DESIRED_SCHEMA == "edgekit.desired/2"
    assert install["schema"] == LEGACY_DESIRED_SCHEMA == "edgekit.desired/1"
    for doc in (revert, install, {**install, "schema": DESIRED_SCHEMA}):  # an agent reads both versions
        assert check_desired(decode(encode(doc), READABLE_DESIRED_SCHEMAS)) == doc


def test_a_device_takes_only_a_revert_signed_for_this_rollout_and_only_once(
    bundle, v4_bundle, signer, keypair, tmp_path
):
    from device_agent.canonical import sha256_hex
    from device_agent.signing import load_public_key
    from edgekit.bundle.keys import generate_keypair, load_private_key
    from edgekit.fleet.signed import _sign, sign_revert

    key = load_public_key(keypair[1])
    revert = sign_revert(v4_bundle, fleet="f", key=signer, rollout_id="r-one")
    check = dict(public_key=key, fleet="f", ledger={})
    assert check_revert(_revert_doc(revert), **check) == revert["instruction"]
    stranger = load_private_key(generate_keypair(tmp_path / "stranger")[0])
    strange = _sign(revert["instruction"], stranger)
    refusals = {
        "older than this agent": _revert_doc(revert, schema=LEGACY_DESIRED_SCHEMA),
        "no signed instruction": {k: v for k, v in _revert_doc(revert).items() if k != "instruction"},
        "not signed by the trusted key": _revert_doc(revert, instruction_signature=strange),
        "for another rollout": _revert_doc(revert, rollout="r-two"),
        "for another version": _revert_doc(revert, version=5),
    }
    for reason, doc in refusals.items():
        with pytest.raises(UpdateError, match=reason) as caught:
            check_revert(doc, **check)
        assert caught.value.code == "signature"
    with pytest.raises(UpdateError, match="for another fleet"):
        check_revert(_revert_doc(revert), **{**check, "fleet": "g"})
    used = applied_revert({}, "r-one")
    assert used == {ACTIVE_BY: None, "reverts_applied": ["r-one"]}
    with pytest.raises(UpdateError, match="applied once already") as caught:
        check_revert(_revert_doc(revert), **{**check, "ledger": used})
    assert caught.value.code == "replay"
    # Moved in this very rollout: the active slot holds its bundle, put there by its swap.
    active = {"name": "digits", "version": 4, "bundle_sha256": sha256_hex(v4_bundle.read_bytes())}
    slots, ledger = (active, {"version": 3}), {ACTIVE_BY: "r-one"}
    assert moved_by(_revert_doc(revert), revert["instruction"], slots=slots, ledger=ledger)
    assert not moved_by(_revert_doc(revert), revert["instruction"], slots=slots, ledger={ACTIVE_BY: "r-later"})
    assert not moved_by(_revert_doc(revert), revert["instruction"], slots=(active, {"version": 2}), ledger=ledger)
    assert not moved_by(_revert_doc(revert), revert["instruction"], slots=(None, {"version": 3}), ledger=ledger)


def test_the_collector_token_goes_only_to_the_collector(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEKIT_COLLECTOR_TOKEN", raising=False)
    (tmp_path / "collector.token").write_text("s3cret\n")
    base = {"device_id": "d", "state_dir": "state", "trust": {"public_key": "k.pub"}}
    pinned = parse_config(
        {**base, "update": {"token_file": "collector.token", "collector": "http://c:8480"}}, base=tmp_path
    )
    assert pinned.update.token == "s3cret" and "s3cret" not in repr(pinned)
    assert pinned.update.token_for("http://c:8480/bundles/ab", None) == "s3cret"
    for elsewhere in ("http://evil:8480/bundles/ab", "https://c:8480/bundles/ab", "http://c:9999/bundles/ab"):
        assert pinned.update.token_for(elsewhere, "c") is None
    broker_host = UpdateConfig(token="t")  # no [update] collector: the broker's host only
    assert broker_host.token_for("http://10.0.0.5:8480/bundles/ab", "10.0.0.5") == "t"
    assert broker_host.token_for("http://10.0.0.6:8480/bundles/ab", "10.0.0.5") is None
    assert broker_host.token_for("http://10.0.0.5:8480/bundles/ab", None) is None
    assert "[update] collector" in broker_host.refusal_fix("http://10.0.0.6:8480/bundles/ab", sent=False)
    assert "[update] token_file" in UpdateConfig().refusal_fix("http://c/b", sent=False)
    assert "refused [update] token" in broker_host.refusal_fix("http://c/b", sent=True)
    monkeypatch.setenv("EDGEKIT_COLLECTOR_TOKEN", "from-env")
    assert parse_config(base, base=tmp_path).update.token == "from-env"
    for bad, says in ({"tokn": "x"}, "no setting 'tokn'"), ({"collector": "c:8480"}, "not an http"):
        with pytest.raises(ConfigError, match=says):
            parse_config({**base, "update": bad}, base=tmp_path)


def test_flash_writes_the_collector_token_beside_agent_toml(tmp_path, monkeypatch):
    from device_agent.config import load_config
    from edgekit.local.flash import Flasher, FlashPlan

    monkeypatch.delenv("EDGEKIT_COLLECTOR_TOKEN", raising=False)
    plan = FlashPlan(
        bundle=Path("b"), device_id="d", fleet="f", broker="mqtt://10.0.0.5:1883", pubkey=Path("k"), target="dir:/x"
    )
    said: list[str] = []
    root = tmp_path / "device"
    cases = (("s3cret", None, "s3cret"), (None, None, None), (None, "http://c:8480", "from-env"))
    for index, (token, url, staged) in enumerate(cases):
        if token is None and url:
            monkeypatch.setenv("EDGEKIT_COLLECTOR_TOKEN", "from-env")
        staging = tmp_path / f"staging-{index}"
        staging.mkdir()
        flasher = Flasher(replace(plan, collector_token=token, collector_url=url), dry_run=True, say=said.append)
        files = flasher._stage(staging, str(root))
        text = (staging / "agent.toml").read_text()
        if staged is None:
            assert "etc/collector.token" not in files and "[update]" not in text
            continue
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "collector.token").write_text(files["etc/collector.token"].read_text())
        (root / "etc" / "agent.toml").write_text(text)
        config = load_config(root / "etc" / "agent.toml")
        assert config.update.token == staged and config.update.collector == url
        assert config.update.token_for("http://10.0.0.5:8480/bundles/x", config.mqtt.host) == (None if url else staged)
    assert 'chmod 600 "$ROOT/etc/collector.token"' in flasher._install_script(str(root), ssh=False)


def test_a_refused_download_fails_at_once_and_the_token_never_follows_a_redirect(tmp_path):
    from device_agent.download import download

    seen: list[tuple[int, str | None]] = []

    def server(answer):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                seen.append((self.server.server_address[1], self.headers.get("Authorization")))
                answer(self)

        made = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=made.serve_forever, daemon=True).start()
        return made

    def refuse(handler):
        handler.send_response(401)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    elsewhere = server(refuse)
    redirector = server(
        lambda h: (
            h.send_response(302),
            h.send_header("Location", f"http://127.0.0.1:{elsewhere.server_address[1]}/b"),
            h.send_header("Content-Length", "0"),
            h.end_headers(),
        )
    )
    try:
        url = f"http://127.0.0.1:{redirector.server_address[1]}/bundles/x"
        with pytest.raises(UpdateError, match="HTTP 401") as caught:
            download(url, tmp_path / "b.edgebundle", sha256="0" * 64, size=10, token="s3cret", backoff=0)
        assert caught.value.code == "auth"
        assert seen == [(redirector.server_address[1], "Bearer s3cret"), (elsewhere.server_address[1], None)]
    finally:
        for made in (elsewhere, redirector):
            made.shutdown()
            made.server_close()


@pytest.mark.network
def test_forged_and_replayed_reverts_are_refused_and_an_abort_still_reverts(
    tmp_path, broker, bundle, v4_bundle, keypair, signer, digits, fleet_name, cli
):
    from edgekit.bundle.keys import generate_keypair, load_private_key
    from edgekit.fleet.signed import _sign, sign_revert

    fleet = RolloutFleet(
        tmp_path, broker, bundle=bundle, public_key=keypair[1], data=digits.test, fleet=fleet_name, devices=2
    )
    device = DeviceTopics(broker, fleet_name, "emu-00")
    try:
        revert = sign_revert(v4_bundle, fleet=fleet_name, key=signer)
        first = fleet.client.start(
            v4_bundle, fleet=fleet_name, waves="50%,100%", wave_wait="10m", health_seconds=1, revert=revert
        )["id"]
        assert first == revert["instruction"]["rollout"]
        fleet.wait(lambda: _device(fleet, first)["state"] == "succeeded", 60, "wave 1")
        # Straight to the device's topic, past the collector: each is refused, reported, and changes nothing.
        stranger = load_private_key(generate_keypair(tmp_path / "stranger")[0])
        forgeries = {
            "older than this agent": {**_revert_doc(revert), "schema": LEGACY_DESIRED_SCHEMA},
            "no signed instruction": desired_payload(
                rollout=first, action="revert", name="digits", version=4, from_version=3
            ),
            "not signed by the trusted key": _revert_doc(
                revert, instruction_signature=_sign(revert["instruction"], stranger)
            ),
            "for another rollout": _revert_doc(revert, rollout="r-forged"),
        }
        for reason, doc in forgeries.items():
            since = len(device.reports)
            device.publish(doc)
            refused = device.answer(fleet, doc["rollout"], ("failed",), since)
            assert refused["code"] == "signature" and reason in refused["reason"], refused
            assert "staying on v4" in refused["reason"] and refused["action"] == "revert"
        assert fleet.versions() == {"emu-00": 4, "emu-01": 3}
        status = fleet.client.status(first)
        assert status["state"] == "running" and _device(fleet, first)["state"] == "succeeded"  # nothing recorded
        # The operator aborts: the collector sends the revert signed at the start.
        result = cli("rollout", "abort", first, "--collector", fleet.client.url)
        assert result.exit_code == 0 and "is aborted" in result.output
        fleet.wait(lambda: _device(fleet, first)["state"] == "rolled_back", 60, "the revert")
        assert fleet.versions() == {"emu-00": 3, "emu-01": 3}
        # The device moves on in a later rollout of the same version; the first revert, replayed, is refused.
        again = fleet.start(v4_bundle, key=keypair[0], devices="emu-00", waves="100%", health_seconds=1)["id"]
        assert fleet.finished(again)["state"] == "succeeded" and fleet.versions()["emu-00"] == 4
        since = len(device.reports)
        device.publish(_revert_doc(revert))
        replayed = device.answer(fleet, first, ("failed",), since)
        assert replayed["code"] == "replay" and "applied once already" in replayed["reason"]
        assert fleet.versions() == {"emu-00": 4, "emu-01": 3}
        assert _device(fleet, first)["state"] == "rolled_back"  # the aborted rollout's record stands
    finally:
        device.close()
        fleet.stop()


@pytest.mark.network
def test_bundle_downloads_want_the_token_and_a_device_with_it_installs(
    tmp_path, broker, bundle, v4_bundle, keypair, digits, fleet_name
):
    import urllib.error
    import urllib.request

    fleet = RolloutFleet(
        tmp_path,
        broker,
        bundle=bundle,
        public_key=keypair[1],
        data=digits.test,
        fleet=fleet_name,
        devices=2,
        token="s3cret",
        tokenless=("emu-01",),
    )
    try:
        assert (fleet.configs[0].parent / "collector.token").stat().st_mode & 0o077 == 0
        started = fleet.start(v4_bundle, key=keypair[0], waves="100%", abort_on="", health_seconds=1)
        url = f"{fleet.client.url}/bundles/{started['bundle']['sha256']}"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=10)
        assert caught.value.code == 401 and "[update] token_file" in json.loads(caught.value.read())["error"]
        caught.value.close()
        status = fleet.finished(started["id"])
        with_token, without = status["devices"]
        assert with_token["state"] == "succeeded", status
        assert without["state"] == "failed" and without["code"] == "auth", without
        assert "HTTP 401" in without["reason"] and "set [update] token_file" in without["reason"]
        assert fleet.versions() == {"emu-00": 4, "emu-01": 3}
    finally:
        fleet.stop()


def _device(fleet, rollout_id, device="emu-00"):
    return next(d for d in fleet.client.status(rollout_id)["devices"] if d["device"] == device)
