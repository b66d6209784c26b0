"""alerts.toml and the collector's settings read strictly: one line naming the key and the fix.

Before, an unknown table (``[rulez]``) or sink (``[sinks.webhok]``: a webhook that never fires) was ignored,
``log = "false"`` was read as true, ``drift_windows = "3"`` and ``null_rate_max = 5`` (5 %? never fires) were
taken, and a collector was made with an HTTP port past 65535, no workers, or a '/' in its group."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from edgekit.fleet import alerts
from edgekit.fleet.alerts import AlertRules, load_alert_config
from edgekit.fleet.config import CollectorConfig

ROOT = Path(__file__).resolve().parent.parent

MISTAKES = [
    ("[rulez]\ndrift_windows = 3", r"has no table \[rulez\]; did you mean \[rules\]\?"),
    ('[sinks.webhok]\nurl = "http://h/x"', r"\[sinks\] has no sink 'webhok'; did you mean webhook\? It is a setting"),
    ('[sinks]\nwebhok = "http://h/x"', r"\[sinks\] has no sink 'webhok'; did you mean webhook\?"),
    ("[sinks.retrian]\ncommand = 'x'", r"\[sinks\] has no sink 'retrian'; did you mean \[sinks.retrain\]\?"),
    ('[sinks]\nlog = "false"', r'\[sinks\] log = "false" is not true or false; write log = true or log = false'),
    ("[sinks]\nlog = 0", r"\[sinks\] log = 0 is not true or false"),
    (
        "[rules]\ndrift_window = 3",
        r"\[rules\] has unknown alert rules \['drift_window'\]; did you mean drift_windows\?",
    ),
    (
        '[rules]\nwebhook = "http://h/x"',
        r"\[rules\] has unknown alert rules \['webhook'\]; webhook belongs in \[sinks\]",
    ),
    ("drift_windows = 3", r"drift_windows is outside any table; put it under \[rules\]"),
    ("rules = 3", r"rules is not a table; write a \[rules\] header"),
    ('[rules]\ndrift_windows = "3"', r'\[rules\] drift_windows = "3" is not a whole number .*; e.g. drift_windows = 3'),
    ("[rules]\ndrift_windows = 2.5", r"\[rules\] drift_windows = 2.5 is not a whole number of consecutive windows"),
    ("[rules]\ndrift_windows = 0", r"\[rules\] drift_windows = 0 is not a whole number of consecutive windows, 1 or"),
    ("[rules]\nprediction_windows = true", r"\[rules\] prediction_windows = true is not a whole number"),
    ("[rules]\nnull_rate_max = 5", r"\[rules\] null_rate_max = 5 is not a share from 0 to 1 \(0.05 is 5 %"),
    ("[rules]\np99_ms_max = 0", r"\[rules\] p99_ms_max = 0 is not a number of milliseconds above 0"),
    ("[rules]\noffline_seconds = -1", r"\[rules\] offline_seconds = -1 is not a number of seconds, 0 or more"),
    ("[rules]\noffline_seconds = nan", r"\[rules\] offline_seconds = nan is not a number of seconds"),
    ('[sinks]\nwebhook = "h/x"', r"\[sinks\] webhook = 'h/x' is not an http\(s\) URL"),
    ("[sinks]\nwebhook = 3", r"\[sinks\] webhook = 3 is not an http\(s\) URL"),
    ('[sinks]\ncommand = "python \'a"', r"\[sinks\] command .* cannot be split \(No closing quotation\); e.g."),
    ("[sinks]\ncommand = 3", r"\[sinks\] command = 3 is not a string or a list of strings"),
    ("[sinks]\ncommand = [1]", r"\[sinks\] command = \[1\] is not a string or a list of strings"),
]


@pytest.mark.parametrize("text, says", MISTAKES, ids=[m[0][:30] for m in MISTAKES])
def test_each_alerts_mistake_is_one_line_naming_the_key_and_the_fix(text, says, tmp_path):
    path = tmp_path / "alerts.toml"
    path.write_text(text + "\n")
    with pytest.raises(EdgekitError) as caught:
        load_alert_config(path)
    message = str(caught.value)
    assert re.search(says, message), message
    assert "\n" not in message and message.startswith(f"{path}: ") and caught.value.fix, message


def test_every_rule_has_its_bounds():
    assert set(alerts._RULE_BOUNDS) == {f.name for f in dataclasses.fields(AlertRules)}


def test_valid_alert_files_read_as_before(tmp_path):
    """The module's documented example, what the loop demo writes, and plain forms (a list command, "" off)."""
    from edgekit import tomlfile

    path = tmp_path / "alerts.toml"
    example = alerts.__doc__.split("::\n\n", 1)[1].split("\n\nSinks hear", 1)[0]
    path.write_text("\n".join(line[4:] for line in example.splitlines()) + "\n")
    rules, sinks = load_alert_config(path)
    assert rules == AlertRules() and sinks.log is True and sinks.webhook == "http://127.0.0.1:9000/hook"
    assert sinks.command == ("python", "notify.py") and sinks.retrain is not None
    tomlfile.write(
        path,
        {
            "rules": {"drift_windows": 3, "offline_seconds": 3600, "accuracy_min_labels": 100},
            "sinks": {"log": False, "command": ["python", "n.py"], "webhook": ""},
        },
    )
    rules, sinks = load_alert_config(path)
    assert rules.offline_seconds == 3600.0 and isinstance(rules.accuracy_min_labels, int)
    assert sinks.log is False and sinks.command == ("python", "n.py") and sinks.webhook is None
    path.write_text("[rules]\np99_ms_max = 50\nnull_rate_max = 1\nestimated_accuracy_min_rows = 50.0\n")
    rules, _ = load_alert_config(path)
    assert rules.p99_ms_max == 50.0 and rules.null_rate_max == 1.0 and rules.estimated_accuracy_min_rows == 50


def _collect(tmp_path, *options: str) -> subprocess.CompletedProcess:
    db = tmp_path / "fleet.db"
    return subprocess.run(
        [sys.executable, "-m", "edgekit", "fleet", "collect", "--db", str(db), "--duration", "1", *options],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_fleet_collect_refuses_a_bad_alerts_file_in_one_line_before_it_starts(tmp_path):
    path = tmp_path / "alerts.toml"
    for text, says in (
        ('[sinks.webhok]\nurl = "http://h/x"', "[sinks] has no sink 'webhok'; did you mean webhook?"),
        ('[sinks]\nlog = "false"', '[sinks] log = "false" is not true or false'),
        ("[rulez]\ndrift_windows = 3", "has no table [rulez]; did you mean [rules]?"),
    ):
        path.write_text(text + "\n")
        done = _collect(tmp_path, "--alerts", str(path), "--http", "")
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and f"{path}: {says}" in done.stderr, done.stderr
        assert not (tmp_path / "fleet.db").exists()  # refused before the store was opened


COLLECTOR_MISTAKES = [
    ({"http": "127.0.0.1:99999"}, r"HTTP address '127.0.0.1:99999' is not host:port with a port from 0 to 65535"),
    ({"http": "localhost"}, r"HTTP address 'localhost' is not host:port"),
    ({"workers": 0}, r"workers 0 is not a whole number from 1 to 64"),
    ({"role": "ingset"}, r"role 'ingset' is not all or ingest"),
    ({"gap_retry_seconds": float("inf")}, r"gap_retry_seconds inf must be a positive number of seconds"),
    ({"gap_retry_seconds": True}, r"gap_retry_seconds True must be a positive number"),
    ({"group": "a/b"}, r"group 'a/b' is not an MQTT shared-subscription group name"),
    ({"group": ""}, r"group '' is not an MQTT shared-subscription group name"),
    ({"broker": "tcp://h:1883"}, r"broker URL 'tcp://h:1883' is not mqtt://"),
    ({"public_url": "10.0.0.5:8480"}, r"public URL '10.0.0.5:8480' is not an http\(s\) URL"),
    ({"tls_cert": "cert.pem"}, r"tls_cert and tls_key go together"),
    ({"http_limits": {"header_timot": 5}}, r"HTTP limit: unknown HTTP limit 'header_timot'"),
    ({"http_limits": {"threads": 0}}, r"HTTP limit: threads must be a positive whole number"),
]


@pytest.mark.parametrize("settings, says", COLLECTOR_MISTAKES, ids=[m[1][:30] for m in COLLECTOR_MISTAKES])
def test_each_collector_setting_mistake_is_refused_when_the_config_is_made(settings, says):
    with pytest.raises(EdgekitError) as caught:
        CollectorConfig(**settings)
    assert re.search(says, str(caught.value)) and caught.value.fix and "\n" not in str(caught.value)


def test_valid_collector_settings_are_made_as_before():
    config = CollectorConfig(
        http="0.0.0.0:0", workers=3, role="ingest", gap_retry_seconds=1, public_url="https://fleet.example/x"
    )
    assert config.workers == 3 and config.http == "0.0.0.0:0"
    assert CollectorConfig(http=None, http_limits={"header_timeout": 5.0}).http_limits == {"header_timeout": 5.0}


def test_fleet_collect_refuses_a_port_past_65535_in_one_line(tmp_path):
    done = _collect(tmp_path, "--http", "127.0.0.1:99999")
    assert done.returncode != 0 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "HTTP address '127.0.0.1:99999' is not host:port with a port from 0 to 65535" in done.stderr
    assert not (tmp_path / "fleet.db").exists()
