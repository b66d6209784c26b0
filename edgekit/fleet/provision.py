"""``edgekit fleet provision``: per-device MQTT credentials and the broker ACL that confines each device.

Writes, under ``--out``:

- ``passwd``: Mosquitto password file (``user:$7$<iterations>$<salt>$<PBKDF2-SHA512>``, as
  ``mosquitto_passwd`` writes it) for every device and the collector;
- ``acl``: a device may publish only under its own ``edgekit/v1/<fleet>/<device>/`` and read only
  its own ``desired``, ``cmd`` and ``input``; the collector reads everything and writes commands and
  desired states;
- ``credentials/<user>.password`` (0600): the plain password, for ``edgekit flash`` to put on the
  device (readable only by the agent's user there) and for the collector;
- ``mosquitto.conf``: the lines that turn it on.

Running it again keeps existing passwords (new devices are added) unless ``rotate`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from device_agent.fsutil import write_atomic
from device_agent.protocol import TOPIC_ROOT, fleet_filter
from edgekit.errors import EdgekitError

COLLECTOR_USER = "edgekit-collector"
ITERATIONS = 10_000
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE_WRITES = ("state", "summary", "baseline", "reported", "output")
DEVICE_READS = ("desired", "cmd", "input")


@dataclass(frozen=True)
class Provisioned:
    directory: Path
    devices: tuple[str, ...]
    created: tuple[str, ...]


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def provision(directory: str | Path, *, fleet: str, devices: list[str], rotate: bool = False) -> Provisioned:
    for name in [fleet, *devices]:
        if not _ID.match(name):
            raise EdgekitError(
                f"{name!r} cannot be a fleet or device id",
                "use letters, digits, '.', '_' or '-' (it is an MQTT topic level and a user name)",
            )
    if COLLECTOR_USER in devices:
        raise EdgekitError(f"{COLLECTOR_USER!r} is reserved for the collector", "choose another device id")
    directory = Path(directory)
    credentials = directory / "credentials"
    credentials.mkdir(parents=True, exist_ok=True)
    known = _known_devices(directory / "acl", fleet)
    users = sorted(set(known) | set(devices))
    created = []
    lines = []
    for user in [COLLECTOR_USER, *users]:
        secret_file = credentials / f"{user}.password"
        if rotate or not secret_file.exists():
            write_atomic(secret_file, (secrets.token_urlsafe(24) + "\n").encode(), mode=0o600)
            created.append(user)
        lines.append(f"{user}:{mosquitto_hash(secret_file.read_text().strip())}")
    write_atomic(directory / "passwd", ("\n".join(lines) + "\n").encode(), mode=0o640)
    write_atomic(directory / "acl", _acl(fleet, users).encode(), mode=0o640)
    _readable_by_broker(directory / "passwd", directory / "acl")
    write_atomic(
        directory / "mosquitto.conf",
        (
            "allow_anonymous false\n"
            f"password_file {directory.resolve() / 'passwd'}\n"
            f"acl_file {directory.resolve() / 'acl'}\n"
        ).encode(),
    )
    return Provisioned(directory, tuple(users), tuple(created))


def _readable_by_broker(*paths: Path) -> None:
    """Mosquitto reads these after dropping root for the 'mosquitto' user: give that group read access."""
    try:
        import grp

        gid = grp.getgrnam("mosquitto").gr_gid
    except (ImportError, KeyError):
        return
    for path in paths:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            pass


def _acl(fleet: str, devices: list[str]) -> str:
    blocks = [
        f"# edgekit fleet {fleet!r}: written by 'edgekit fleet provision'",
        f"user {COLLECTOR_USER}",
        f"topic read {TOPIC_ROOT}/#",
        f"topic write {fleet_filter('cmd')}",
        f"topic write {fleet_filter('desired')}",
        "",
    ]
    for device in devices:
        prefix = f"{TOPIC_ROOT}/{fleet}/{device}"
        blocks.append(f"user {device}")
        blocks += [f"topic write {prefix}/{leaf}" for leaf in DEVICE_WRITES]
        blocks += [f"topic read {prefix}/{leaf}" for leaf in DEVICE_READS]
        blocks.append("")
    return "\n".join(blocks)


def _known_devices(acl: Path, fleet: str) -> list[str]:
    if not acl.exists():
        return []
    users = [line.split(None, 1)[1].strip() for line in acl.read_text().splitlines() if line.startswith("user ")]
    return [u for u in users if u != COLLECTOR_USER]
