"""``edgekit emulate``: a fleet of real agent processes on one machine.

Each emulated device is an ``edge-agent run`` process with its own device id, state dir (the
bundle installed in its active slot), ``agent.toml`` and HTTP port, fed rows from a data file at a
steady rate by the agent's emulation feeder, with drift injected into chosen devices.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.bundle import read_bundle
from device_agent.errors import InstallError
from device_agent.signing import load_public_key
from device_agent.state import StateDir
from edgekit import tomlfile
from edgekit.errors import EdgekitError
from edgekit.local.flash import device_token_for
from edgekit.processes import stop_processes


@dataclass(frozen=True)
class DriftSpec:
    """``feature=f20,shift=8,after=500,devices=0-1``: shift a feature of some devices from a row on."""

    feature: str
    shift: float
    after: int = 0
    devices: frozenset[int] = frozenset({0})

    @classmethod
    def parse(cls, text: str) -> DriftSpec:
        fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        unknown = set(fields) - {"feature", "shift", "after", "devices"}
        if "feature" not in fields or "shift" not in fields or unknown:
            raise EdgekitError(
                f"drift spec {text!r} is not understood",
                "write it as feature=NAME,shift=NUMBER[,after=ROWS][,devices=0-1]",
            )
        try:
            return cls(
                fields["feature"],
                float(fields["shift"]),
                int(fields.get("after", 0)),
                _device_set(fields.get("devices", "0")),
            )
        except ValueError:
            raise EdgekitError(
                f"drift spec {text!r} has a value that is not a number",
                "e.g. feature=f20,shift=8,after=500,devices=0-1",
            ) from None


def _device_set(text: str) -> frozenset[int]:
    indices: set[int] = set()
    for part in text.split(";") if ";" in text else text.split(" "):
        for piece in part.split("+"):
            if "-" in piece:
                low, high = piece.split("-", 1)
                indices.update(range(int(low), int(high) + 1))
            elif piece:
                indices.add(int(piece))
    return frozenset(indices)


def prepare_devices(
    *,
    devices: int,
    bundle: str,
    pubkey: str,
    broker: str | None,
    data: str,
    fleet: str,
    window_rows: int,
    window_seconds: float,
    rows_per_second: float,
    drift: DriftSpec | None,
    state_dir: str,
    http_port_base: int | None,
    prefix: str = "emu",
    collector_token: str | None = None,
    collector_url: str | None = None,
    feedback: float = 0.0,
    capture: dict[str, float | int | bool] | None = None,
    device_token: str | None = None,
) -> list[Path]:
    """Write each device's directory (``<prefix>-00``, …: agent.toml, trusted key, bundle); return the configs.
    Each device's token: the collector's device token (``device_token``, else ``EDGEKIT_DEVICE_TOKEN``), else
    its API token (``collector_token``, else ``EDGEKIT_COLLECTOR_TOKEN``): see ``_update_table``. ``feedback``:
    the share of rows whose true label (the data file's ``y``) each device sends back as a delayed label; ``capture``:
    the devices' ``[capture]`` table (field samples kept for ``fleet samples`` and the retrain sink)."""
    token, _ = device_token_for(device_token, collector_token)
    _check_arguments(broker, drift, devices)
    key = load_public_key(pubkey)
    opened = read_bundle(bundle, key)
    feature = _drift_feature(drift, opened.input_schema)
    root = Path(state_dir).resolve()
    configs = []
    for index in range(devices):
        device_id = f"{prefix}-{index:02d}"
        directory = root / device_id
        _install(directory, pubkey, bundle, key, opened.version)
        drifting = drift if drift and index in drift.devices else None
        doc = _agent_toml(
            device_id,
            index,
            fleet=fleet,
            window_rows=window_rows,
            window_seconds=window_seconds,
            broker=broker,
            http_port_base=http_port_base,
            data=data,
            rows_per_second=rows_per_second,
            drift=drifting,
            feature=feature,
            feedback=feedback,
        )
        doc["capture"] = dict(capture) if capture else None  # as given ({"enabled": True, "rate": 0.5})
        doc["update"] = _update_table(directory, token, collector_url)
        configs.append(tomlfile.write(directory / "agent.toml", doc, comment="written by edgekit emulate"))
    return configs


def _install(directory: Path, pubkey: str, bundle: str, key, version: int) -> None:
    """The device's directory with the trusted key and the bundle installed (kept when it is installed already)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(pubkey, directory / "trusted.pub")
    state = StateDir(directory / "state")
    try:
        state.install(bundle, key)
    except InstallError:
        if state.state().get("version") != version:
            raise  # a newer model is installed there: do not silently run something else


def _check_arguments(broker: str | None, drift: DriftSpec | None, devices: int) -> None:
    if broker:
        from edgekit.fleet.config import parse_broker_url

        parse_broker_url(broker)
    if drift and max(drift.devices, default=0) >= devices:
        raise EdgekitError(
            f"drift is asked for devices {sorted(drift.devices)} but only {devices} run (0-{devices - 1})",
            "fix devices= in --drift",
        )


def _update_table(directory: Path, token: str | None, collector_url: str | None) -> dict[str, str] | None:
    """The device's token, which the collector wants on bundle downloads when it has one: ``collector.token``
    (0600) and ``[update] token_file``, with ``collector_url`` as ``[update] collector`` when given (else
    the agent sends the token only to the broker's host). None (no table) without a token."""
    if not token:
        return None
    secret = directory / "collector.token"
    secret.touch(mode=0o600)
    secret.chmod(0o600)  # before the token is in it (touch keeps an existing file's mode)
    secret.write_text(token + "\n")
    return {"token_file": "collector.token", "collector": collector_url}


def _agent_toml(
    device_id: str,
    index: int,
    *,
    fleet: str,
    window_rows: int,
    window_seconds: float,
    broker: str | None,
    http_port_base: int | None,
    data: str,
    rows_per_second: float,
    drift: DriftSpec | None,
    feature: str | None,
    feedback: float = 0.0,
) -> dict[str, Any]:
    """One emulated device's agent.toml as a document (relative paths: the file sits in the device's directory;
    None: a key or table left out)."""
    emulate: dict[str, Any] = {
        "data": str(Path(data).resolve()),
        "rows_per_second": rows_per_second,
        "seed": index,
        "feedback": feedback or None,
    }
    if drift:
        emulate |= {"drift_feature": feature, "drift_shift": drift.shift, "drift_after": drift.after}
    return {
        "device_id": device_id,
        "fleet": fleet,
        "state_dir": "state",
        "trust": {"public_key": "trusted.pub"},
        "monitor": {"window_rows": window_rows, "window_seconds": window_seconds},
        "server": {"listen": f"127.0.0.1:{http_port_base + index if http_port_base else 0}"},
        "mqtt": {"url": broker} if broker else None,
        "emulate": emulate,
    }


def _drift_feature(drift: DriftSpec | None, schema) -> str | None:
    """The feature ``drift`` shifts: a column by name or position; a tensor model drifts as a whole (brighter)."""
    if drift is None:
        return None
    return _resolve_feature(drift.feature, ("brightness",) if schema.tensor is not None else schema.feature_names)


def _resolve_feature(name: str, feature_names: tuple[str, ...]) -> str:
    """A feature by name, or ``f<index>`` for the feature at that position."""
    if name in feature_names:
        return name
    if name.startswith("f") and name[1:].isdigit() and int(name[1:]) < len(feature_names):
        return feature_names[int(name[1:])]
    raise EdgekitError(
        f"the model has no feature {name!r}",
        f"use a name ({', '.join(feature_names[:4])}, …) or f0…f{len(feature_names) - 1}",
    )


def device_environment() -> dict[str, str]:
    """This environment for an emulated device, without the operators' token: the agent would take
    ``EDGEKIT_COLLECTOR_TOKEN`` over the token file ``prepare_devices`` wrote (the device token)."""
    return {k: v for k, v in os.environ.items() if k not in ("EDGEKIT_COLLECTOR_TOKEN", "EDGEKIT_DEVICE_TOKEN")}


class EmulatedFleet:
    """One ``edge-agent run`` process per config: start, check, stop (every one, whatever happens)."""

    def __init__(self, configs: list[Path], *, say: Callable[[str], None] = print) -> None:
        self.configs, self.say = configs, say
        self.processes: list[subprocess.Popen] = []

    def start(self) -> EmulatedFleet:
        for config in self.configs:
            with open(config.parent / "agent.log", "ab") as log:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "device_agent", "run", "--config", str(config)],
                        stdout=log,
                        stderr=log,
                        env=device_environment(),
                    )
                )
            self.say(f"started {config.parent.name} (pid {self.processes[-1].pid}, log {config.parent / 'agent.log'})")
        return self

    def check(self) -> None:
        """Raise if a device process has died (its last log line says why)."""
        for config, process in zip(self.configs, self.processes, strict=False):
            if process.poll() is not None:
                tail = (config.parent / "agent.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise EdgekitError(
                    f"emulated device {config.parent.name} exited with code {process.returncode}: {tail[0]}",
                    f"see {config.parent / 'agent.log'}",
                )

    def stop(self) -> None:
        stop_processes(self.processes, timeout=15)
        if self.processes:
            self.say(f"stopped {len(self.processes)} emulated device(s)")
        self.processes = []


def run_devices(configs: list[Path], *, duration: float | None = None, say: Callable[[str], None] = print) -> int:
    """Run the devices until ``duration`` passes or Ctrl-C/SIGTERM; stop them all."""
    fleet = EmulatedFleet(configs, say=say).start()
    with interrupted() as stop:
        try:
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                fleet.check()
                stop.wait(0.2)
        finally:
            fleet.stop()
    return 0


@contextlib.contextmanager
def interrupted() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM while the block runs (the previous handlers come back after)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()), signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
