"""A local MQTT broker for the demo and emulated fleets: Mosquitto if installed, else amqtt.

Mosquitto gets a config written here (loopback, a free port, anonymous, persistence off); run as
root it drops to the ``mosquitto`` user, so its directory is handed to that user. amqtt is a pure
Python MQTT 3.1.1 broker: enough for a demo, which is all it is used for.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.processes import stop_processes


@dataclass
class LocalBroker:
    kind: str
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_processes([self.process])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, *, process: subprocess.Popen | None = None, timeout: float = 15.0) -> bool:
    """True once 127.0.0.1:``port`` accepts connections; False on timeout or if ``process`` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            if process is not None and process.poll() is not None:
                return False
            time.sleep(0.05)
    return False


def give_to_broker_user(path: str | Path) -> None:
    """Mosquitto started as root reads its files as the 'mosquitto' user: hand ``path`` to it."""
    if os.geteuid() != 0:
        return
    try:
        import pwd

        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    os.chown(path, user.pw_uid, user.pw_gid)


def start_local_broker(directory: str | Path, *, prefer: str = "mosquitto") -> LocalBroker:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if mosquitto and prefer == "mosquitto":
        config = directory / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {directory / 'mosquitto.log'}\n"
        )
        give_to_broker_user(directory)
        command, kind = [mosquitto, "-c", str(config)], "mosquitto"
    else:
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise EdgekitError(
                "no MQTT broker: mosquitto is not installed and neither is amqtt",
                "apt-get install mosquitto, or pip install amqtt",
            ) from None
        command, kind = [sys.executable, "-m", "edgekit.local.embedded_broker", str(port)], "amqtt (embedded)"
    with open(directory / "broker.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    if wait_for_port(port, process=process):
        return LocalBroker(kind, port, process)
    process.kill()
    raise EdgekitError(f"the {kind} broker did not start", f"see {directory / 'broker.log'}")
