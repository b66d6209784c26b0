"""Alert rules open, de-duplicate while they hold, close when they clear, and reach their sinks."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from edgekit.errors import EdgekitError
from edgekit.fleet.alerts import AlertEngine, AlertRules, AlertSinks, load_alert_config
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.store import open_store
from tests.fleet_helpers import MODEL, baseline, state, summary

BASE = baseline()


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db(request, tmp_path):
    """The fleet database, a SQLite file or a database on a real PostgreSQL server: the rules read both alike."""
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else str(tmp_path / "fleet.db")


@pytest.fixture
def fleet(fleet_db):
    store = open_store(fleet_db)
    yield store, Ingestor(store)
    store.close()


def feed(ingestor, *messages, now=1.7e9):
    ingestor.handle([Message(topic, payload, now) for topic, payload in messages])


def rules_of(store):
    return {(a["rule"], a["subject"]): a for a in store.alerts(open_only=True)}


def test_drift_for_k_consecutive_windows_opens_once_and_closes_when_clean(fleet):
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(drift_windows=3), AlertSinks(log=False))
    feed(ingestor, *[summary(BASE, "d1", s, shift=2.0) for s in (1, 2)])
    assert engine.evaluate(now=1.7e9) == [] and rules_of(store) == {}  # two drifted windows are not three
    feed(ingestor, summary(BASE, "d1", 3, shift=2.0))
    opened = engine.evaluate(now=1.7e9)
    assert [(c["state"], c["rule"], c["subject"]) for c in opened if c["rule"] == "drift"] == [("open", "drift", "f0")]
    feed(ingestor, summary(BASE, "d1", 4, shift=2.0))
    assert [c for c in engine.evaluate(now=1.7e9) if c["rule"] == "drift"] == []  # still open: de-duplicated
    assert len(store.alerts(open_only=True)) >= 1
    feed(ingestor, summary(BASE, "d1", 5))
    closed = engine.evaluate(now=1.7e9)
    assert ("closed", "drift", "f0") in [(c["state"], c["rule"], c["subject"]) for c in closed]
    assert ("drift", "f0") not in rules_of(store)


def test_latest_window_rules(fleet):
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(), AlertSinks(log=False))
    feed(ingestor, summary(BASE, "d1", 1, null_rate=0.2, latency_ms=900.0, errors={"bad_input": 100}))
    engine.evaluate(now=1.7e9)
    assert {("null_rate", "inputs"), ("latency_p99", "latency"), ("error_rate", "requests")} <= set(rules_of(store))
    feed(ingestor, summary(BASE, "d1", 2))
    engine.evaluate(now=1.7e9)
    assert not {("null_rate", "inputs"), ("latency_p99", "latency"), ("error_rate", "requests")} & set(rules_of(store))


def test_offline_longer_than_t(fleet):
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(offline_seconds=60), AlertSinks(log=False))
    feed(ingestor, state("d1", False), now=1000.0)
    assert engine.evaluate(now=1030.0) == []
    assert [c["rule"] for c in engine.evaluate(now=1100.0)] == ["offline"]
    feed(ingestor, state("d1", True), now=1200.0)
    assert [(c["state"], c["rule"]) for c in engine.evaluate(now=1200.0)] == [("closed", "offline")]


def test_accuracy_on_delayed_labels_down_more_than_five_points(fleet):
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(), AlertSinks(log=False))
    feed(ingestor, summary(BASE, "d1", 1, labelled=100, correct=95), summary(BASE, "d1", 2, labelled=100, correct=94))
    assert engine.evaluate(now=1.7e9) == []
    feed(ingestor, summary(BASE, "d1", 3, labelled=100, correct=80))
    opened = engine.evaluate(now=1.7e9)
    assert [c["rule"] for c in opened] == ["accuracy"] and opened[0]["evidence"]["reference"] == pytest.approx(0.945)


def test_sinks_get_the_evidence_by_webhook_and_on_a_command_stdin(fleet, tmp_path):
    store, ingestor = fleet
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "retrain.json"
    script = tmp_path / "retrain.py"
    script.write_text(f"import sys, pathlib; pathlib.Path({str(out)!r}).write_bytes(sys.stdin.buffer.read())\n")
    engine = AlertEngine(
        store,
        AlertRules(),
        AlertSinks(
            log=False, webhook=f"http://127.0.0.1:{server.server_port}/hook", command=(sys.executable, str(script))
        ),
    )
    feed(ingestor, summary(BASE, "d1", 1, latency_ms=900.0))
    engine.evaluate(now=1.7e9)
    deadline = time.time() + 10
    while (not received or not out.exists()) and time.time() < deadline:
        time.sleep(0.05)
    server.shutdown()
    server.server_close()
    assert received[0]["rule"] == "latency_p99" and received[0]["evidence"]["p99_ms"] == 900.0
    assert json.loads(out.read_text())["state"] == "open"


def test_alerts_toml(tmp_path):
    path = tmp_path / "alerts.toml"
    path.write_text(
        '[rules]\ndrift_windows = 5\np99_ms_max = 50\n[sinks]\nlog = false\ncommand = "python retrain.py --fast"\n'
    )
    rules, sinks = load_alert_config(path)
    assert (
        rules.drift_windows == 5
        and rules.p99_ms_max == 50.0
        and sinks.command == ("python", "retrain.py", "--fast")
        and sinks.log is False
    )
    path.write_text("[rules]\nnope = 1\n")
    with pytest.raises(EdgekitError, match="unknown alert rules"):
        load_alert_config(path)


def test_fleet_cli_reads_the_store(cli, fleet, fleet_db):
    store, ingestor = fleet
    feed(ingestor, state("d1", True), summary(BASE, "d1", 1, shift=2.0), summary(BASE, "d1", 3))
    AlertEngine(store, AlertRules(), AlertSinks(log=False)).evaluate(now=1.7e9)
    db = fleet_db
    status = json.loads(cli("fleet", "status", "--db", db, "--json").stdout)
    assert status[0]["device"] == "d1" and status[0]["windows"] == 2 and status[0]["missing_seqs"] == 1
    table = cli("fleet", "status", "--db", db).stdout
    assert "d1" in table and "online" in table
    drift = cli("fleet", "drift", "--db", db, "--device", "d1")
    assert drift.exit_code == 0 and "no device has published this baseline" in drift.stdout
    assert cli("fleet", "drift", "--db", db, "--since", "soon").exit_code == 2
    assert cli("fleet", "alerts", "--db", db, "--json").exit_code == 0


def test_an_untested_window_neither_opens_nor_closes_drift(fleet):
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(drift_windows=2), AlertSinks(log=False))
    feed(ingestor, summary(BASE, "d1", 1, shift=2.0), summary(BASE, "d1", 2, shift=2.0))
    engine.evaluate(now=1.7e9)
    feed(ingestor, summary(BASE, "d1", 3, rows=20))  # the flush of a stopping agent: below min_rows, no verdict
    engine.evaluate(now=1.7e9)
    assert ("drift", "f0") in rules_of(store)


def test_unseen_categories_open_an_alert_per_column_and_close_when_they_stop(fleet, tmp_path):
    """Known categories moving (IN -> BR) are drift, not news of unseen values; 10 % of rows with a country
    the baseline never saw opens an unseen_rate alert on that column, which closes when they stop."""
    from tests.tabular_helpers import typed_baseline, typed_summary

    store, ingestor = fleet
    base = typed_baseline()
    engine = AlertEngine(store, AlertRules(), AlertSinks(log=False))
    feed(ingestor, typed_summary(base, "d1", 1, shift=0.5))
    assert not [c for c in engine.evaluate(now=1.7e9) if c["rule"] == "unseen_rate"]
    feed(ingestor, typed_summary(base, "d1", 2, unseen=0.1))
    (opened,) = [c for c in engine.evaluate(now=1.7e9) if c["rule"] == "unseen_rate"]
    assert opened["subject"] == "country" and opened["evidence"]["column"] == "country"
    assert opened["evidence"]["unseen_rate"] == pytest.approx(0.1, abs=0.03) and opened["evidence"]["seq"] == 2
    assert "country value the baseline never saw" in opened["message"]
    feed(ingestor, typed_summary(base, "d1", 3, unseen=0.01))
    assert [(c["state"], c["subject"]) for c in engine.evaluate(now=1.7e9)] == [("closed", "country")]
    path = tmp_path / "alerts.toml"
    path.write_text("[rules]\nunseen_rate_max = 0.2\n")
    feed(ingestor, typed_summary(base, "d1", 4, unseen=0.1))
    assert AlertEngine(store, load_alert_config(path)[0], AlertSinks(log=False)).evaluate(now=1.7e9) == []


def test_evidence_names_the_version_its_windows_ran_not_the_one_the_device_runs_now(fleet):
    """Drifted windows sketched under v1, the device already swapped to v2 (the loop's retrained model) when
    the alert is refreshed: its evidence still names v1, whose windows it cites."""
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(drift_windows=3), AlertSinks(log=False))
    feed(ingestor, state("d1", True), *[summary(BASE, "d1", s, shift=2.0) for s in (1, 2, 3)])
    engine.evaluate(now=1.7e9)
    feed(ingestor, state("d1", True, model={**MODEL, "version": MODEL["version"] + 1}))
    engine.evaluate(now=1.7e9 + 1)
    drift = rules_of(store)[("drift", "f0")]
    evidence = drift["evidence"] if isinstance(drift["evidence"], dict) else json.loads(drift["evidence"])
    assert evidence["seqs"] == [3, 2, 1]
    assert evidence["model_version"] == MODEL["version"]


def test_fleet_timeline_prints_an_alerts_loop_from_the_store(cli, fleet, fleet_db):
    """``fleet alerts`` shows each alert's id, and ``fleet timeline ID`` its retrain run's steps and closing."""
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(drift_windows=3), AlertSinks(log=False))
    feed(ingestor, *[summary(BASE, "d1", s, shift=2.0) for s in (1, 2, 3)])
    engine.evaluate(now=1.7e9)
    alert = rules_of(store)[("drift", "f0")]
    assert str(alert["id"]) in cli("fleet", "alerts", "--db", fleet_db).stdout.splitlines()[2].split()[0]
    no_run = cli("fleet", "timeline", str(alert["id"]), "--db", fleet_db)
    assert no_run.exit_code == 0 and "no retrain ran for it" in no_run.stdout
    store.start_retrain(alert["id"], "drift", "d1", "m", 1.7e9 + 1)
    store.add_timeline_step(alert["id"], "samples exported", "ok", "42 labelled rows", {}, 1.7e9 + 2)
    store.finish_retrain(alert["id"], "failed", "the candidate did not win", 1.7e9 + 3)
    feed(ingestor, summary(BASE, "d1", 4))
    engine.evaluate(now=1.7e9 + 4)
    shown = cli("fleet", "timeline", str(alert["id"]), "--db", fleet_db)
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "+2.0 s  samples exported   42 labelled rows" in shown.stdout
    assert any("alert closed" in line for line in lines)
    assert lines[-1] == "  retrain run: failed (the candidate did not win)"
    assert json.loads(cli("fleet", "timeline", str(alert["id"]), "--db", fleet_db, "--json").stdout)["steps"]
    missing = cli("fleet", "timeline", "999", "--db", fleet_db)
    assert missing.exit_code == 2 and "no alert 999" in missing.stderr


def test_reading_commands_refuse_what_is_not_a_fleet_database_and_change_nothing(cli, tmp_path):
    """A TOML file tab-completed next to fleet.db, a device's prediction log, an empty file: one line each,
    and the file as it was (the fleet's tables were once quietly added to a device's database)."""
    import sqlite3

    toml = tmp_path / "alerts.toml"
    toml.write_text("[rules]\ndrift_windows = 3\n")
    device_db = tmp_path / "predictions.db"
    with sqlite3.connect(device_db) as db:
        db.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY)")
    empty = tmp_path / "empty.db"
    empty.touch()
    for path, said in (
        (toml, "not a SQLite database"),
        (device_db, "not a fleet database (its tables: predictions)"),
        (empty, "no fleet database here"),
    ):
        before = path.read_bytes()
        result = cli("fleet", "status", "--db", path)
        assert result.exit_code != 0 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert path.read_bytes() == before
        assert not any(p.name.startswith(path.name + "-") for p in tmp_path.iterdir())  # no -wal/-shm left


def test_a_pass_over_many_devices_opens_refreshes_and_closes_each_alone(fleet, monkeypatch):
    """Devices are evaluated in chunks, their alerts read and written together: each device's rules still
    hold or clear on its own windows, an open alert is refreshed (not opened twice), and a device named in
    ``devices`` is the only one looked at."""
    monkeypatch.setattr("edgekit.fleet.alerts.EVALUATE_CHUNK", 2)
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(drift_windows=2), AlertSinks(log=False))
    drifting, clean = ["d1", "d3", "d5"], ["d2", "d4"]
    for seq in (1, 2):
        feed(ingestor, *[summary(BASE, d, seq, shift=2.0 if d in drifting else 0.0) for d in drifting + clean])
    opened = engine.evaluate(now=1.7e9)
    assert sorted(c["device"] for c in opened if c["rule"] == "drift") == drifting
    assert engine.evaluate(now=1.7e9 + 60) == []  # held: refreshed, not opened again
    drift = {a["device"]: a for a in store.alerts(open_only=True) if a["rule"] == "drift"}
    assert sorted(drift) == drifting and {a["updated_at"] for a in drift.values()} == {1.7e9 + 60}
    assert {a["opened_at"] for a in drift.values()} == {1.7e9}
    feed(ingestor, *[summary(BASE, d, 3) for d in ("d1", "d5")])
    closed = engine.evaluate(now=1.7e9 + 120, devices={"d1"})  # d5's window waits for its own pass
    assert [(c["state"], c["device"]) for c in closed if c["rule"] == "drift"] == [("closed", "d1")]
    closed = engine.evaluate(now=1.7e9 + 180)
    assert [(c["state"], c["device"]) for c in closed if c["rule"] == "drift"] == [("closed", "d5")]
    assert sorted(a["device"] for a in store.alerts(open_only=True) if a["rule"] == "drift") == ["d3"]
    assert len(store.alerts(limit=100)) == len(
        {(a["rule"], a["device"], a["subject"]) for a in store.alerts(limit=100)}
    )


def test_a_device_whose_rules_fail_keeps_its_alerts_and_holds_up_no_other(fleet, monkeypatch):
    """Devices are evaluated a chunk at a time, their alerts written together: one whose rules raise (a bug,
    a stored row no rule expected) is logged and left as it is, and the others' alerts open and close."""
    store, ingestor = fleet
    engine = AlertEngine(store, AlertRules(drift_windows=1), AlertSinks(log=False))
    feed(ingestor, *[summary(BASE, d, 1, shift=2.0) for d in ("d1", "d2", "d3")])
    assert sorted(c["device"] for c in engine.evaluate(now=1.7e9) if c["rule"] == "drift") == ["d1", "d2", "d3"]
    feed(ingestor, *[summary(BASE, d, 2) for d in ("d1", "d2", "d3")])  # all clean now
    holding = AlertEngine._holding

    def failing_on_d2(self, device, *args):
        if device["device"] == "d2":
            raise KeyError("a field the rule expected")
        return holding(self, device, *args)

    monkeypatch.setattr(AlertEngine, "_holding", failing_on_d2)
    closed = engine.evaluate(now=1.7e9 + 60)
    assert sorted(c["device"] for c in closed if c["rule"] == "drift") == ["d1", "d3"]
    assert [a["device"] for a in store.alerts(open_only=True) if a["rule"] == "drift"] == ["d2"]
