"""What version 1 of each contract wrote, read by today's code (the files in fixtures/formats/ were
written once, by the first release's code, and are never regenerated; ``profile-2.json`` was written
once by the last code that wrote ``edgekit.profile/2``).

A change to the bundle, summary or baseline format bumps its schema version and must keep these
tests passing: devices in the field hold old bundles, and a collector receives old agents' summaries.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.bundle import read_bundle
from device_agent.profile import Profile
from device_agent.protocol import BASELINE_SCHEMA, READABLE_SUMMARY_SCHEMAS, check_summary, decode
from device_agent.runtimes import open_runtime
from device_agent.signing import load_public_key
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.merge import merged_drift
from edgekit.fleet.store import SqliteStore
from tests.agent_helpers import config_of, make_device

FORMATS = Path(__file__).resolve().parent.parent / "fixtures" / "formats"


def test_a_version_1_bundle_verifies_loads_and_predicts(digits):
    bundle = read_bundle(FORMATS / "digits-1.edgebundle", load_public_key(FORMATS / "edgekit.pub"))
    assert bundle.manifest["schema"] == "edgekit.bundle/1" and (bundle.name, bundle.version) == ("digits", 1)
    assert isinstance(bundle.baseline(), Profile) and bundle.input_schema.feature_names[0] == "pixel_0_0"
    data = np.load(digits.test)
    runtime = open_runtime(bundle.model_format, bundle.model_bytes, source=str(bundle.path))
    try:
        labels = bundle.output_spec.interpret(runtime.predict(data["X"].astype(np.float32))).labels
    finally:
        runtime.close()
    assert float(np.mean(labels == data["y"])) > 0.9


@pytest.mark.network
def test_a_version_1_bundle_is_served_over_http_and_its_windows_sketched(digits, tmp_path):
    """Today's agent, with its tensor routes and per-row sketches, still serves a version-1 bundle: rows
    over the v1 HTTP API answer as the model did, and a window sketched against its version-1 baseline
    makes a summary the collector accepts."""
    config = make_device(tmp_path / "old", FORMATS / "digits-1.edgebundle", FORMATS / "edgekit.pub", window_rows=200)
    data = np.load(digits.test)
    with Agent(config_of(config)).start(mqtt=False) as agent:
        request = urllib.request.Request(
            f"http://127.0.0.1:{agent.server.server_address[1]}/v1/models/digits:predict",
            data=json.dumps({"instances": data["X"][:200].tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        deadline = time.time() + 10
        while agent.last_summary is None and time.time() < deadline:
            time.sleep(0.05)
        summary, baseline_id = agent.last_summary, agent.serving.bundle.baseline().baseline_id
    assert np.mean(np.asarray(answer["predictions"]) == data["y"][:200]) > 0.9
    assert summary is not None and check_summary(summary)["rows"] == 200
    assert summary["profile"]["baseline_id"] == baseline_id and len(summary["drift"]["features"]) == 64


def test_version_1_baseline_and_summary_messages_are_checked_stored_and_merged():
    summary = decode((FORMATS / "summary-message.json").read_bytes(), READABLE_SUMMARY_SCHEMAS)
    assert check_summary(summary)["seq"] == 1
    assert decode((FORMATS / "baseline-message.json").read_bytes(), BASELINE_SCHEMA)["device"] == "dev1"
    store = SqliteStore(":memory:")
    outcome = Ingestor(store).handle(
        [
            Message("edgekit/v1/f/dev1/baseline", (FORMATS / "baseline-message.json").read_bytes(), 1.7e9),
            Message("edgekit/v1/f/dev1/summary", (FORMATS / "summary-message.json").read_bytes(), 1.7e9),
        ]
    )
    assert outcome["stored"] == 1, outcome
    (report,) = merged_drift(store, device="dev1")
    assert report["windows"] == 1 and "f0" in report["drift"]["features"]
    assert json.loads((FORMATS / "summary-message.json").read_text())["schema"] == "edgekit.summary/1"


def test_a_version_2_profile_reads_keeps_its_baseline_id_and_takes_windows():
    """``edgekit.profile/3`` added ``per_row``; a /2 baseline (numeric, value-binned and categorical columns
    with ``unseen`` and ``known``, classifier outputs) must read, keep its id, and sketch and merge windows."""
    doc = json.loads((FORMATS / "profile-2.json").read_text())
    assert doc["schema"] == "edgekit.profile/2"
    baseline = Profile.from_dict(doc)
    assert baseline.baseline_id == doc["baseline_id"] == "843b8a0a334b9abc"
    assert baseline.width == 5 and [f.kind for f in baseline.features] == ["numeric"] * 3 + ["categorical"] * 2
    rows = np.array([[10.5, 1.0, 0.0, "c3", "pro"], [9.0, 2.0, 3.5, "zz", "basic"]], dtype=object)
    window = baseline.empty_like()
    window.update_inputs(rows)
    assert window.feature("country").unseen == 1 and window.feature("amount").count == 2
    again = baseline.from_compact(window.to_compact())
    assert again.to_compact() == window.to_compact() and again.baseline_id == baseline.baseline_id
    assert Profile.from_dict(baseline.to_dict()).baseline_id == baseline.baseline_id
