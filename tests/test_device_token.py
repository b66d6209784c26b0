"""The device token: what a device holds opens bundle downloads and field-sample uploads, and nothing else.

A collector started with ``--device-token-file`` takes that token (and its API token) on ``GET
/bundles/<sha256>`` and ``POST /api/samples/<device>/<id>``; on every other authenticated route it is a
401. ``edgekit flash`` and ``edgekit emulate`` write the device token, not the operators' token, into a
device's token file. The route tests run the real collector over HTTP with Mosquitto; the device side
downloads and uploads with the agent's own code and the token its agent.toml gives it."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent.capture_upload import send_file, write_upload
from device_agent.config import load_config
from device_agent.download import download
from device_agent.errors import UpdateError
from edgekit.errors import EdgekitError
from edgekit.fleet.config import CollectorConfig
from tests.test_field_samples import _sha, file_of, running_collector

OPERATOR, DEVICE = "operator-token", "device-token"


@pytest.fixture
def collector(tmp_path, broker, fleet_name, keypair):
    settings = {"trust": str(keypair[1]), "api_token": OPERATOR, "device_token": DEVICE}
    with running_collector(tmp_path, broker, fleet_name, **settings) as service:
        yield service


@pytest.mark.network
def test_the_device_token_opens_downloads_and_uploads_and_nothing_else(tmp_path, collector, bundle):
    status, doc = _call(collector.url + "/api/bundles", OPERATOR, bundle.read_bytes())
    assert status == 201, doc
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    for token in (DEVICE, OPERATOR):  # the operators' token stays good for devices flashed before
        assert _call(f"{collector.url}/bundles/{sha}", token) == (200, bundle.read_bytes())
    for token in (None, "wrong", DEVICE + "x"):
        assert _call(f"{collector.url}/bundles/{sha}", token)[0] == 401
    store = collector.store
    for upload, token in (("u-dev", DEVICE), ("u-op", OPERATOR), ("u-none", None)):
        store.issue_upload(upload, "dev1", {}, 1.0)
        write_upload(tmp_path / f"{upload}.gz", _header(upload), [])
        data = (tmp_path / f"{upload}.gz").read_bytes()
        headers = {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}", "X-Edgekit-Sha256": _sha(data)}
        status, _ = _call(f"{collector.url}/api/samples/dev1/{upload}", token, data, headers)
        assert status == (401 if token is None else 200), upload
    assert store.sample_upload("u-dev")["state"] == "complete" and store.sample_upload("u-none")["state"] == "requested"
    # Every other authenticated route: the device token is a 401, the operators' token is not.
    operator_only = [
        ("/api/bundles", bundle.read_bytes()),
        ("/api/rollouts", json.dumps({"sha256": sha, "fleet": "f", "devices": "*"}).encode()),
        ("/api/rollbacks", b"{}"),
        ("/api/rollouts/r-1/pause", b""),
        ("/api/rollouts/r-1/abort", b""),
        ("/api/samples/requests", json.dumps({"device": "dev1"}).encode()),
        ("/api/samples", None),
        ("/api/samples/dev1", None),
        ("/api/samples/requests/u-dev", None),
        ("/samples", None),
    ]
    for path, body in operator_only:
        status, answer = _call(collector.url + path, DEVICE, body)
        assert status == 401, (path, status)
        assert "a device token is not it" in answer.decode(), path
        assert _call(collector.url + path, OPERATOR, body)[0] != 401, path


@pytest.mark.network
def test_an_emulated_device_downloads_and_uploads_with_the_device_token_its_config_holds(
    tmp_path, collector, bundle, keypair, digits, monkeypatch
):
    from edgekit.local.emulate import device_environment, prepare_devices

    monkeypatch.setenv("EDGEKIT_COLLECTOR_TOKEN", OPERATOR)  # the operator's shell has it; the device must not
    monkeypatch.delenv("EDGEKIT_DEVICE_TOKEN", raising=False)
    (config_path,) = prepare_devices(
        devices=1,
        bundle=str(bundle),
        pubkey=str(keypair[1]),
        broker=None,
        data=str(digits.test),
        fleet="f",
        window_rows=100,
        window_seconds=5,
        rows_per_second=10,
        drift=None,
        state_dir=str(tmp_path / "devices"),
        http_port_base=None,
        collector_url=collector.url,
        device_token=DEVICE,
    )
    assert (config_path.parent / "collector.token").read_text().strip() == DEVICE
    # the agent takes EDGEKIT_COLLECTOR_TOKEN over its token file: emulated devices are started without it
    assert {"EDGEKIT_COLLECTOR_TOKEN", "EDGEKIT_DEVICE_TOKEN"}.isdisjoint(device_environment())
    monkeypatch.delenv("EDGEKIT_COLLECTOR_TOKEN")
    update = load_config(config_path).update
    assert update.token == DEVICE
    assert _call(collector.url + "/api/bundles", OPERATOR, bundle.read_bytes())[0] == 201
    sha, size = hashlib.sha256(bundle.read_bytes()).hexdigest(), bundle.stat().st_size
    url = f"{collector.url}/bundles/{sha}"
    got = download(url, tmp_path / "got.edgebundle", sha256=sha, size=size, token=update.token_for(url, None))
    assert got.path.read_bytes() == bundle.read_bytes()
    collector.store.issue_upload("u-1", "emu-00", {}, 1.0)
    file = write_upload(tmp_path / "u.gz", {**_header("u-1"), "device": "emu-00"}, [])
    upload_url = f"{collector.url}/api/samples/emu-00/u-1"
    send_file(upload_url, tmp_path / "u.gz", **file_of(file), token=update.token_for(upload_url, None))
    assert collector.store.sample_upload("u-1")["state"] == "complete"
    # ...and with it nothing else: a device's token starts no rollout
    assert _call(collector.url + "/api/rollouts", update.token, b"{}")[0] == 401
    with pytest.raises(UpdateError, match="HTTP 401"):
        download(url, tmp_path / "no.edgebundle", sha256=sha, size=size, token="stale", attempts=1)


def test_a_device_token_needs_an_api_token_of_its_own(tmp_path, cli, monkeypatch):
    with pytest.raises(EdgekitError, match="without an API token"):
        CollectorConfig(device_token="d")
    with pytest.raises(EdgekitError, match="is the API token"):
        CollectorConfig(api_token="same", device_token="same")
    assert "d" not in repr(CollectorConfig(api_token="a", device_token="d")).split("device_token")[-1][:5]
    monkeypatch.delenv("EDGEKIT_COLLECTOR_TOKEN", raising=False)
    monkeypatch.delenv("EDGEKIT_DEVICE_TOKEN", raising=False)
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    db = str(tmp_path / "fleet.db")
    for args, env, says in (
        (["--device-token-file", str(tmp_path / "none.token")], {}, "cannot read --device-token-file"),
        (["--device-token-file", str(empty)], {}, "is empty"),
        ([], {"EDGEKIT_DEVICE_TOKEN": "d"}, "without an API token"),
    ):
        result = cli("fleet", "collect", "--db", db, "--http", "", *args, env=env)
        assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not Path(db).exists()  # refused before anything started


def test_flash_writes_the_device_token_not_the_operators(tmp_path, monkeypatch, cli):
    from edgekit.local.flash import Flasher, FlashPlan, device_token_for

    monkeypatch.setenv("EDGEKIT_COLLECTOR_TOKEN", OPERATOR)
    monkeypatch.delenv("EDGEKIT_DEVICE_TOKEN", raising=False)
    plan = FlashPlan(
        bundle=Path("b"), device_id="d", fleet="f", broker="mqtt://10.0.0.5:1883", pubkey=Path("k"), target="dir:/x"
    )
    cases = [(DEVICE, None, DEVICE, False), (None, None, OPERATOR, True), (None, "env", "from-env", False)]
    for index, (given, env, staged, warned) in enumerate(cases):
        if env:
            monkeypatch.setenv("EDGEKIT_DEVICE_TOKEN", "from-env")
        said: list[str] = []
        staging = tmp_path / f"staging-{index}"
        staging.mkdir()
        files = Flasher(replace(plan, device_token=given), dry_run=True, say=said.append)._stage(staging, "/opt/e")
        assert files["etc/collector.token"].read_text().strip() == staged
        assert 'token_file = "/opt/e/etc/collector.token"' in (staging / "agent.toml").read_text()
        assert any("API token" in line for line in said) == warned
    assert device_token_for("", OPERATOR) == (None, False)  # "" given: no token, whatever the environment holds
    assert device_token_for(None, "") == (None, False)
    token_file = tmp_path / "device.token"
    token_file.write_text(DEVICE + "\n")
    missing = cli(
        "flash",
        "b.edgebundle",
        "--target",
        "dir:/x",
        "--device-id",
        "d",
        "--broker",
        "mqtt://h:1883",
        "--pubkey",
        "k.pub",
        "--device-token-file",
        str(tmp_path / "nope"),
        "--dry-run",
    )
    assert missing.exit_code != 0 and "cannot read --device-token-file" in missing.output
    assert "Traceback" not in missing.output


# -- helpers ---------------------------------------------------------------------------------------------
def _header(upload: str) -> dict:
    from device_agent.capture_upload import SAMPLES_SCHEMA

    return {"schema": SAMPLES_SCHEMA, "device": "dev1", "upload": upload, "capture": True, "models": {}, "rows": 0}


def _call(url: str, token: str | None, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """GET (no body) or POST ``url`` with ``token`` as the bearer: (status, body)."""
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST", headers=headers or {})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
