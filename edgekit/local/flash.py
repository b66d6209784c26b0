"""``edgekit flash``: put an agent, its model and its credentials on a device.

Targets:

- ``ssh://user@host[:port][/install/root]``: through the system ``ssh`` and ``scp`` (the user's keys and config;
  ``--identity`` and ``--ssh-option`` pass through). Layout under the URL's path when it has one, else
  ``/opt/edgekit`` (root) or ``~/edgekit``; a systemd unit ``edgekit-agent.service`` (restart on failure,
  an unprivileged user) is installed, enabled and started when the target runs systemd, else the agent is
  started in the background. Then the device's first state message is awaited on the broker.
- ``dir:/path``: the same layout in a local directory, an emulated device; ``edge-agent run --config
  /path/etc/agent.toml`` (or ``--start``) runs it.
- ``chroot:/rootfs``: a device root file system on this host (e.g. a Debian arm64 root run under
  qemu-aarch64, see scripts/emulated_pi.sh): the layout goes to ``/opt/edgekit`` inside it, and the
  install runs through ``chroot`` with a clean environment, then the agent is started there.

Layout: ``venv/`` (``edgekit-ml[agent]`` from the index, or offline from ``--wheel-dir``), ``etc/agent.toml``,
``etc/trusted.pub``, ``etc/mqtt.password`` (0600, from ``fleet provision``), ``etc/collector.token`` (0600, the
collector's device token for bundle downloads and field-sample uploads: ``--device-token-file`` or
``EDGEKIT_DEVICE_TOKEN``; else, for a collector without one, its API token, ``EDGEKIT_COLLECTOR_TOKEN``),
``state/`` with the bundle installed in its active slot. Running flash again upgrades in place. ``--dry-run``
prints each step.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from device_agent.bundle import read_bundle
from device_agent.protocol import Topics
from device_agent.signing import load_public_key
from edgekit import tomlfile
from edgekit.errors import FlashError

UNIT = """[Unit]
Description=edgekit device agent
After=network-online.target
Wants=network-online.target

[Service]
User={user}
ExecStart={agent} run --config {config}
# one BLAS thread: the log-mel filterbank's matmul with a thread per core fought the runtime's thread
Environment=OPENBLAS_NUM_THREADS=1
Restart=on-failure
RestartSec=5
NoNewPrivileges=true

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class FlashPlan:
    bundle: Path
    device_id: str
    fleet: str
    broker: str
    pubkey: Path
    target: str
    identity: str | None = None
    ssh_options: tuple[str, ...] = ()
    wheel_dir: Path | None = None
    credentials: Path | None = None
    listen: str = "127.0.0.1:8470"
    python: str = "python3"
    system_site_packages: bool = False
    window_rows: int = 1000
    window_seconds: float = 60.0
    start: bool = False
    collector_token: str | None = field(default=None, repr=False)  # the API token, for a collector without
    device_token: str | None = field(default=None, repr=False)  # a device token (``device_token_for``)
    collector_url: str | None = None  # [update] collector: where the token may go (default: the broker's host)


def device_token_for(device_token: str | None = None, collector_token: str | None = None) -> tuple[str | None, bool]:
    """The token a flashed or emulated device keeps, and whether it is a device token: the collector's
    device token (``device_token``, else ``EDGEKIT_DEVICE_TOKEN``) when there is one, else, for a collector
    without one, its API token (``collector_token``, else ``EDGEKIT_COLLECTOR_TOKEN``). An argument given,
    even "" (no token), wins over the environment."""
    if device_token is not None:
        return device_token or None, bool(device_token)
    if collector_token is not None:
        return collector_token or None, False
    if os.environ.get("EDGEKIT_DEVICE_TOKEN"):
        return os.environ["EDGEKIT_DEVICE_TOKEN"], True
    return os.environ.get("EDGEKIT_COLLECTOR_TOKEN") or None, False


@dataclass
class Flasher:
    plan: FlashPlan
    dry_run: bool = False
    say: Callable[[str], None] = print
    steps: list[str] = field(default_factory=list)

    # -- the steps ----------------------------------------------------------------------------------
    def run(self, *, wait_seconds: float = 60.0) -> dict | None:
        plan = self.plan
        self._check_arguments()
        opened = read_bundle(plan.bundle, load_public_key(plan.pubkey))  # never ship what the device would refuse
        ssh = plan.target.startswith("ssh://")
        chroot = self._chroot()
        if not ssh and chroot is None and not plan.target.startswith("dir:"):
            raise FlashError(
                f"target {plan.target!r} is not ssh://user@host, dir:/path or chroot:/rootfs",
                "e.g. --target ssh://pi@raspberrypi.local or --target dir:/tmp/dev1",
            )
        root = (
            self._remote_root()
            if ssh
            else "/opt/edgekit"
            if chroot
            else str(Path(plan.target[4:]).expanduser().resolve())
        )
        self.say(
            f"flashing {opened.name} v{opened.version} onto {plan.target} as {plan.fleet}/{plan.device_id} "
            f"(root {root})"
        )
        extras = _extras_for(opened)
        with tempfile.TemporaryDirectory(prefix="edgekit-flash-") as staging:
            files = self._stage(Path(staging), root)
            self._copy(files, root, ssh)
            self._execute(self._install_script(root, ssh, extras), ssh)
        if self.dry_run:
            return None
        if ssh or chroot or plan.start:
            return self._await_state(wait_seconds)
        self.say(f"done: run it with {root}/venv/bin/edge-agent run --config {root}/etc/agent.toml")
        return None

    def _check_arguments(self) -> None:
        """Everything the device would refuse later, refused now, before a venv is built."""
        from device_agent.config import ID_PATTERN
        from edgekit.fleet.config import parse_broker_url

        for label, value in (("--device-id", self.plan.device_id), ("--fleet", self.plan.fleet)):
            if not ID_PATTERN.match(value):
                raise FlashError(
                    f"{label} {value!r} is not allowed",
                    "use letters, digits, '.', '_' or '-' (it becomes an MQTT topic level)",
                )
        parse_broker_url(self.plan.broker)
        host, _, port = self.plan.listen.rpartition(":")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise FlashError(f"--listen {self.plan.listen!r} is not host:port", "e.g. 127.0.0.1:8470")

    def _stage(self, staging: Path, root: str) -> dict[str, Path]:
        plan = self.plan
        files = {"etc/trusted.pub": plan.pubkey, "bundle.edgebundle": plan.bundle}
        password = self._password()
        mqtt = {"url": plan.broker}
        if password is not None:
            (staging / "mqtt.password").write_text(password + "\n")
            files["etc/mqtt.password"] = staging / "mqtt.password"
            mqtt |= {"username": plan.device_id, "password_file": f"{root}/etc/mqtt.password"}
        doc = {
            "device_id": plan.device_id,
            "fleet": plan.fleet,
            "state_dir": f"{root}/state",
            "trust": {"public_key": f"{root}/etc/trusted.pub"},
            "mqtt": mqtt,
            "server": {"listen": plan.listen},
            "monitor": {"window_rows": plan.window_rows, "window_seconds": plan.window_seconds},
            "update": self._collector_token(staging, files, root),
        }
        config = tomlfile.dumps(doc, comment="written by edgekit flash")
        (staging / "agent.toml").write_text(config, encoding="utf-8")
        files["etc/agent.toml"] = staging / "agent.toml"
        if self.dry_run:
            self.say("[dry-run] agent.toml:\n    " + config.strip().replace("\n", "\n    "))
        unit = UNIT.format(
            user="edgekit",
            agent=systemd_word(f"{root}/venv/bin/edge-agent", command=True),
            config=systemd_word(f"{root}/etc/agent.toml"),
        )
        (staging / "edgekit-agent.service").write_text(unit, encoding="utf-8")
        files["etc/edgekit-agent.service"] = staging / "edgekit-agent.service"
        wheels = staging / "wheels"
        wheels.mkdir()
        self._build_edgekit_wheel(wheels)
        if plan.wheel_dir is not None:
            for wheel in Path(plan.wheel_dir).glob("*.whl"):
                shutil.copy(wheel, wheels / wheel.name)
        for wheel in wheels.glob("*.whl"):
            files[f"wheels/{wheel.name}"] = wheel
        return files

    def _collector_token(self, staging: Path, files: dict[str, Path], root: str) -> dict[str, str | None] | None:
        """The ``[update]`` table, and ``etc/collector.token`` staged, when the collector has a token: it wants
        one on bundle downloads, so a device flashed without it could never be updated over the air."""
        plan = self.plan
        token, is_device_token = device_token_for(plan.device_token, plan.collector_token)
        if not token:
            return None
        if not is_device_token:
            self.say(
                "the device gets the collector's API token, which also starts rollouts: give the collector "
                "--device-token-file and flash with the same file, so a device holds only the device token"
            )
        (staging / "collector.token").write_text(token + "\n")
        files["etc/collector.token"] = staging / "collector.token"
        return {"token_file": f"{root}/etc/collector.token", "collector": plan.collector_url}

    def _password(self) -> str | None:
        if self.plan.credentials is None:
            return None
        path = Path(self.plan.credentials) / f"{self.plan.device_id}.password"
        if not path.exists():
            raise FlashError(
                f"no credentials for {self.plan.device_id} in {self.plan.credentials}",
                f"run 'edgekit fleet provision --devices {self.plan.device_id} --out ...' first",
            )
        return path.read_text().strip()

    def _build_edgekit_wheel(self, wheels: Path) -> None:
        """The device gets this very edgekit: a wheel built from the source tree this runs from."""
        import edgekit

        source = Path(edgekit.__file__).resolve().parent.parent  # the checkout that holds pyproject.toml
        if not (source / "pyproject.toml").exists():
            return  # installed from a wheel: the device takes edgekit from the index like its dependencies
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)]
        if self.dry_run:
            self._show("build", command)
            return
        # Offline first (the setuptools installed here), then an isolated build that fetches its own.
        done = subprocess.run(command[:4] + ["--no-build-isolation"] + command[4:], capture_output=True, text=True)
        if done.returncode:
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise FlashError(
                f"could not build the edgekit wheel: {' '.join(done.stderr.strip().splitlines()[-2:])}",
                "check that setuptools and wheel are installed",
            )

    def _install_script(self, root: str, ssh: bool, extras: str = "agent") -> str:
        plan = self.plan
        q = shlex.quote
        venv_flags = "--system-site-packages " if plan.system_site_packages else ""
        index = "--no-index " if plan.wheel_dir is not None else ""
        lines = [
            "set -eu",
            f"ROOT={q(root)}",
            'mkdir -p "$ROOT/etc" "$ROOT/state"',
            f'[ -x "$ROOT/venv/bin/python" ] || {q(plan.python)} -m venv {venv_flags}"$ROOT/venv"',
            *(self._inherit_site_packages() if plan.system_site_packages else []),
            # edgekit itself always into the venv (a system-wide edgekit must not satisfy it), then what it needs
            f'"$ROOT/venv/bin/python" -m pip install -q --disable-pip-version-check {index}--find-links "$ROOT/wheels" '
            "--force-reinstall --no-deps edgekit-ml",
            f'"$ROOT/venv/bin/python" -m pip install -q --disable-pip-version-check {index}--find-links "$ROOT/wheels" '
            f'"edgekit-ml[{extras}]"',
            'chmod 600 "$ROOT/etc/mqtt.password" 2>/dev/null || true',
            'chmod 600 "$ROOT/etc/collector.token" 2>/dev/null || true',
            # flashing is an administrator's direct install: it may replace the active version (OTA may not)
            '"$ROOT/venv/bin/edge-agent" install "$ROOT/bundle.edgebundle" --config "$ROOT/etc/agent.toml" '
            "--allow-downgrade",
        ]
        if ssh:
            lines += [
                'if [ "$(id -u)" = 0 ]; then id edgekit >/dev/null 2>&1 || '
                'useradd --system --home "$ROOT" --shell /usr/sbin/nologin edgekit; '
                'chown -R edgekit: "$ROOT/state" "$ROOT/etc"; '
                'chmod 600 "$ROOT/etc/mqtt.password" "$ROOT/etc/collector.token" 2>/dev/null || true; fi',
                'if [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then',
                '  cp "$ROOT/etc/edgekit-agent.service" /etc/systemd/system/edgekit-agent.service',
                "  systemctl daemon-reload && systemctl enable edgekit-agent && systemctl restart edgekit-agent",
                "  echo started: systemd edgekit-agent.service",
                "else",
                '  [ -f "$ROOT/agent.pid" ] && kill "$(cat "$ROOT/agent.pid")" 2>/dev/null || true',
                '  nohup "$ROOT/venv/bin/edge-agent" run --config "$ROOT/etc/agent.toml" '
                '>> "$ROOT/agent.log" 2>&1 < /dev/null &',
                '  echo $! > "$ROOT/agent.pid"',
                '  echo started: background process $(cat "$ROOT/agent.pid") without systemd',
                "fi",
            ]
        elif plan.start or self._chroot():
            lines += [
                '[ -f "$ROOT/agent.pid" ] && kill "$(cat "$ROOT/agent.pid")" 2>/dev/null || true',
                # started from the operator's shell: its token must not override the device's token file
                "unset EDGEKIT_COLLECTOR_TOKEN EDGEKIT_DEVICE_TOKEN",
                'nohup "$ROOT/venv/bin/edge-agent" run --config "$ROOT/etc/agent.toml" '
                '>> "$ROOT/agent.log" 2>&1 < /dev/null &',
                'echo $! > "$ROOT/agent.pid"',
            ]
        return "\n".join(lines) + "\n"

    def _inherit_site_packages(self) -> list[str]:
        """Shell lines that let the new venv see the packages of the interpreter ``--python`` names.

        ``venv --system-site-packages`` only reaches the *base* interpreter's site-packages: when
        ``--python`` is itself a virtualenv's python, the packages the user meant (that venv's) stay
        invisible, and an offline install then fails on whatever the base Python happens to lack. A
        ``.pth`` file listing that interpreter's own site directories makes them visible, whatever it is.
        """
        q = shlex.quote
        listing = "import site; print(chr(10).join(site.getsitepackages()))"
        purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        return [
            f"{q(self.plan.python)} -c {q(listing)} > "
            f'"$("$ROOT/venv/bin/python" -c {q(purelib)})/edgekit-python-site.pth"'
        ]

    # -- transport ----------------------------------------------------------------------------------
    def _ssh_base(self) -> tuple[list[str], list[str], str]:
        parsed = urlparse(self.plan.target)
        if not parsed.hostname:
            raise FlashError(f"target {self.plan.target!r} has no host", "write it as ssh://user@host[:port]")
        options = ["-o", "BatchMode=yes"]
        for option in self.plan.ssh_options:
            options += ["-o", option]
        if self.plan.identity:
            options += ["-i", self.plan.identity]
        destination = f"{parsed.username}@{parsed.hostname}" if parsed.username else parsed.hostname
        port = parsed.port
        return (
            ["ssh", *options, *(["-p", str(port)] if port else []), destination],
            ["scp", "-q", *options, *(["-P", str(port)] if port else [])],
            destination,
        )

    def _remote_root(self) -> str:
        """The install root: the URL's path when it has one (ssh://pi@host/srv/edgekit), else a default per user."""
        parsed = urlparse(self.plan.target)
        if parsed.path.rstrip("/"):
            if ".." in parsed.path.split("/"):
                raise FlashError(
                    f"target path {parsed.path!r} climbs with '..'",
                    "give the install root as an absolute path, e.g. ssh://pi@host/opt/edgekit",
                )
            return parsed.path.rstrip("/")
        return "/opt/edgekit" if parsed.username in (None, "root") else f"/home/{parsed.username}/edgekit"

    def _chroot(self) -> Path | None:
        return Path(self.plan.target[len("chroot:") :]).resolve() if self.plan.target.startswith("chroot:") else None

    def _copy(self, files: dict[str, Path], root: str, ssh: bool) -> None:
        if not ssh:
            base = self._chroot()
            for relative, source in files.items():
                destination = (base / root.lstrip("/") if base else Path(root)) / relative
                if self.dry_run:
                    self._show("copy", ["cp", str(source), str(destination)])
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, destination)
            return
        ssh_command, scp_command, destination = self._ssh_base()
        directories = sorted({str(Path(root) / Path(relative).parent) for relative in files})
        self._call(ssh_command + ["mkdir -p " + " ".join(shlex.quote(d) for d in directories)], "prepare directories")
        for relative, source in files.items():
            self._call(scp_command + [str(source), f"{destination}:{Path(root) / relative}"], f"copy {relative}")

    def _execute(self, script: str, ssh: bool) -> None:
        chroot = self._chroot()
        if ssh:
            command = self._ssh_base()[0] + ["bash -s"]
        elif chroot is not None:
            # A clean environment: the host's PIP_* settings name paths that do not exist in the root.
            command = [
                "chroot",
                str(chroot),
                "/usr/bin/env",
                "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
                "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                "bash",
                "-s",
            ]
        else:
            command = ["bash", "-s"]
        self._call(command, "install the agent", stdin=script)

    def _call(self, command: list[str], what: str, stdin: str | None = None) -> None:
        if self.dry_run:
            self._show(what, command)
            if stdin:
                self.say("    " + stdin.replace("\n", "\n    ").rstrip())
            return
        self.say(f"  {what}")
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=900)
        if done.returncode:
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise FlashError(
                f"{what} failed on {self.plan.target} (exit {done.returncode}): {' | '.join(detail)}",
                "check the target is reachable (ssh, keys) and has python3 with venv",
            )
        for line in done.stdout.strip().splitlines():
            if line.startswith("started:"):
                self.say(f"  {line}")

    def _show(self, what: str, command: list[str]) -> None:
        self.steps.append(shlex.join(command))
        self.say(f"[dry-run] {what}: {shlex.join(command)}")

    # -- the proof ----------------------------------------------------------------------------------
    def _await_state(self, seconds: float) -> dict:
        import paho.mqtt.client as mqtt

        parsed = urlparse(self.plan.broker)
        topic = Topics(self.plan.fleet, self.plan.device_id).state
        seen: dict = {}
        done = threading.Event()

        def on_message(client, userdata, message):
            try:
                doc = json.loads(message.payload)
            except ValueError:
                return
            if doc.get("online"):
                seen.update(doc)
                done.set()

        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgekit-flash-{self.plan.device_id}"
        )
        client.on_message = on_message
        client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        password = self._password()
        if password is not None:
            collector_secret = Path(self.plan.credentials) / "edgekit-collector.password"
            if collector_secret.exists():
                client.username_pw_set("edgekit-collector", collector_secret.read_text().strip())
        if parsed.scheme == "mqtts":
            client.tls_set()
        client.connect_async(parsed.hostname, parsed.port or 1883)
        client.loop_start()
        try:
            if not done.wait(seconds):
                raise FlashError(
                    f"no state message from {self.plan.device_id} on {self.plan.broker} within {seconds:.0f} s",
                    "check the agent's log on the device (agent.log or journalctl -u edgekit-agent) "
                    "and that it can reach the broker",
                )
        finally:
            client.loop_stop()
            client.disconnect()
        model = seen.get("model") or {}
        self.say(
            f"online: {self.plan.device_id} runs {model.get('name')} v{model.get('version')} on {seen.get('runtime')} "
            f"(agent {seen.get('agent_version')})"
        )
        return seen


def _extras_for(bundle) -> str:
    """The agent's extras a bundle needs: its runtime, and Pillow when its preprocessing decodes images."""
    extras = ["agent"] + (["tflite"] if bundle.model_format == "tflite" else [])
    preprocess = bundle.manifest.get("input", {}).get("preprocess") or {}
    return ",".join(extras + (["vision"] if "image" in preprocess else []))


def systemd_word(text: str, *, command: bool = False) -> str:
    """``text`` as one word of a systemd ``ExecStart=`` line: quoted (an install root may hold a space), with the
    backslash and the quote escaped and ``%`` doubled (systemd reads ``%h``, ``%n``... as specifiers); in an
    argument ``$`` is doubled too (systemd expands ``$VAR`` there), in the ``command`` itself it is not."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (escaped if command else escaped.replace("$", "$$")) + '"'
