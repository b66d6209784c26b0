"""A fleet for rollout tests: real Mosquitto, the real collector (in process, with its HTTP API and
rollout controller), and emulated devices that are real ``edge-agent run`` processes fed live rows."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np

from edgekit.broker import free_port
from edgekit.emulate import EmulatedFleet, prepare_devices
from edgekit.fleet.client import CollectorClient
from edgekit.fleet.collector import Collector, CollectorConfig


class RolloutFleet:
    def __init__(self, tmp: Path, broker, *, bundle: Path, public_key: Path, data: Path, fleet: str, devices: int = 3,
                 rows_per_second: float = 100.0) -> None:
        self.tmp, self.fleet_name = tmp, fleet
        self.collector = Collector(CollectorConfig(broker=broker.url, db=str(tmp / "fleet.db"), http=f"127.0.0.1:{free_port()}",
                                                   client_id=f"collector-{fleet}", trust=str(public_key)))
        self.collector.start()
        self.client = CollectorClient(self.collector.http_url())
        self.configs = prepare_devices(devices=devices, bundle=str(bundle), pubkey=str(public_key), broker=broker.url, data=str(data), fleet=fleet,
                                       window_rows=500, window_seconds=5, rows_per_second=rows_per_second, drift=None,
                                       state_dir=str(tmp / "devices"), http_port_base=None)
        self.devices = EmulatedFleet(self.configs, say=lambda _: None).start()
        self.wait(lambda: len([d for d in self.collector.store.status() if d["online"]]) == devices, 60, "every device online")

    def wait(self, predicate, timeout: float = 60.0, what: str = "condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.collector.drain()
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; collector status: {self.collector.store.status()}")

    def finished(self, rollout_id: str, timeout: float = 90.0) -> dict:
        return self.wait(lambda: (lambda s: s if s["state"] in ("succeeded", "aborted", "failed") else None)(self.client.status(rollout_id)),
                         timeout, f"rollout {rollout_id} to finish")

    def versions(self) -> dict[str, int]:
        """What each device is serving now, asked of the device itself over HTTP."""
        import json
        import urllib.request

        found = {}
        for config in self.configs:
            http = json.loads((config.parent / "state" / "http.json").read_text())
            with urllib.request.urlopen(f"http://127.0.0.1:{http['port']}/v1/models/digits", timeout=10) as response:
                found[config.parent.name] = json.loads(response.read())["version"]
        return found

    def stop(self) -> None:
        self.devices.stop()
        self.collector.stop()


def tamper_selftest(source: Path, destination: Path, key_path: Path) -> Path:
    """A correctly signed bundle whose self-test vectors are wrong: as if the device's runtime disagreed."""
    import json

    from device_agent.canonical import canonical_json, sha256_hex
    from edgekit.keys import load_private_key, sign

    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with np.load(io.BytesIO(members["selftest.npz"])) as data:
        vectors = {k: data[k] for k in data.files}
    for key in vectors:
        if key.startswith("output:") and vectors[key].dtype.kind == "f":
            vectors[key] = vectors[key][::-1].copy()  # each row's expected scores now belong to another row
    buffer = io.BytesIO()
    np.savez(buffer, **vectors)
    members["selftest.npz"] = buffer.getvalue()
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["selftest.npz"] = {"sha256": sha256_hex(members["selftest.npz"]), "size": len(members["selftest.npz"])}
    members["manifest.json"] = canonical_json(manifest)
    members["signature"] = sign(members["manifest.json"], load_private_key(key_path))
    with zipfile.ZipFile(destination, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return destination
