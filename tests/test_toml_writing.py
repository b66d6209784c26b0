"""Every TOML file edgekit writes says exactly what it was given: a value with a quote, a backslash, a newline
or non-ASCII text (a path, a broker URL with a password, a label) neither breaks the file nor changes it, and
the reader that consumes each file (the agent's config, the collector's alerts, preprocessing) accepts it."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from device_agent.config import load_config, tomllib
from device_agent.preprocess import Preprocess
from device_agent.tensors import TensorSpec
from edgekit import tomlfile

# Everything a hand-written f-string got wrong: a quote, a backslash, a newline, a control character,
# accented text and a character outside the BMP (json.dumps writes that as a surrogate pair TOML refuses).
AWKWARD = 'q"uote \\back\nline\tcafé 😀 \x01'


def awkward_dir(tmp_path: Path) -> Path:
    """A real directory whose name holds every awkward character a file name may (no NUL, no '/')."""
    directory = tmp_path / AWKWARD.replace("\x01", "")
    directory.mkdir(parents=True)
    return directory


def test_the_helper_heads_the_file_with_comments_leaves_none_out_and_writes_utf8(tmp_path):
    doc = {"name": AWKWARD, "unset": None, "table": {"list": [1, 2.5, AWKWARD], "gone": None, "deep": {"x": None}}}
    path = tomlfile.write(tmp_path / "a.toml", doc, comment="first line\nsecond line")
    raw = path.read_bytes()
    assert raw.startswith(b"# first line\n# second line\n")
    assert "café 😀".encode() in raw  # UTF-8, not escaped
    assert tomllib.loads(raw.decode("utf-8")) == {"name": AWKWARD, "table": {"list": [1, 2.5, AWKWARD], "deep": {}}}
    assert not list(tmp_path.glob(".a.toml.*"))  # written atomically: no temporary file left behind


def test_emulate_writes_an_agent_toml_the_agent_reads_back_unchanged(bundle, keypair, digits, tmp_path):
    """Failed before tomlfile: ``data = "{path}"`` with a quote in the path was not TOML."""
    from edgekit.local.emulate import DriftSpec, prepare_devices

    data = awkward_dir(tmp_path) / "rows.csv"
    shutil.copy(digits.test, data)
    broker = 'mqtt://emu:pä"ss\\wörd😀@127.0.0.1:1883'
    collector = 'http://127.0.0.1:8480/c"o\\llector/é'
    (config_path,) = prepare_devices(
        devices=1,
        bundle=str(bundle),
        pubkey=str(keypair[1]),
        broker=broker,
        data=str(data),
        fleet="f1",
        window_rows=300,
        window_seconds=30.0,
        rows_per_second=50.0,
        drift=DriftSpec.parse("feature=f20,shift=8,after=5,devices=0"),
        state_dir=str(tmp_path / "fleet"),
        http_port_base=None,
        collector_token="tok",
        collector_url=collector,
        feedback=0.5,
        capture={"enabled": True, "rate": 0.25},
    )
    config = load_config(config_path)
    assert config.emulate.data == data.resolve() and config.emulate.data.is_file()
    assert (config.emulate.feedback, config.emulate.drift_shift, config.emulate.drift_after) == (0.5, 8.0, 5)
    assert config.mqtt.url == broker and config.update.collector == collector and config.update.token == "tok"
    assert config.capture.enabled and config.capture.rate == 0.25
    assert config.state_dir == config_path.parent / "state" and config.server.listen == "127.0.0.1:0"
    doc = tomllib.loads(config_path.read_text(encoding="utf-8"))
    assert list(doc) == ["device_id", "fleet", "state_dir", "trust", "monitor", "server", "mqtt", "emulate"] + [
        "capture",
        "update",
    ]


def test_flash_writes_an_agent_toml_the_agent_reads_back_unchanged(tmp_path, monkeypatch):
    """Failed before tomlfile: the install root went into ``state_dir = "{root}/state"`` unescaped."""
    from edgekit.local.flash import Flasher, FlashPlan

    monkeypatch.delenv("EDGEKIT_DEVICE_TOKEN", raising=False)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "d1.password").write_text("pw\n")
    broker = 'mqtts://d1:pä"ss\\@broker.example:8883'
    collector = 'https://collector.example/p"a\\th/é'
    plan = FlashPlan(
        bundle=Path("b"),
        device_id="d1",
        fleet="f1",
        broker=broker,
        pubkey=Path("k"),
        target="dir:/x",
        credentials=credentials,
        device_token="device-token",
        collector_url=collector,
    )
    root = awkward_dir(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    said: list[str] = []
    files = Flasher(plan, dry_run=True, say=said.append)._stage(staging, str(root))
    for relative in ("etc/agent.toml", "etc/mqtt.password", "etc/collector.token"):
        (root / relative).parent.mkdir(exist_ok=True)
        shutil.copy(files[relative], root / relative)
    config = load_config(root / "etc" / "agent.toml")
    assert (config.device_id, config.fleet, config.state_dir, config.public_key) == (
        "d1",
        "f1",
        root / "state",
        root / "etc" / "trusted.pub",
    )
    assert (config.mqtt.url, config.mqtt.username, config.mqtt.password) == (broker, "d1", "pw")
    assert (config.update.token, config.update.collector) == ("device-token", collector)
    assert any("[dry-run] agent.toml:" in line for line in said)
    # without a token the file has no [update] table at all (an empty one would say nothing either)
    bare = tmp_path / "bare"
    bare.mkdir()
    Flasher(replace(plan, credentials=None, device_token=""), dry_run=True, say=said.append)._stage(bare, "/opt/e")
    doc = tomllib.loads((bare / "agent.toml").read_text(encoding="utf-8"))
    assert "update" not in doc and doc["mqtt"] == {"url": broker}


def test_tensor_fixture_preprocessing_files_round_trip_and_load(tmp_path):
    """Failed before tomlfile: strings were written as ``f'"{value}"'``, with no escaping at all."""
    from edgekit.local.tensor_fixtures import MOBILENET_IMAGE, _write_toml

    path = _write_toml(tmp_path / "odd.toml", "table", {"label": AWKWARD, "labels": [AWKWARD, "b"]}, "a\ncomment")
    assert tomllib.loads(Path(path).read_text(encoding="utf-8")) == {
        "table": {"label": AWKWARD, "labels": [AWKWARD, "b"]}
    }
    spec = TensorSpec("pixels", "float32", (None, 3, 32, 32), "NCHW", "image")
    image = _write_toml(tmp_path / "image.toml", "image", MOBILENET_IMAGE, "MobileNet's ImageNet normalisation")
    assert Preprocess.from_toml(image, spec).settings == Preprocess.from_dict({"image": MOBILENET_IMAGE}, spec).settings


def test_promote_gives_the_candidate_the_champions_preprocessing_unchanged(tmp_path):
    """Failed before tomlfile: promote escaped quotes and backslashes, not a newline or a control character."""
    from edgekit.bundle.promote import _champion_preprocessing

    def champion_with(preprocess):
        return SimpleNamespace(model=SimpleNamespace(input=SimpleNamespace(preprocess=preprocess)))

    peek = SimpleNamespace(input=SimpleNamespace(tensor=object(), preprocess=None))
    spec = TensorSpec("pixels", "float32", (None, 3, 32, 32), "NCHW", "image")
    pinned = Preprocess.from_dict({"image": {"color": "RGB", "resize": "crop", "mean": [0.5] * 3}}, spec).to_dict()
    path = _champion_preprocessing(peek, champion_with(pinned), tmp_path)
    assert Preprocess.from_toml(path, spec).to_dict() == pinned
    odd = {"image": {"note": AWKWARD, "unset": None, "nested": {"text": AWKWARD, "unset": None}}}
    path = _champion_preprocessing(peek, champion_with(odd), tmp_path)
    assert tomllib.loads(Path(path).read_text(encoding="utf-8")) == {
        "image": {"note": AWKWARD, "nested": {"text": AWKWARD}}
    }


def test_the_demos_alerts_toml_round_trips_and_the_collector_loads_it(tmp_path):
    """Failed before tomlfile: json.dumps wrote 😀 as a surrogate pair (\\ud83d\\ude00), which TOML refuses."""
    from edgekit.fleet.alerts import load_alert_config
    from edgekit.local.demo_loop import write_alerts

    folder = awkward_dir(tmp_path)
    paths = {name: folder / f"{name}.file" for name in ("champion", "gate", "train", "key")}
    for path in paths.values():
        path.write_text("x")
    alerts = write_alerts(tmp_path, **paths)
    doc = tomllib.loads(alerts.read_text(encoding="utf-8"))
    assert doc["rules"] == {"drift_windows": 3, "offline_seconds": 3600, "accuracy_min_labels": 100}
    assert doc["sinks"]["log"] is False and doc["sinks"]["retrain"]["rollout"]["devices"] == "{device}"
    _, sinks = load_alert_config(alerts)
    retrain = sinks.retrain
    assert (retrain.champion, retrain.key) == (str(paths["champion"]), str(paths["key"]))
    assert (retrain.data, retrain.trained_on) == ((str(paths["gate"]),), (str(paths["train"]),))
