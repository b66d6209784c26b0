"""Both /metrics pages pass ``promtool check metrics`` (parse and lint), whatever the features are called."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from device_agent import Agent
from device_agent.errors import InputError
from device_agent.metrics import escape_label_value, format_labels, format_value, render_metrics
from edgekit.fleet.alerts import AlertRules, AlertSinks
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.ingest import Message
from edgekit.fleet.metrics import render
from edgekit.fleet.service import FleetService
from tests.agent_helpers import config_of, make_device
from tests.fleet_helpers import baseline, state, summary

HOSTILE = ('size "cm"', "back\\slash", "new\nline", "température ✓", 'all \\" of\nthem')


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed: apt-get install prometheus (scripts/test.sh does it when run as root)",
            pytrace=False,
        )
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    problems = (result.stdout + result.stderr).decode().strip()
    assert result.returncode == 0 and not problems, f"promtool check metrics: {problems}\n--- exposition ---\n{text}"


def test_label_values_are_escaped_per_the_text_format():
    assert escape_label_value('size "cm"') == 'size \\"cm\\"'
    assert escape_label_value("a\\b") == "a\\\\b"
    assert escape_label_value("new\nline") == "new\\nline"
    assert escape_label_value('\\"') == '\\\\\\"'  # the backslash first, so the quote's escape is not doubled
    assert escape_label_value("température ✓") == "température ✓"  # UTF-8 goes through as it is
    assert escape_label_value(3) == "3"
    assert format_labels({}) == ""
    assert format_labels({"model": "m", "feature": 'x"\n'}) == '{model="m",feature="x\\"\\n"}'
    assert [format_value(v) for v in (1, 2.5, 5e-05, float("inf"), float("nan"))] == [
        "1",
        "2.5",
        "5e-05",
        "+Inf",
        "NaN",
    ]


@pytest.fixture(scope="module")
def hostile_bundle(tmp_path_factory, keypair):
    """A tiny model whose features carry every character the text format must escape (names from the .npz)."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgekit.build.convert import convert_model
    from edgekit.bundle.package import build_bundle

    directory = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, len(HOSTILE)))
    y = (X[:, 0] > 0).astype(int)
    joblib.dump(make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y), directory / "m.joblib")
    np.savez(directory / "baseline.npz", X=X, y=y, feature_names=np.array(HOSTILE))
    convert_model(str(directory / "m.joblib"), str(directory / "m.onnx"))
    path = directory / "hostile-1.edgebundle"
    build_bundle(
        str(directory / "m.onnx"),
        name="hostile",
        version=1,
        baseline_path=str(directory / "baseline.npz"),
        key_path=str(keypair[0]),
        output=str(path),
    )
    return path, X


def test_agent_metrics_pass_promtool_with_hostile_feature_names(tmp_path, hostile_bundle, keypair):
    bundle, X = hostile_bundle
    config = make_device(tmp_path / "dev", bundle, keypair[1], window_rows=100, http=False)
    with Agent(config_of(config)).start(http=False) as agent:
        agent.predict(X[:150])
        with pytest.raises(InputError):
            agent.predict(X[:1, :2])  # counted as an error kind: the labelled errors family has a sample too
        agent.monitor.process()
        assert agent.last_summary is not None and set(agent.last_summary["drift"]["features"]) == set(HOSTILE)
        text = render_metrics(agent)
    promtool_check(text)
    assert 'feature="size \\"cm\\""' in text and 'feature="back\\\\slash"' in text and 'feature="new\\nline"' in text
    assert 'feature="température ✓"' in text
    assert 'edgekit_latency_seconds_bucket{model="hostile",version="1",le="+Inf"} 100' in text
    assert "edgekit_latency_seconds_count" in text and "_ms" not in text


def test_collector_metrics_pass_promtool(tmp_path):
    collector = FleetService(
        CollectorConfig(db=str(tmp_path / "fleet.db"), http=None),
        alert_rules=AlertRules(),
        alert_sinks=AlertSinks(log=False),
    )
    try:
        base = baseline()
        collector.ingestor.handle(
            [
                Message(*state("d1", True), 1.7e9),
                Message(*summary(base, "d1", 1, shift=3.0), 1.7e9),
                Message(*summary(base, "d2", 1, null_rate=0.3), 1.7e9),
                Message("edgekit/v1/f/d3/summary", b"not json", 1.7e9),
            ]
        )
        collector.alerts.evaluate(now=1.7e9)
        text = render(collector).decode()
    finally:
        collector.store.close()
    promtool_check(text)
    assert (
        'edgekit_device_drifted{device="d1"' in text
        and "edgekit_collector_messages_total" in text
        and "edgekit_alerts_open" in text
    )
