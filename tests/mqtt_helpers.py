"""A real Mosquitto for tests, a listening collector, and agents run as separate processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edgekit.local.broker import free_port, give_to_broker_user, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


class Mosquitto:
    """mosquitto on 127.0.0.1:<free port>, with a config this fixture writes. As root it drops to the
    'mosquitto' user, so its directory is handed to that user."""

    def __init__(self, directory: Path) -> None:
        import tempfile

        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (scripts/test.sh does it)")
        # Its own directory under /tmp: pytest's are 0700, and Mosquitto reads its files as 'mosquitto'.
        self.binary, self.port = binary, free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgekit-mosquitto-"))
        os.chmod(self.dir, 0o755)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if not directory.exists():
            directory.symlink_to(self.dir)
        (self.dir / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            "max_queued_messages 100000\n"
        )
        give_to_broker_user(self.dir)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        with open(self.dir / "stderr.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.dir / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=log
            )
        if not wait_for_port(self.port, process=self.process, timeout=10):
            raise RuntimeError(f"mosquitto did not start: {(self.dir / 'stderr.log').read_text()}")
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def own(self, path: Path) -> None:
        """Hand a file to the user Mosquitto runs as."""
        give_to_broker_user(path)


class Collector:
    """Subscribes to one fleet's state, baseline and summary topics and keeps everything it hears."""

    def __init__(self, url: str, fleet: str) -> None:
        from urllib.parse import urlparse

        self.fleet = fleet
        self.summaries: list[dict] = []
        self.states: dict[str, dict] = {}
        self.baselines: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-collector-{fleet}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(f"edgekit/v1/{fleet}/+/{leaf}", 1) for leaf in ("state", "baseline", "summary")]
        )
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        parsed = urlparse(url)
        self.client.connect(parsed.hostname, parsed.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        device, leaf = message.topic.split("/")[-2:]
        doc = json.loads(message.payload) if message.payload else None
        with self._lock:
            if leaf == "summary":
                self.summaries.append(doc)
            elif leaf == "state":
                self.states[device] = doc
            elif leaf == "baseline":
                self.baselines[device] = doc

    def of(self, device: str) -> list[dict]:
        with self._lock:
            return [s for s in self.summaries if s["device"] == device]

    def seqs(self, device: str) -> set[int]:
        return {s["seq"] for s in self.of(device)}

    def wait(self, predicate, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def resend(self, device: str, seqs: list[int]) -> None:
        payload = json.dumps({"schema": "edgekit.cmd/1", "cmd": "resend", "seqs": seqs})
        self.client.publish(f"edgekit/v1/{self.fleet}/{device}/cmd", payload, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AgentProcess:
    """``edge-agent run`` in its own process, as on a device."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.process: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        with open(self.config.parent / "agent.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--config", str(self.config)],
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


class OutputListener:
    """A client on a device's streaming ``output`` topic (the answers to what is published on ``input``),
    for the tests of MQTT streaming: ``publish`` a request, ``answers`` fill as they come."""

    def __init__(self, port: int, fleet: str, device: str = "dev1") -> None:
        self.answers: list[dict] = []
        self.got = threading.Event()
        self.input = f"edgekit/v1/{fleet}/{device}/input"
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: (self.answers.append(json.loads(m.payload)), self.got.set())
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgekit/v1/{fleet}/{device}/output", qos=1)
        self.client.loop_start()

    def publish(self, payload: bytes | str) -> None:
        self.client.publish(self.input, payload, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
