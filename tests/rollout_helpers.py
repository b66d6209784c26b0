"""A fleet for rollout tests: real Mosquitto, the real collector (in process, with its HTTP API and
rollout controller), and emulated devices that are real ``edge-agent run`` processes fed live rows."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from edgekit.fleet.client import CollectorClient
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.service import FleetService
from edgekit.local.broker import free_port
from edgekit.local.emulate import EmulatedFleet, prepare_devices


class RolloutFleet:
    def __init__(
        self,
        tmp: Path,
        broker,
        *,
        bundle: Path,
        public_key: Path,
        data: Path,
        fleet: str,
        devices: int = 3,
        rows_per_second: float = 100.0,
        trust: Path | None = None,
        proxy: BundleProxy | None = None,
        token: str | None = None,
        tokenless: tuple[str, ...] = (),
    ) -> None:
        """``token``: the collector's API token, which devices get in agent.toml (but those in ``tokenless``)."""
        self.tmp, self.fleet_name = tmp, fleet
        self.collector = FleetService(
            CollectorConfig(
                broker=broker.url,
                db=str(tmp / "fleet.db"),
                http=f"127.0.0.1:{free_port()}",
                client_id=f"collector-{fleet}",
                trust=str(trust or public_key),
                public_url=proxy.url if proxy else None,
                api_token=token,
            )
        )
        self.collector.start()
        if proxy is not None:
            proxy.upstream = f"http://127.0.0.1:{self.collector.server.server_address[1]}"
        self.client = CollectorClient(f"http://127.0.0.1:{self.collector.server.server_address[1]}", token=token or "")
        self.configs = prepare_devices(
            devices=devices,
            bundle=str(bundle),
            pubkey=str(public_key),
            broker=broker.url,
            data=str(data),
            fleet=fleet,
            window_rows=500,
            window_seconds=5,
            rows_per_second=rows_per_second,
            drift=None,
            state_dir=str(tmp / "devices"),
            http_port_base=None,
            collector_token=token or "",
        )
        for config in self.configs:
            if config.parent.name in tokenless:  # as if flashed before the collector had a token
                config.write_text(config.read_text().split("[update]")[0])
                (config.parent / "collector.token").unlink()
        self.devices = EmulatedFleet(self.configs, say=lambda _: None).start()
        self.wait(
            lambda: len([d for d in self.collector.store.status() if d["online"]]) == devices, 60, "every device online"
        )

    def start(self, bundle: Path, *, key: Path | None = None, **settings) -> dict:
        """``rollout start`` as the CLI does it: with ``key``, a signed revert goes along, so an abort reverts."""
        from edgekit.bundle.keys import load_private_key
        from edgekit.fleet.signed import sign_revert

        if key is not None:
            settings["revert"] = sign_revert(bundle, fleet=self.fleet_name, key=load_private_key(key))
        return self.client.start(bundle, fleet=self.fleet_name, **settings)

    def wait(self, predicate, timeout: float = 60.0, what: str = "condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.collector.drain()
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {what}; collector status: {self.collector.store.status()}\n{self.agent_logs()}"
        )

    def agent_logs(self, lines: int = 20) -> str:
        """The last update-related lines of each device's log, so a CI failure says what the devices did."""
        parts = []
        for config in self.configs:
            log = config.parent / "agent.log"
            text = log.read_text(errors="replace").splitlines() if log.exists() else ["(no log)"]
            parts.append(
                f"--- {config.parent.name} ---\n" + "\n".join([t for t in text if "summary" not in t][-lines:])
            )
        return "\n".join(parts)

    def finished(self, rollout_id: str, timeout: float = 90.0) -> dict:
        return self.wait(
            lambda: (lambda s: s if s["state"] in ("succeeded", "aborted", "failed") else None)(
                self.client.status(rollout_id)
            ),
            timeout,
            f"rollout {rollout_id} to finish",
        )

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
    from edgekit.bundle.keys import load_private_key, sign

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
    manifest["files"]["selftest.npz"] = {
        "sha256": sha256_hex(members["selftest.npz"]),
        "size": len(members["selftest.npz"]),
    }
    members["manifest.json"] = canonical_json(manifest)
    members["signature"] = sign(members["manifest.json"], load_private_key(key_path))
    with zipfile.ZipFile(destination, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return destination


def nan_beyond_range(source: Path, destination: Path, limit: float = 16.5) -> Path:
    """The digits model, rewired so that any pixel above ``limit`` makes its probabilities NaN.

    Pixels are 0..16, so the self-test and the shadow phase (real rows) pass; rows with a saturated
    pixel, sent after the swap, make it fail the way a model with an unguarded log or sqrt does."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(source))
    graph = model.graph
    producer = next(n for n in graph.node if "probabilities" in n.output)
    producer.output[list(producer.output).index("probabilities")] = "probabilities_raw"
    for node in graph.node:  # the label keeps coming from the healthy scores
        for index, name in enumerate(node.input):
            if name == "probabilities":
                node.input[index] = "probabilities_raw"
    graph.initializer.extend(
        [
            helper.make_tensor("nan_limit", TensorProto.FLOAT, [], [limit]),
            helper.make_tensor("nan_zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("nan_axes", TensorProto.INT64, [1], [1]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Sub", ["nan_limit", graph.input[0].name], ["nan_room"]),
            helper.make_node("Sqrt", ["nan_room"], ["nan_root"]),
            helper.make_node("ReduceSum", ["nan_root", "nan_axes"], ["nan_sum"], keepdims=1),
            helper.make_node("Mul", ["nan_sum", "nan_zero"], ["nan_poison"]),
            helper.make_node("Add", ["probabilities_raw", "nan_poison"], ["probabilities"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(destination))
    return destination


class BundleProxy:
    """An HTTP proxy in front of the collector's /bundles that misbehaves on purpose: ``cut`` sends
    the first answer's headers and half its body, then drops the connection (a flaky link);
    ``corrupt`` flips one byte of every answer (a tampering middlebox). ``seen`` logs each request's Range."""

    def __init__(self, mode: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.mode, self.upstream, self.seen = mode, "", []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                import urllib.error
                import urllib.request

                wanted = self.headers.get("Range")
                proxy.seen.append(wanted)
                request = urllib.request.Request(
                    proxy.upstream + self.path, headers={"Range": wanted} if wanted else {}
                )
                try:
                    with urllib.request.urlopen(request) as response:
                        status, headers, body = response.status, dict(response.headers), response.read()
                except urllib.error.HTTPError as exc:
                    status, headers, body = exc.code, dict(exc.headers), exc.read()
                first = len(proxy.seen) == 1
                if proxy.mode == "corrupt" and body:
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                self.send_response(status)
                for name in ("Content-Type", "Content-Range", "Accept-Ranges"):
                    if name in headers:
                        self.send_header(name, headers[name])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if proxy.mode == "cut" and first:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DeviceTopics:
    """What an attacker on the broker can do: publish a device's retained ``desired`` state straight to it (no
    collector involved), and read what the device reports."""

    def __init__(self, broker, fleet: str, device: str) -> None:
        import json
        import threading

        from paho.mqtt import client as mqtt

        self.reports: list[dict] = []
        self.topic = f"edgekit/v1/{fleet}/{device}"
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.reports.append(json.loads(m.payload))
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe(f"{self.topic}/reported", 1)
        self.client.loop_start()
        assert subscribed.wait(10), "the test client could not subscribe"

    def publish(self, doc: dict) -> None:
        import json

        self.client.publish(f"{self.topic}/desired", json.dumps(doc), qos=1, retain=True).wait_for_publish(10)

    def answer(self, fleet: RolloutFleet, rollout: str, states: tuple[str, ...], since: int = 0) -> dict:
        """The device's first report on ``rollout`` in one of ``states`` after the ``since``-th report."""
        return fleet.wait(
            lambda: next((r for r in self.reports[since:] if r["rollout"] == rollout and r["state"] in states), None),
            60,
            f"the device to answer {rollout} with {'/'.join(states)}",
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Devices:
    """A controller's ``publish`` for tests that answer for the devices: each device's last desired state."""

    def __init__(self) -> None:
        self.desired: dict[str, dict] = {}

    def __call__(self, topic: str, payload: bytes, retain: bool) -> bool:
        self.desired[topic.split("/")[3]] = json.loads(payload)
        return True
