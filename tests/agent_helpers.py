"""Building a device for tests: a state dir with an installed bundle and an agent.toml."""

from __future__ import annotations

import json
from pathlib import Path

from device_agent.config import load_config
from device_agent.signing import load_public_key
from device_agent.state import StateDir
from edgekit.local.broker import free_port  # noqa: F401  (tests import it from here)


def make_device(
    root: Path,
    bundle: Path,
    public_key: Path,
    *,
    device_id: str = "dev1",
    fleet: str = "test",
    broker: str | None = None,
    window_rows: int = 200,
    window_seconds: float = 60,
    http: bool = True,
    token: str | None = None,
    server: dict | None = None,
    max_cpu_fraction: float = 0,  # every row sketched: tests count rows exactly (the budget's own tests set it)
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        f'device_id = "{device_id}"',
        f'fleet = "{fleet}"',
        f'state_dir = "{root / "state"}"',
        "[trust]",
        f'public_key = "{public_key}"',
        "[monitor]",
        f"window_rows = {window_rows}",
        f"window_seconds = {window_seconds}",
        f"max_cpu_fraction = {max_cpu_fraction}",
        "[server]",
        'listen = "127.0.0.1:0"' if http else 'listen = ""',
    ]
    if token:
        lines.append(f'token = "{token}"')
    lines += [f"{key} = {json.dumps(value)}" for key, value in (server or {}).items()]  # more [server] keys
    if broker:
        lines += ["[mqtt]", f'url = "{broker}"']
    config_path = root / "agent.toml"
    config_path.write_text("\n".join(lines) + "\n")
    StateDir(root / "state").install(bundle, load_public_key(public_key))
    return config_path


def config_of(path: Path):
    return load_config(path)


def read_json(response) -> dict:
    return json.loads(response.read())
