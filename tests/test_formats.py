"""What each version of each contract wrote, read by today's code.

The files in fixtures/formats/ are written once and never regenerated: ``digits-1.edgebundle`` and the
two messages by the first release's code; ``profile-2.json`` by the last code that wrote
``edgekit.profile/2``; ``columns-bundle-2.edgebundle`` (the churn fixture's random forest on typed
columns) by the code at bd8c1f4, the last to write ``edgekit.bundle/2``; ``tensor-bundle-3.edgebundle``
(the digits CNN as "cam" v1, PNGs decoded on the device) and its baseline, ``profile-3.json``, by the
code at 03be612 (``edgekit.bundle/3``, ``edgekit.profile/3``, tensor signals version 1). The version-1
bundle is signed by ``edgekit.pub``'s key, the later two by ``formats.pub``'s, made for them (its
private half was not kept).

A change to the bundle, summary or baseline format bumps its schema version and must keep these
tests passing: devices in the field hold old bundles, and a collector receives old agents' summaries.
"""

from __future__ import annotations

import base64
import io
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
from device_agent.tensor_signals import TensorSignals
from device_agent.updater import run_selftest
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.merge import merged_drift
from edgekit.fleet.store import SqliteStore
from tests.agent_helpers import config_of, make_device

FORMATS = Path(__file__).resolve().parent.parent / "fixtures" / "formats"
FROZEN = {"tensor-bundle-3.edgebundle": "edgekit.bundle/3", "columns-bundle-2.edgebundle": "edgekit.bundle/2"}


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


@pytest.mark.parametrize(("name", "schema"), FROZEN.items())
def test_frozen_bundles_verify_load_and_pass_their_self_test(name, schema):
    bundle = read_bundle(FORMATS / name, load_public_key(FORMATS / "formats.pub"))
    assert bundle.manifest["schema"] == schema and bundle.version == 1
    assert isinstance(bundle.baseline(), Profile) and bundle.baseline().baseline_id == bundle.manifest["baseline_id"]
    runtime = open_runtime(bundle.model_format, bundle.model_bytes, source=str(bundle.path))
    try:
        facts = run_selftest(bundle, runtime)
    finally:
        runtime.close()
    assert facts["rows"] > 0 and facts["max_abs_diff"] < 1e-4


def digit_pngs(X: np.ndarray) -> list[dict[str, str]]:
    """The digits (``[N, 64]``, values 0..16) as the camera sends them: 8x8 gray PNGs, pixel round(v * 255 / 16)."""
    from PIL import Image

    items = []
    for pixels in np.round(X.reshape(-1, 8, 8) * 255 / 16).astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        items.append({"b64": base64.b64encode(buffer.getvalue()).decode()})
    return items


def predict_a_window(bundle: Path, tmp_path: Path, rows) -> tuple[dict, dict]:
    """An agent on ``bundle`` answers ``rows`` (200 of them: one window); its answer and the window's summary."""
    config = make_device(tmp_path / "device", bundle, FORMATS / "formats.pub", window_rows=200, http=False)
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        answer = agent.predict(rows).to_json()
        deadline = time.time() + 10
        while agent.last_summary is None and time.time() < deadline:
            time.sleep(0.05)
        baseline = agent.serving.bundle.baseline()
    summary = agent.last_summary
    assert summary is not None and check_summary(summary)["rows"] == 200
    assert summary["profile"]["baseline_id"] == baseline.baseline_id
    return answer, summary


def test_a_version_3_tensor_bundle_answers_pngs_and_sketches_its_signals(digits, tmp_path):
    """Today's agent decodes PNGs for the frozen "cam" bundle (its preprocessing pinned in the manifest), answers
    as the digits CNN did, and sketches a window with the version-1 signals its baseline was made with."""
    data = np.load(digits.test)
    bundle = read_bundle(FORMATS / "tensor-bundle-3.edgebundle", load_public_key(FORMATS / "formats.pub"))
    assert bundle.manifest["input"]["signals"]["version"] == 1 and bundle.output_spec.labels == tuple("0123456789")
    answer, summary = predict_a_window(bundle.path, tmp_path, digit_pngs(data["X"][:200]))
    assert np.mean(np.asarray(answer["predictions"]) == data["y"][:200].astype(str)) > 0.9
    signals = TensorSignals.from_dict(bundle.manifest["input"]["signals"], bundle.input_schema.tensor)
    assert set(signals.names) <= set(summary["drift"]["features"]) and "x.sharpness" in signals.names


def test_a_version_2_columns_bundle_answers_as_its_self_test_says(tmp_path):
    """The frozen churn forest (typed columns, ``edgekit.bundle/2``): rows sent as columns get the labels and
    probabilities its self-test vectors hold, and a window of them is sketched against its baseline."""
    vectors = read_bundle(FORMATS / "columns-bundle-2.edgebundle", load_public_key(FORMATS / "formats.pub")).selftest()
    columns = {key[len("input:") :]: array[:, 0].tolist() for key, array in vectors.items() if key.startswith("input:")}
    window = {name: (values * 13)[:200] for name, values in columns.items()}
    answer, summary = predict_a_window(FORMATS / "columns-bundle-2.edgebundle", tmp_path, window)
    n = len(vectors["output:label"])
    assert answer["predictions"][:n] == vectors["output:label"].tolist()
    np.testing.assert_allclose(answer["probabilities"][:n], vectors["output:probabilities"], atol=1e-5)
    assert set(summary["drift"]["features"]) == set(columns)


def test_a_version_3_profile_of_tensor_signals_reads_and_takes_windows():
    """``edgekit.profile/3``'s per-row sketches (64 subsampled values a row for ``x.c0.values``): the tensor
    bundle's baseline reads, keeps its id, and sketches and merges windows of today's signal rows."""
    doc = json.loads((FORMATS / "profile-3.json").read_text())
    assert doc["schema"] == "edgekit.profile/3"
    baseline = Profile.from_dict(doc)
    assert baseline.baseline_id == doc["baseline_id"] == "32d30dc0b742ce6a"
    assert baseline.feature("x.c0.values").per_row == 64
    bundle = read_bundle(FORMATS / "tensor-bundle-3.edgebundle", load_public_key(FORMATS / "formats.pub"))
    signals = TensorSignals.from_dict(bundle.manifest["input"]["signals"], bundle.input_schema.tensor)
    assert list(signals.names) == [f.name for f in baseline.features][: len(signals.names)]
    rng = np.random.default_rng(0)
    rows = signals.rows(rng.random((10, 1, 8, 8), dtype=np.float32), rng.random((10, 64), dtype=np.float32))
    window = baseline.empty_like()
    window.update_inputs(rows)
    assert window.feature("x.c0.values").count == 640
    again = baseline.from_compact(window.to_compact())
    assert again.to_compact() == window.to_compact() and again.baseline_id == baseline.baseline_id
