"""The retrain sink (issue 19): an opened drift alert runs the user's training command on the field samples,
``promote`` gates the model, and a winner is rolled out with shadow gating, each step on the alert's timeline.

The pipeline tests run the real store, the real ``promote`` and the real rollout controller (its MQTT publish
is a list), with a fake command: a small Python script written here that hands back a model fitted in the
module fixture. A weak digits champion (40 rows) is built once, in float32 so the gate runs in a second or two.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from device_agent.signing import load_public_key
from device_agent.wsgi import Request
from edgekit.build.convert import convert_model
from edgekit.bundle.package import build_bundle
from edgekit.errors import EdgekitError
from edgekit.fleet.alerts import AlertEngine, AlertRules, AlertSinks, load_alert_config
from edgekit.fleet.retrain import Retrainer, RetrainSink, parse_retrain
from edgekit.fleet.retrain_steps import RETRAIN_SCHEMA, row_in_holdout
from edgekit.fleet.rollouts import RolloutController
from edgekit.fleet.store import PostgresStore, SqliteStore
from edgekit.fleet.web import route

FAKE = """
import json, sys, time
from pathlib import Path
doc = json.load(sys.stdin)
Path(doc["workdir"], "stdin.json").write_text(json.dumps(doc))
how = sys.argv[1]
if how == "fail":
    print("training blew up: out of memory", file=sys.stderr)
    sys.exit(3)
if how == "sleep":
    time.sleep(60)
if how == "nothing":
    sys.exit(0)
print("training on", doc["samples"])
print(sys.argv[2])
"""


def _fit(X, y, rows=None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X[:rows], y[:rows])


@pytest.fixture(scope="module")
def world(digits, keypair, tmp_path_factory):
    """The champion (digits v3, weak), a better and a worse candidate, and the fake command."""
    import joblib

    directory = tmp_path_factory.mktemp("retrain")
    train = np.load(digits.train)
    X, y = train["X"], train["y"]
    shuffled = np.random.default_rng(0).permutation(y)
    for name, model in {"weak": _fit(X, y, 40), "good": _fit(X, y), "worse": _fit(X, shuffled)}.items():
        joblib.dump(model, directory / f"{name}.joblib")
    convert_model(str(directory / "weak.joblib"), str(directory / "weak.onnx"), names_from=str(digits.train))
    champion = directory / "digits-3.edgebundle"
    build_bundle(
        str(directory / "weak.onnx"),
        name="digits",
        version=3,
        baseline_path=str(digits.train),
        key_path=str(keypair[0]),
        output=str(champion),
    )
    (directory / "fake.py").write_text(FAKE)
    return SimpleNamespace(dir=directory, champion=champion, fake=directory / "fake.py")


def _sink(world, digits, tmp_path, how="good", **overrides) -> RetrainSink:
    model = str(world.dir / f"{how}.joblib")
    values = {
        "command": (sys.executable, str(world.fake), how, model),
        "champion": str(world.champion),
        "data": (str(digits.test_csv),),
        "trained_on": (str(digits.train),),
        "workdir": str(tmp_path / "work"),
        "cwd": str(tmp_path),
        "samples_timeout": 5.0,
        "timeout": 60.0,
        **overrides,
    }
    return RetrainSink(**values)


class Fleet:
    """A store with one device that ran digits v3, an opened drift alert, and the field rows it uploads."""

    def __init__(self, store, digits, keypair, tmp_path, *, labelled=True):
        self.store, self.published = store, []
        self.labelled = labelled
        store.record_state(
            {"device": "dev1", "fleet": "f", "online": True, "model": {"name": "digits", "version": 3}}, 1.0
        )
        test = np.load(digits.test)
        names = [str(n) for n in test["feature_names"]]
        self.header = {"models": {"digits:3": {"features": names, "kind": "matrix"}}}
        self.rows = [
            {
                "id": f"boot-{n}",
                "model": "digits",
                "version": 3,
                "seq": 1 + n // 100,
                "ts": 100.0 + n,
                "input": test["X"][n].tolist(),
                "prediction": {"label": 0},
                "label": int(test["y"][n]) if labelled else None,
            }
            for n in range(240)
        ]
        self.rollouts = RolloutController(
            store,
            lambda topic, payload, retain=False: self.published.append(topic) or True,
            tmp_path / "bundles",
            lambda: "http://127.0.0.1:1",
            trusted_key=load_public_key(keypair[1]),
        )
        self.asked = []

    def ask_samples(self, device: str) -> str:
        upload = f"u{len(self.asked)}"
        self.asked.append(device)
        self.store.issue_upload(upload, device, {"since": None, "drifted_only": False}, 2.0)
        self.store.complete_upload(upload, device, self.rows, {"rows": len(self.rows), **self.header}, 3.0)
        return upload

    def alert(self, subject="pixel_3_4", at=10.0, rule="drift") -> dict:
        evidence = {"device": "dev1", "fleet": "f", "model": "digits", "model_version": 3, "feature": subject}
        assert self.store.open_alert(rule, "dev1", subject, f"{subject} drifted", evidence, at)
        alert = {"state": "open", "rule": rule, "device": "dev1", "subject": subject, "message": "m"}
        return {**alert, "evidence": evidence, "at": at}

    def retrainer(self, sink, clock=time.time) -> Retrainer:
        return Retrainer(sink, self.store, ask_samples=self.ask_samples, rollouts=self.rollouts, clock=clock)


@pytest.fixture
def fleet(digits, keypair, tmp_path):
    store = SqliteStore(tmp_path / "fleet.db")
    yield Fleet(store, digits, keypair, tmp_path)
    store.close()


def _steps(store, alert_id: int) -> list[tuple[str, str]]:
    return [(s["step"], s["status"]) for s in store.timeline(alert_id)["steps"]]


# -- the pipeline -------------------------------------------------------------------------------------------------


def test_a_better_model_is_promoted_stored_and_rolled_out_with_shadow_gating(fleet, world, digits, keypair, tmp_path):
    sink = parse_retrain(
        {"command": "x", "rollout": {"waves": "50%,100%", "shadow_rows": 150, "abort_on": "agreement<0.9"}},
        path=tmp_path / "alerts.toml",
    )
    sink = _sink(world, digits, tmp_path, key=str(keypair[0]), rollout=sink.rollout)
    alert = fleet.alert()
    assert fleet.retrainer(sink).run(alert) == "succeeded"
    alert_id = fleet.store.alert_id("drift", "dev1", "pixel_3_4", 10.0)
    assert _steps(fleet.store, alert_id) == [
        ("triggered", "ok"),
        ("champion", "ok"),
        ("samples requested", "ok"),
        ("samples exported", "ok"),
        ("command started", "ok"),
        ("command finished", "ok"),
        ("promote", "ok"),
        ("bundle stored", "ok"),
        ("rollout started", "ok"),
    ]
    steps = {s["step"]: s for s in fleet.store.timeline(alert_id)["steps"]}
    exported = steps["samples exported"]["detail"]
    held = sum(row_in_holdout(f"boot-{n}", 0.25) for n in range(240))
    assert exported["rows"] == 240 - held and exported["holdout_rows"] == held > 20
    stdin = json.loads((tmp_path / "work" / f"alert-{alert_id}" / "stdin.json").read_text())
    assert stdin["schema"] == RETRAIN_SCHEMA and stdin["alert"]["id"] == alert_id
    assert stdin["samples"] == exported["path"] and stdin["evidence"]["feature"] == "pixel_3_4"
    assert stdin["trained_on"] == [str(digits.train)] and stdin["champion"] == str(world.champion)
    assert steps["command finished"]["detail"]["exit_code"] == 0
    report = steps["promote"]["detail"]
    assert report["promoted"] and report["version"] == 4
    assert {s["file"] for s in report["scores"]} == {"digits_test.csv", "field_holdout.csv"}
    rollout_id = steps["rollout started"]["detail"]["rollout"]
    status = fleet.rollouts.status(rollout_id)
    assert (status["name"], status["version"], status["fleet"]) == ("digits", 4, "f")
    row, _ = fleet.store.rollout(rollout_id)
    spec = json.loads(row["spec"])
    assert spec["shadow_rows"] == 150 and spec["waves"] == [0.5, 1.0] and spec["abort_on"] == ["agreement<0.9"]
    assert spec["revert"]["instruction"]["rollout"] == rollout_id  # signed by the sink's key
    assert fleet.store.timeline(alert_id)["run"]["state"] == "succeeded"


def test_a_worse_model_keeps_the_champion_and_nothing_is_rolled_out(fleet, world, digits, keypair, tmp_path):
    sink = _sink(world, digits, tmp_path, "worse", key=str(keypair[0]), rollout=None)
    assert fleet.retrainer(sink).run(fleet.alert()) == "kept"
    alert_id = fleet.store.alert_id("drift", "dev1", "pixel_3_4", 10.0)
    last = fleet.store.timeline(alert_id)["steps"][-1]
    assert (last["step"], last["status"]) == ("promote", "muted")
    assert not last["detail"]["promoted"] and last["message"].startswith("kept digits v3: ")
    assert fleet.rollouts.list() == [] and fleet.store.bundles() == []
    assert not list((tmp_path / "work" / f"alert-{alert_id}").glob("*.edgebundle"))


def test_without_a_key_the_sink_stops_after_the_command_with_the_commands_to_run(fleet, world, digits, tmp_path):
    assert fleet.retrainer(_sink(world, digits, tmp_path)).run(fleet.alert()) == "awaiting"
    timeline = fleet.store.timeline(fleet.store.alert_id("drift", "dev1", "pixel_3_4", 10.0))
    last = timeline["steps"][-1]
    assert last["step"] == "awaiting an operator" and "no signing key" in last["message"]
    promote, rollout = last["detail"]["commands"]
    assert promote.startswith("edgekit promote ") and f"--champion {world.champion}" in promote
    assert "field_holdout.csv" in promote and "--trained-on" in promote and "--key KEY" in promote
    assert rollout.startswith("edgekit rollout start ") and "--fleet f" in rollout and "--shadow-rows 200" in rollout
    assert timeline["run"]["state"] == "awaiting" and fleet.store.bundles() == []


def test_a_flapping_alert_retrains_once_per_cooldown(fleet, world, digits, tmp_path):
    now = [1000.0]
    retrainer = fleet.retrainer(_sink(world, digits, tmp_path, cooldown=3600.0), clock=lambda: now[0])
    assert retrainer.run(fleet.alert("pixel_3_4", at=10.0)) == "awaiting"
    now[0] += 600
    fleet.store.close_alert("drift", "dev1", "pixel_3_4", 11.0)
    assert retrainer.run(fleet.alert("pixel_3_4", at=12.0)) == "skipped"  # reopened: held back
    assert retrainer.run(fleet.alert("pixel_4_4", at=13.0)) == "skipped"  # another feature, same device and model
    skipped = fleet.store.timeline(fleet.store.alert_id("drift", "dev1", "pixel_4_4", 13.0))
    assert [s["step"] for s in skipped["steps"]] == ["triggered", "skipped"]
    assert "cooldown holds until" in skipped["steps"][-1]["message"] and len(fleet.asked) == 1
    now[0] += 3600  # an hour after the skipped ones: counted from the run that retrained, not from them
    assert retrainer.run(fleet.alert("pixel_6_6", at=15.0)) == "awaiting" and len(fleet.asked) == 2


def test_a_failing_command_and_a_command_past_its_timeout_are_recorded(fleet, world, digits, tmp_path):
    failing = fleet.retrainer(_sink(world, digits, tmp_path, "fail", cooldown=0.0))
    assert failing.run(fleet.alert("a", at=10.0)) == "failed"
    last = fleet.store.timeline(fleet.store.alert_id("drift", "dev1", "a", 10.0))["steps"][-1]
    assert (last["step"], last["status"], last["message"]) == ("command finished", "bad", "the command exited 3")
    assert "out of memory" in last["detail"]["stderr_tail"] and last["detail"]["exit_code"] == 3

    silent = fleet.retrainer(_sink(world, digits, tmp_path, "nothing", cooldown=0.0))
    assert silent.run(fleet.alert("b", at=11.0)) == "failed"
    last = fleet.store.timeline(fleet.store.alert_id("drift", "dev1", "b", 11.0))["steps"][-1]
    assert "printed no model file path" in last["message"]

    sleeping = fleet.retrainer(_sink(world, digits, tmp_path, "sleep", cooldown=0.0, timeout=1.0))
    began = time.monotonic()
    assert sleeping.run(fleet.alert("c", at=12.0)) == "failed"
    assert time.monotonic() - began < 30  # killed at its timeout, not left to sleep its minute
    last = fleet.store.timeline(fleet.store.alert_id("drift", "dev1", "c", 12.0))["steps"][-1]
    assert last["message"] == "the command was killed: it ran past the timeout of 1 s"
    assert last["detail"]["exit_code"] is None


def test_unlabelled_field_rows_and_an_unknown_champion_stop_with_one_reason(digits, keypair, world, tmp_path):
    store = SqliteStore(tmp_path / "fleet.db")
    try:
        fleet = Fleet(store, digits, keypair, tmp_path, labelled=False)
        assert fleet.retrainer(_sink(world, digits, tmp_path, cooldown=0.0)).run(fleet.alert("a", at=1.0)) == "failed"
        last = store.timeline(store.alert_id("drift", "dev1", "a", 1.0))["steps"][-1]
        assert "none has a label yet" in last["message"] and "feedback" in last["message"]
        sink = _sink(world, digits, tmp_path, champion=None, cooldown=0.0)  # the bundle the device runs: not here
        assert fleet.retrainer(sink).run(fleet.alert("b", at=2.0)) == "failed"
        last = store.timeline(store.alert_id("drift", "dev1", "b", 2.0))["steps"][-1]
        assert last["step"] == "champion" and "never uploaded to this collector" in last["message"]
    finally:
        store.close()


def test_the_alert_engine_queues_opened_alerts_of_the_sinks_rules_for_its_worker(fleet, world, digits, tmp_path):
    retrainer = fleet.retrainer(_sink(world, digits, tmp_path))
    engine = AlertEngine(fleet.store, AlertRules(), AlertSinks(log=False, retrain=retrainer.sink))
    engine.retrain = retrainer
    engine._notify("open", "latency_p99", "dev1", "latency", "slow", {"model": "digits"}, 5.0)  # not its rule
    engine._notify("closed", "drift", "dev1", "x", "cleared", {"model": "digits"}, 5.0)  # closing: nothing to do
    assert retrainer.idle()
    retrainer.start()
    try:
        alert = fleet.alert()
        engine._notify("open", "drift", "dev1", "pixel_3_4", "m", alert["evidence"], 10.0)
        deadline = time.monotonic() + 30
        while not retrainer.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        retrainer.stop()
    assert fleet.store.retrain_runs()[0]["state"] == "awaiting" and len(fleet.store.retrain_runs()) == 1


# -- the page and the API -------------------------------------------------------------------------------------------


def _get(fleet, path: str):
    collector = SimpleNamespace(store=fleet.store, alerts=None, rollouts=fleet.rollouts, config=None, ingestor=None)
    return route(collector, Request("GET", path, {}, {}))


def test_the_timeline_is_on_the_alerts_page_and_its_api(fleet, world, digits, tmp_path):
    fleet.retrainer(_sink(world, digits, tmp_path, "fail")).run(fleet.alert())
    alert_id = fleet.store.alert_id("drift", "dev1", "pixel_3_4", 10.0)
    doc = json.loads(_get(fleet, f"/api/alerts/{alert_id}/timeline").body)
    assert doc["alert"]["id"] == alert_id and doc["alert"]["rule"] == "drift" and doc["run"]["state"] == "failed"
    assert [s["step"] for s in doc["steps"]][-2:] == ["command started", "command finished"]
    page = _get(fleet, f"/alerts/{alert_id}/timeline")
    html = page.body.decode()
    assert page.status == 200 and "samples exported" in html and "the command exited 3" in html
    assert "out of memory" in html and f"/api/alerts/{alert_id}/timeline" in html
    runs = _get(fleet, "/retrains").body.decode()
    assert f"/alerts/{alert_id}/timeline" in runs and "failed" in runs
    fleet.alert("untouched", at=20.0)
    other = fleet.store.alert_id("drift", "dev1", "untouched", 20.0)
    assert "did not act on this alert" in _get(fleet, f"/alerts/{other}/timeline").body.decode()
    assert json.loads(_get(fleet, f"/api/alerts/{other}/timeline").body)["run"] is None
    assert _get(fleet, "/api/alerts/999999/timeline").status == 404


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_timeline_records_on_every_store(request, tmp_path, kind):
    store = (
        SqliteStore(tmp_path / "f.db") if kind == "sqlite" else PostgresStore(request.getfixturevalue("postgres_url"))
    )
    try:
        store.open_alert("drift", "d", "x", "m", {"a": 1}, 5.5)
        alert_id = store.alert_id("drift", "d", "x", 5.5)
        assert store.alert(alert_id)["evidence"] == {"a": 1} and store.alert_id("drift", "d", "x", 6.0) is None
        assert store.start_retrain(alert_id, "drift", "d", "digits", 10.0)
        assert not store.start_retrain(alert_id, "drift", "d", "digits", 11.0)  # once per alert
        store.add_timeline_step(alert_id, "triggered", "ok", "m", {"k": [1, 2]}, 10.5)
        store.add_timeline_step(alert_id, "command finished", "bad", "exited 3", {}, 12.0)
        store.finish_retrain(alert_id, "failed", "exited 3", 12.5)
        timeline = store.timeline(alert_id)
        assert [s["step"] for s in timeline["steps"]] == ["triggered", "command finished"]
        assert timeline["steps"][0]["detail"] == {"k": [1, 2]} and timeline["run"]["finished_at"] == 12.5
        assert store.last_retrain("d", "digits", before=0)["alert"] == alert_id
        assert store.last_retrain("d", "digits", before=alert_id) is None
        assert store.retrain_runs()[0]["state"] == "failed" and store.timeline(alert_id + 1) is None
    finally:
        store.close()


# -- alerts.toml --------------------------------------------------------------------------------------------------


def test_the_retrain_sink_is_read_from_alerts_toml(tmp_path, keypair):
    path = tmp_path / "alerts.toml"
    path.write_text(
        f"""
[sinks]
log = false
[sinks.retrain]
rules = ["drift", "estimated_accuracy_drop"]
command = "python retrain.py --train 'my data.npz'"
data = ["gate.csv"]
trained_on = "train.npz"
min_gain = 0.005
key = "{keypair[0]}"
timeout = "10m"
cooldown = "2h"
[sinks.retrain.rollout]
fleet = "pis"
waves = "10%,100%"
"""
    )
    _, sinks = load_alert_config(path)
    sink = sinks.retrain
    assert sink.command == ("python", "retrain.py", "--train", "my data.npz") and sink.cwd == str(tmp_path)
    assert sink.rules == ("drift", "estimated_accuracy_drop") and sink.data == (str(tmp_path / "gate.csv"),)
    assert sink.trained_on == (str(tmp_path / "train.npz"),) and sink.min_gain == 0.005
    assert (sink.timeout, sink.cooldown, sink.holdout, sink.key) == (600.0, 7200.0, 0.25, str(keypair[0]))
    assert sink.rollout.fleet == "pis" and sink.rollout.spec.waves == (0.1, 1.0)
    assert sink.rollout.spec.shadow_rows == 200 and [str(r) for r in sink.rollout.spec.abort_on] == ["failed>20%"]
    path.write_text('[sinks]\nlog = true\n[sinks.retrain]\ncommand = ["python", "r.py"]\n')
    sink = load_alert_config(path)[1].retrain
    assert sink.rules == ("drift",) and sink.key is None and sink.rollout is None and sink.champion is None
    assert load_alert_config(None)[1].retrain is None


@pytest.mark.parametrize(
    "body, said",
    [
        ("rules = ['drift']", "[sinks.retrain] needs command"),
        ("command = 'x'\nschedule = 1", "unknown keys ['schedule']"),
        ("command = 'x'\nholdout = 1.5", "holdout 1.5 is outside 0..1"),
        ("command = 'x'\nmin_gain = 2", "min_gain 2.0 is outside 0..1"),
        ("command = 'x'\ntimeout = 'soon'", "duration 'soon' is not understood"),
        ("command = 'x'\nkey = 'missing.key'", "is not a file"),
        ("command = 'x'\nquantize = 'int4'", "quantize 'int4' is not auto, int8 or none"),
        ("command = 'x'\n[sinks.retrain.rollout]\nwaves = '50%'", "must rise and end at 100%"),
        ("command = 'x'\n[sinks.retrain.rollout]\nabort_on = 'agreement>0.9'", "points the wrong way"),
        ("command = 'x'\n[sinks.retrain.rollout]\nspeed = 1", "rollout has unknown keys ['speed']"),
    ],
)
def test_a_bad_retrain_sink_is_one_line_naming_the_problem(tmp_path, body, said):
    path = tmp_path / "alerts.toml"
    path.write_text("[sinks.retrain]\n" + body + "\n")
    with pytest.raises(EdgekitError) as caught:
        load_alert_config(path)
    message = str(caught.value)
    assert said in message and "\n" not in message and str(path) in message and "[sinks.retrain]" in message


def test_the_example_script_trains_on_the_training_data_and_the_field_rows(digits, tmp_path):
    import subprocess

    import joblib

    test = np.load(digits.test)
    names = [str(n) for n in test["feature_names"]]
    field = tmp_path / "field.csv"
    lines = ["id,device,model,version,seq,ts,drifted,prediction," + ",".join(names) + ",label"]
    for n in range(60):
        label = "" if n % 3 == 0 else str(int(test["y"][n]))
        lines.append(f"b-{n},dev1,digits,3,1,1.0,,{{}}," + ",".join(str(v) for v in test["X"][n]) + f",{label}")
    field.write_text("\n".join(lines) + "\n")
    doc = {"schema": RETRAIN_SCHEMA, "samples": str(field), "trained_on": [str(digits.train)], "workdir": str(tmp_path)}
    script = Path(__file__).resolve().parent.parent / "scripts" / "retrain_digits.py"
    done = subprocess.run(
        [sys.executable, str(script)], input=json.dumps(doc).encode(), capture_output=True, timeout=120, check=True
    )
    printed = done.stdout.decode().strip().splitlines()[-1]
    assert printed == str((tmp_path / "model.joblib").resolve()) and "40 labelled field rows" in done.stderr.decode()
    model = joblib.load(printed)
    assert (model.predict(test["X"]) == test["y"]).mean() > 0.9


# -- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.network
def test_drift_on_a_device_retrains_promotes_and_rolls_out_without_a_person(
    tmp_path, broker, fleet_name, bundle, keypair, digits
):
    """A real collector (Mosquitto, HTTP) with the sink and the shipped example script; an in-process agent
    that keeps its rows and sees inverted digits with their labels: the drift alert's timeline ends with a
    rollout of digits v4 to the device's fleet."""
    from device_agent import Agent
    from edgekit.fleet.config import CollectorConfig
    from edgekit.fleet.service import FleetService
    from edgekit.local.broker import free_port
    from tests.agent_helpers import config_of, make_device
    from tests.fleet_helpers import wait

    script = Path(__file__).resolve().parent.parent / "scripts" / "retrain_digits.py"
    alerts = tmp_path / "alerts.toml"
    alerts.write_text(
        f"""[rules]
drift_windows = 1
[sinks.retrain]
command = {json.dumps([sys.executable, str(script)])}
data = ["{digits.test_csv}"]
trained_on = ["{digits.train}"]
max_regression = 0.05
quantize = "none"
key = "{keypair[0]}"
samples_timeout = "60s"
workdir = "work"
[sinks.retrain.rollout]
shadow_rows = 50
health_seconds = 1
"""
    )
    rules, sinks = load_alert_config(alerts)
    config = CollectorConfig(
        broker=broker.url,
        db=str(tmp_path / "fleet.db"),
        http=f"127.0.0.1:{free_port()}",
        client_id=f"c-{fleet_name}",
        api_token="field-token",
        trust=str(keypair[1]),
    )
    service = FleetService(config, alert_rules=rules, alert_sinks=sinks).start()
    try:
        service.rollouts.add_bundle(Path(bundle).read_bytes())  # the champion: the bundle the device runs
        device = make_device(
            tmp_path / "dev1", bundle, keypair[1], fleet=fleet_name, broker=broker.url, window_rows=100, http=False
        )
        url = service.http_url()
        with open(device, "a") as handle:
            handle.write(
                f'[capture]\nenabled = true\nrate = 1.0\n[update]\ncollector = "{url}"\ntoken = "field-token"\n'
            )
        test = np.load(digits.test)
        X, y = 16 - test["X"][:300], test["y"][:300]
        with Agent(config_of(device)).start(http=False) as agent:
            wait(lambda: any(d["online"] for d in service.store.status()), what="the device online")
            ids = agent.predict(X).ids
            for row_id, label in zip(ids, y, strict=True):
                agent.feedback(row_id, int(label))
            wait(lambda: _retrained(service.store), 120, "the retrain")
            runs = service.store.retrain_runs(limit=1000)
            # one run retrains; alerts opened with it are held by the cooldown (or, when two opened in the same
            # evaluation, one may still be waiting its turn: "running")
            (run,) = [r for r in runs if r["state"] not in ("skipped", "running")]
            assert all(f"retrained for alert {run['alert']} " in r["outcome"] for r in runs if r["state"] == "skipped")
            timeline = service.store.timeline(run["alert"])
            steps = [s["step"] for s in timeline["steps"]]
            assert run["state"] == "succeeded", [(s["step"], s["message"]) for s in timeline["steps"]]
            assert steps[-3:] == ["promote", "bundle stored", "rollout started"]
            rollout_id = timeline["steps"][-1]["detail"]["rollout"]
            status = service.rollouts.status(rollout_id)
            assert (status["name"], status["version"], status["fleet"]) == ("digits", 4, fleet_name)
            wait(lambda: _shadowed_to_v4(agent, X, service, rollout_id), 60, "the device on v4")
            wait(lambda: service.store.status()[0]["model_version"] == 4, 30, "the device's state on v4")
        import urllib.request

        with urllib.request.urlopen(f"{url}/api/alerts/{run['alert']}/timeline", timeout=10) as response:
            assert json.loads(response.read())["run"]["state"] == "succeeded"
    finally:
        service.stop()


def _retrained(store) -> bool:
    return any(r["state"] not in ("running", "skipped") for r in store.retrain_runs(limit=1000))


def _shadowed_to_v4(agent, X, service, rollout_id) -> bool:
    """Live rows for the shadow phase (the candidate answers them beside the serving model) until it swaps."""
    agent.predict(X[:60])
    return service.rollouts.status(rollout_id)["state"] == "succeeded"


def test_a_timeout_kills_what_the_command_started_too(tmp_path):
    """A shell whose training child keeps the pipes open must not hold the sink past the timeout."""
    import threading

    from edgekit.fleet.retrain_steps import run_command

    argv = ("sh", "-c", f"{sys.executable} -c 'import time; time.sleep(60)'; echo never")
    began = time.monotonic()
    code, out, _ = run_command(argv, b"{}", cwd=str(tmp_path), timeout=0.5, stop=threading.Event())
    assert code is None and "never" not in out and time.monotonic() - began < 20
