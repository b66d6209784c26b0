"""agent.toml read strictly: a mistake is one line naming the key and the fix, never a silent default.

Each mistake below was accepted before (a typo left at its default, ``bool("false")`` read as true, a port past
65535 served modulo 65536, a number taken as a device id), or refused with a message that sent the user
looking in the wrong place. Every config the code, the tests and the docs write must still be read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.config import load_config, parse_config
from device_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BASE = {"device_id": "d", "state_dir": "s", "trust": {"public_key": "k.pub"}}

MISTAKES = [
    # (the document, what the one line must say: the key, the table, the fix)
    ({**BASE, "monitor": {"window_row": 1000}}, r"\[monitor\] has no setting 'window_row'; did you mean window_rows\?"),
    ({**BASE, "monitr": {"window_rows": 1000}}, r"has no table \[monitr\]; did you mean \[monitor\]\?"),
    ({**BASE, "device_id": 17}, r'device_id = 17 is not a string; write it in quotes: device_id = "17"'),
    ({**BASE, "fleet": ["a"]}, r"fleet = \['a'\] is not a string; write it in quotes"),
    ({**BASE, "mqtt": {"streaming": "false"}}, r'\[mqtt\] streaming = "false" is not true or false; write streaming'),
    ({**BASE, "capture": {"enabled": 1}}, r"\[capture\] enabled = 1 is not true or false"),
    (
        {**BASE, "server": {"listen": "127.0.0.1:99999"}},
        r'\[server\] listen = "127.0.0.1:99999" is not host:port with a port from 0 to 65535; e.g. listen = ',
    ),
    ({**BASE, "server": {"listen": "localhost"}}, r"\[server\] listen = \"localhost\" is not host:port"),
    (
        {"trust": {"public_key": "k"}, "mqtt": {"url": "mqtt://h:1883", "device_id": "d", "state_dir": "s"}},
        r"\[mqtt\] has no setting 'device_id'; device_id is a top-level setting: move it above the first \[table\]",
    ),
    ({**BASE, "url": "mqtt://h:1883"}, r"has no top-level setting 'url'; url belongs in \[mqtt\]"),
    ({**BASE, "mqtt": {"public_key": "k"}}, r"\[mqtt\] has no setting 'public_key'; public_key belongs in \[trust\]"),
    ({**BASE, "devce_id": "x"}, r"has no top-level setting 'devce_id'; did you mean device_id\?"),
    ({**BASE, "mqtt": "mqtt://h"}, r'mqtt = "mqtt://h" is not a table; write a \[mqtt\] header'),
    ({**BASE, "emulate": {"data": "x.npz", "sped": 3}}, r"\[emulate\] has no setting 'sped'; did you mean seed\?"),
    (
        {**BASE, "emulate": {"data": "x.npz", "rows_per_second": "fast"}},
        r'\[emulate\] rows_per_second = "fast" is not a number',
    ),
    ({**BASE, "emulate": {"data": "x.npz", "seed": -1}}, r"\[emulate\] seed = -1 is out of range"),
    (
        {**BASE, "monitor": {"window_rows": "1000"}},
        r'\[monitor\] window_rows = "1000" is not a whole number; write it without quotes: window_rows = 1000',
    ),
    ({**BASE, "monitor": {"window_rows": 2.5}}, r"\[monitor\] window_rows = 2.5 is not a whole number"),
    ({**BASE, "monitor": {"window_rows": True}}, r"\[monitor\] window_rows = true is not a whole number"),
    ({**BASE, "monitor": {"log_rows": 0}}, r"\[monitor\] log_rows = 0 is out of range: log_rows must be 1 or more"),
    ({**BASE, "monitor": {"window_seconds": float("inf")}}, r"window_seconds = inf is out of range"),
    ({**BASE, "mqtt": {"keepalive": 70000}}, r"\[mqtt\] keepalive = 70000 is out of range: .* from 0 to 65535"),
    ({**BASE, "threads": -1}, r"threads = -1 is out of range: threads must be 0 or more"),
    ({**BASE, "server": {"header_timeout": "10"}}, r"\[server\] header_timeout must be .* seconds, not \"10\""),
    ({**BASE, "server": {"max_rows": "10"}}, r"\[server\] max_rows must be a positive whole number, not \"10\""),
    ({**BASE, "mqtt": {"password": "a", "password_file": "b"}}, r"\[mqtt\] has both password and password_file"),
    ({**BASE, "state_dir": ""}, r'state_dir = "" is empty; give it'),
    ({**BASE, "trust": {"public_key": ""}}, r'\[trust\] public_key = "" is empty'),
    ({**BASE, "update": {"collector": "http://"}}, r"\[update\] collector 'http://' is not an http\(s\) URL"),
    ({"device_id": "d", "state_dir": "s"}, r'missing \[trust\] public_key; add public_key = "..." under \[trust\]'),
]


@pytest.mark.parametrize("doc, says", MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_each_mistake_is_one_line_naming_the_key_and_the_fix(doc, says, tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, base=tmp_path, source="agent.toml")
    message = str(caught.value)
    assert re.search(says, message), message
    assert "\n" not in message and message.startswith("agent.toml: ") and caught.value.fix, message


def test_a_missing_password_file_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEKIT_MQTT_PASSWORD", raising=False)
    doc = {**BASE, "mqtt": {"url": "mqtt://h:1883", "username": "d", "password_file": "mqtt.password"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, base=tmp_path, source="agent.toml")
    assert str(caught.value) == (
        f"agent.toml: [mqtt] password_file {str(tmp_path / 'mqtt.password')!r} does not exist; "
        "create it holding the password, fix the path, or set EDGEKIT_MQTT_PASSWORD instead"
    )
    (tmp_path / "mqtt.password").mkdir()
    with pytest.raises(ConfigError, match="password_file .* is a directory; name the file holding the password"):
        parse_config(doc, base=tmp_path)
    (tmp_path / "mqtt.password").rmdir()
    (tmp_path / "mqtt.password").write_text("s3cret\n")
    assert parse_config(doc, base=tmp_path).mqtt.password == "s3cret"


def test_real_values_are_read_as_they_were(tmp_path):
    config = parse_config(
        {
            **BASE,
            "threads": 2,
            "mqtt": {"url": "mqtt://h:1883", "streaming": True, "keepalive": 60, "state_seconds": 60},
            "server": {"listen": "0.0.0.0:0", "header_timeout": 5, "max_rows": 10},
            "monitor": {"window_rows": 500.0, "window_seconds": 30, "max_cpu_fraction": 0, "keep_acked_seconds": 0},
            "capture": {"enabled": False, "rate": 1, "drifted_rows": 0},
        },
        base=tmp_path,
    )
    assert config.mqtt.streaming is True and config.mqtt.keepalive == 60 and config.threads == 2
    assert config.server.address == ("0.0.0.0", 0) and config.server.limits.header_timeout == 5.0
    assert config.monitor.window_rows == 500 and isinstance(config.monitor.window_rows, int)
    assert config.monitor.window_seconds == 30.0 and config.monitor.keep_acked_seconds == 0
    assert parse_config({**BASE, "server": {"listen": ""}, "mqtt": {"url": ""}}).server.listen is None
    # worked before the strict reader, and still do: a bare port binds 127.0.0.1; threads = 0 is the runtime's default
    assert parse_config({**BASE, "server": {"listen": "8470"}}).server.address == ("127.0.0.1", 8470)
    assert parse_config({**BASE, "threads": 0}).threads == 0


def test_the_collector_takes_a_bare_http_port_as_before():
    from edgekit.fleet.config import CollectorConfig

    assert CollectorConfig(broker="mqtt://127.0.0.1:1883", db="fleet.db", http="8480").http == "8480"


def _toml_blocks(text: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", text, flags=re.S)


def test_the_documented_agent_toml_examples_are_read(tmp_path, monkeypatch):
    """README's agent.toml and the one in config.py's docstring, as a user would copy them."""
    import device_agent.config as module

    monkeypatch.delenv("EDGEKIT_MQTT_PASSWORD", raising=False)
    examples = [block for block in _toml_blocks((ROOT / "README.md").read_text()) if "[monitor]" in block]
    examples.append(module.__doc__.split("::\n\n", 1)[1].split("\n\nRelative paths", 1)[0])
    assert len(examples) >= 2
    for example in examples:
        doc = tomllib.loads("\n".join(line[4:] if line.startswith("    ") else line for line in example.splitlines()))
        config = parse_config(doc, base=tmp_path)
        assert config.device_id and config.monitor.window_rows == 1000


def test_what_emulate_writes_is_read(tmp_path):
    """The emulator's document, built by its own code, with every key it may set (capture, update, feedback)."""
    from edgekit import tomlfile
    from edgekit.local.emulate import DriftSpec, _agent_toml

    doc = _agent_toml(
        "dev-00",
        0,
        fleet="f",
        window_rows=200,
        window_seconds=2.5,
        broker="mqtt://127.0.0.1:1883",
        http_port_base=8470,
        data=str(tmp_path / "test.npz"),
        rows_per_second=50.0,
        drift=DriftSpec(feature="f0", shift=2.0, after=100, devices=frozenset({0})),
        feature="pixel_0_0",
        feedback=0.25,
    )
    doc["capture"] = {"enabled": True, "rate": 0.5, "drifted_rows": 10, "max_mb": 5}
    doc["update"] = {"token_file": "collector.token", "collector": "http://127.0.0.1:8480"}
    (tmp_path / "collector.token").write_text("t\n")
    path = tomlfile.write(tmp_path / "agent.toml", doc)
    config = load_config(path)
    assert config.emulate.feedback == 0.25 and config.capture.rate == 0.5 and config.update.token == "t"


def test_what_flash_writes_is_read(tmp_path, monkeypatch):
    """The flasher's agent.toml, with MQTT credentials and the collector's token (its fullest form)."""
    from edgekit.local.flash import Flasher, FlashPlan

    monkeypatch.delenv("EDGEKIT_MQTT_PASSWORD", raising=False)
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "pi-1.password").write_text("pw\n")
    plan = FlashPlan(
        bundle=Path("b"),
        device_id="pi-1",
        fleet="f",
        broker="mqtt://10.0.0.5:1883",
        pubkey=Path("k"),
        target="dir:/x",
        credentials=tmp_path / "creds",
        collector_token="t",
        collector_url="http://10.0.0.5:8480",
    )
    staging, root = tmp_path / "staging", tmp_path / "root"
    staging.mkdir()
    flasher = Flasher(plan, dry_run=True, say=lambda _line: None)
    monkeypatch.setattr(flasher, "_build_edgekit_wheel", lambda wheels: None)  # the wheel is not read here
    files = flasher._stage(staging, str(root))
    (root / "etc").mkdir(parents=True)
    for name in ("mqtt.password", "collector.token"):
        (root / "etc" / name).write_text(files[f"etc/{name}"].read_text())
    config = load_config(staging / "agent.toml")
    assert config.mqtt.username == "pi-1" and config.mqtt.password == "pw" and config.update.token == "t"


def test_edge_agent_run_refuses_a_bad_config_in_one_line(tmp_path):
    """Through the real entry point: exit 2, one line on stderr, no traceback, and nothing started."""
    path = tmp_path / "agent.toml"
    cases = {
        "[monitor]\nwindow_row = 1000\n": "[monitor] has no setting 'window_row'; did you mean window_rows?",
        '[mqtt]\nstreaming = "false"\n': '[mqtt] streaming = "false" is not true or false',
        '[server]\nlisten = "127.0.0.1:99999"\n': "is not host:port with a port from 0 to 65535",
        "[monitr]\nwindow_rows = 10\n": "has no table [monitr]; did you mean [monitor]?",
    }
    for table, says in cases.items():
        path.write_text(f'device_id = "d"\nstate_dir = "state"\n[trust]\npublic_key = "k.pub"\n{table}')
        done = subprocess.run(
            [sys.executable, "-m", "device_agent", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"edge-agent: {path}: ") and says in done.stderr, done.stderr
        assert not (tmp_path / "state").exists()
