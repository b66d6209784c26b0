"""The device side of OTA on its own: resumable download, crash recovery of the slots, the updater's
checks, with an in-process agent and the collector's real bundle endpoint."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from device_agent.errors import DownloadError, UpdateError
from device_agent.state import StateDir
from edgekit.local.broker import free_port
from tests.agent_helpers import config_of, make_device


@pytest.fixture
def served(tmp_path, bundle, keypair):
    """The collector's bundle endpoint, on a real HTTP server, holding the v3 bundle."""
    from device_agent.signing import load_public_key
    from edgekit.fleet.rollouts import RolloutController
    from edgekit.fleet.store import SqliteStore
    from edgekit.fleet.web import serve

    store = SqliteStore(":memory:")
    controller = RolloutController(
        store, lambda *a: True, tmp_path / "bundles", lambda: "", trusted_key=load_public_key(keypair[1])
    )
    server = serve(
        SimpleNamespace(rollouts=controller, store=store, alerts=None, config=SimpleNamespace(api_token=None)),
        f"127.0.0.1:{free_port()}",
    )
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield SimpleNamespace(
        base=base,
        controller=controller,
        add=lambda path: {**controller.add_bundle(path.read_bytes()), "url": f"{base}/bundles/{{}}"},
    )
    server.shutdown()
    server.server_close()


def test_a_download_cut_short_resumes_from_the_part_file(served, bundle, tmp_path):
    from device_agent.download import download

    stored = served.add(bundle)
    data = bundle.read_bytes()
    target = tmp_path / "dl" / "x.edgebundle"
    target.parent.mkdir()
    (target.parent / "x.edgebundle.part").write_bytes(data[:1000])  # what a killed agent left behind
    got = download(f"{served.base}/bundles/{stored['sha256']}", target, sha256=stored["sha256"], size=stored["size"])
    assert got.resumed_from == 1000 and got.fetched == len(data) - 1000 and target.read_bytes() == data
    assert not (target.parent / "x.edgebundle.part").exists()
    assert (
        download("http://unused.invalid/", target, sha256=stored["sha256"], size=stored["size"]).fetched == 0
    )  # already there


def test_a_download_that_cannot_finish_or_does_not_match_says_why(served, bundle, tmp_path):
    from device_agent.download import download

    stored = served.add(bundle)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(
            f"{served.base}/bundles/{'0' * 64}", tmp_path / "a", sha256="0" * 64, size=10, attempts=2, backoff=0.01
        )
    with pytest.raises(UpdateError, match="sha256") as caught:
        download(f"{served.base}/bundles/{stored['sha256']}", tmp_path / "b", sha256="1" * 64, size=stored["size"])
    assert caught.value.code == "hash" and not (tmp_path / "b.part").exists()
    with pytest.raises(DownloadError, match="cannot connect"):
        download(
            f"http://127.0.0.1:{free_port()}/x", tmp_path / "c", sha256="0" * 64, size=10, attempts=2, backoff=0.01
        )


def _two_slots(tmp_path, bundle, v4, keypair):
    from device_agent.signing import load_public_key

    key = load_public_key(keypair[1])
    state = StateDir(tmp_path / "state")
    state.install(bundle, key)
    slot, _ = state.stage(v4, key)
    return state, key, slot


def test_recover_undoes_a_swap_whose_health_watch_was_cut_short(tmp_path, bundle, v4_bundle, keypair):
    state, key, slot = _two_slots(tmp_path, bundle, v4_bundle, keypair)
    previous = state.active_slot()
    state.activate(
        slot, pending={"slot": slot, "previous": previous, "rollout": "r-1", "version": 4, "key": "r-1:install"}
    )
    assert state.state()["version"] == 4
    recovered = state.recover()  # as at the next start
    assert recovered["rollout"] == "r-1" and "restarted during the health watch" in recovered["reason"]
    assert state.active_slot() == previous and state.state()["version"] == 3 and state.state()["pending"] is None
    assert state.recover() is None


def test_recover_trusts_the_pointer_when_state_json_lags(tmp_path, bundle, v4_bundle, keypair):
    state, key, slot = _two_slots(tmp_path, bundle, v4_bundle, keypair)
    (state.root / "active").write_text(slot)  # the pointer moved, state.json was never rewritten
    assert state.recover() is None
    assert state.state()["active"] == slot and state.state()["version"] == 4 and state.state()["previous_version"] == 3


def test_a_rotten_active_slot_falls_back_to_the_other(tmp_path, bundle, v4_bundle, keypair):
    from device_agent.state import BUNDLE_FILE

    state, key, slot = _two_slots(tmp_path, bundle, v4_bundle, keypair)
    active = state.active_slot()
    path = state.slot(active) / BUNDLE_FILE
    path.write_bytes(path.read_bytes()[:-200])
    loaded, note = state.load_usable(key)
    assert loaded.version == 4 and state.active_slot() == slot and "failed verification" in note


def _wait_report(agent, rollout, states=("succeeded", "failed", "rolled_back", "aborted"), timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        report = agent.updater.last_report
        if report and report["rollout"] == rollout and report["state"] in states:
            return report
        time.sleep(0.02)
    raise AssertionError(f"no final report for {rollout}: {agent.updater.last_report}")


def test_the_updater_goes_up_refuses_replays_and_takes_a_signed_rollback(
    tmp_path, bundle, v4_bundle, keypair, served, monkeypatch
):
    from device_agent.agent import Agent
    from device_agent.protocol import DESIRED_SCHEMA
    from edgekit.bundle.keys import load_private_key
    from edgekit.fleet.rollouts import sign_rollback

    v3, v4 = served.add(bundle), served.add(v4_bundle)
    agent = Agent(config_of(make_device(tmp_path / "dev", bundle, keypair[1], http=False))).start(
        http=False, mqtt=False
    )
    try:

        def desire(rollout, stored, action="install", **extra):
            doc = {
                "schema": DESIRED_SCHEMA,
                "rollout": rollout,
                "action": action,
                "name": "digits",
                "version": stored["version"],
                "url": f"{served.base}/bundles/{stored['sha256']}",
                "sha256": stored["sha256"],
                "size": stored["size"],
                "health": {"seconds": 0.3},
                **extra,
            }
            agent.updater.on_desired(json.dumps(doc).encode())
            return _wait_report(agent, rollout)

        import device_agent.state as state_module
        import device_agent.updater as updater_module

        reads = []
        for module in (updater_module, state_module):  # count every verification of the downloaded file
            real = module.read_bundle
            monkeypatch.setattr(
                module, "read_bundle", lambda path, key, real=real: reads.append(str(path)) or real(path, key)
            )
        assert desire("r-up", v4)["state"] == "succeeded" and agent.model_info["version"] == 4
        assert len([r for r in reads if "downloads" in r]) == 1, reads  # verified once per update
        refused = desire("r-down", v3)
        assert refused["state"] == "failed" and refused["code"] == "downgrade" and agent.model_info["version"] == 4
        instruction, signature = sign_rollback(
            fleet="test", name="digits", version=3, sha256=v3["sha256"], key=load_private_key(keypair[0])
        )
        back = desire("r-back", v3, action="rollback", instruction=instruction, instruction_signature=signature)
        assert back["state"] == "succeeded" and agent.model_info["version"] == 3
        assert desire("r-up2", v4)["state"] == "succeeded"
        replay = desire("r-replay", v3, action="rollback", instruction=instruction, instruction_signature=signature)
        assert replay["state"] == "failed" and "replay" in replay["reason"] and agent.model_info["version"] == 4
        forged = desire(
            "r-forged",
            v3,
            action="rollback",
            instruction={**instruction, "issued_at": time.time() + 10},
            instruction_signature=signature,
        )
        assert forged["code"] == "signature" and agent.model_info["version"] == 4
        assert agent.predict([[0.0] * 64]).model_version == 4  # serving all along
        agent.updater.on_desired(b"{not json")
        assert agent.updater.rejected == 1
    finally:
        agent.stop()
