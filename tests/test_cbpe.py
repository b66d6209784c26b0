"""The label-free accuracy estimate: the calibration ``package --eval`` stores, the estimate a collector makes
of each window at ingest, and the ``estimated_accuracy_drop`` alert that reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.bundle import read_bundle
from device_agent.drift import drift_report
from device_agent.monitor import ClosedWindow
from device_agent.profile import CONFIDENCE_CUTS, NumericSketch, Profile, build_baseline
from device_agent.protocol import baseline_payload, build_summary, encode
from device_agent.signing import load_public_key
from edgekit.bundle.calibration import CALIBRATION_SCHEMA, classifier_map, isotonic, regressor_map, slot_of
from edgekit.errors import EdgekitError
from edgekit.fleet.alerts import AlertEngine, AlertRules, AlertSinks, load_alert_config
from edgekit.fleet.estimate import Calibration, Estimates
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.store import open_store
from edgekit.models.loading import load_model
from tests.fleet_helpers import baseline as synthetic_baseline
from tests.fleet_helpers import summary as synthetic_summary

RULE = "estimated_accuracy_drop"
FORMATS = __import__("pathlib").Path(__file__).resolve().parent.parent / "fixtures" / "formats"


def confidence_sketch() -> NumericSketch:
    return NumericSketch("confidence", np.asarray(CONFIDENCE_CUTS), 0.0, 1.0)


# -- the calibration ------------------------------------------------------------------------------------


def test_isotonic_fit_never_falls_and_pools_violators():
    x, fitted = isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 0.0, 1.0, 1.0]))
    assert x.tolist() == [0.1, 0.2, 0.3, 0.4]
    assert fitted.tolist() == [0.5, 0.5, 1.0, 1.0]  # the first two pooled: accuracy never falls with confidence


def test_slots_are_the_sketch_own_bins():
    sketch, values = confidence_sketch(), np.random.default_rng(0).random(5000)
    sketch.update(np.concatenate([values, [0.0, 0.1, 1.0]]))
    slots = slot_of(sketch, np.concatenate([values, [0.0, 0.1, 1.0]]))
    assert np.bincount(slots, minlength=len(sketch.counts)).tolist() == sketch.counts.tolist()


def test_a_calibrated_model_maps_each_bin_to_its_confidence():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.3, 1.0, 20000)
    correct = (rng.random(20000) < confidence).astype(float)  # right as often as it says
    doc = classifier_map(confidence_sketch(), confidence, correct)
    values = np.asarray(doc["values"])
    middles = np.array([0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])  # the bins the data fills
    assert np.abs(values[4:11] - middles).mean() < 0.02 and np.abs(values[4:11] - middles).max() < 0.05
    assert doc["schema"] == CALIBRATION_SCHEMA and doc["metric"] == "accuracy" and doc["rows"] == 20000
    assert doc["expected"] == pytest.approx(correct.mean(), abs=0.01)
    assert values[1] == pytest.approx(0.05)  # a bin with no eval rows: its midpoint


def test_an_overconfident_model_is_mapped_below_its_confidence():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.9, 1.0, 5000)
    correct = (rng.random(5000) < 0.7).astype(float)
    values = classifier_map(confidence_sketch(), confidence, correct)["values"]
    assert values[10] == pytest.approx(0.7, abs=0.03)


def test_in_support_shift_is_estimated_from_the_coarse_bins_within_about_a_point():
    """CBPE's premise: the mix of confidences moves, P(correct | confidence) does not. A calibrated model and
    one right less often than it says (correct with probability confidence squared), 1,000 eval rows, 30
    draws; windows of the eval mix and of a mix piled into the top bin."""
    sketch = confidence_sketch()
    for power in (1, 2):
        errors, before = [], []
        for seed in range(30):
            rng = np.random.default_rng(seed)

            def draw(rows, a, power=power, rng=rng):
                confidence = 0.5 + 0.5 * rng.beta(a, 1.0, rows)
                return confidence, (rng.random(rows) < confidence**power).astype(float)

            confidence, correct = draw(1000, 4.0)
            now = Calibration.read(classifier_map(sketch, confidence, correct))
            old = Calibration.read(classifier_map(sketch, confidence, correct, method="isotonic at mean"))
            for a in (4.0, 8.0):
                window_confidence, _ = draw(20000, a)
                window = sketch.empty_like()
                window.update(window_confidence)
                compact = {"outputs": {"confidence": [window.counts.tolist()]}}
                truth = np.mean(window_confidence**power)
                errors.append(abs(now.estimate(compact) - truth))
                before.append(abs(old.estimate(compact) - truth))
        assert np.mean(errors) < 0.0125, (power, np.mean(errors))
        # reading the fit at one point of each bin (the map before) erred more, on the same draws
        assert np.mean(errors) < 0.8 * np.mean(before), (power, np.mean(errors), np.mean(before))


def test_an_unknown_calibration_method_is_refused():
    with pytest.raises(ValueError, match="unknown calibration method"):
        classifier_map(confidence_sketch(), [0.9], [1.0], method="platt")


def test_a_regressor_map_is_the_error_per_predicted_bin():
    rng = np.random.default_rng(3)
    predicted = rng.normal(size=4000)
    actual = predicted + rng.normal(size=4000) * np.where(predicted > 0, 2.0, 0.5)  # worse on the right
    sketch = NumericSketch.from_values("prediction", predicted)
    doc = regressor_map(sketch, predicted, actual)
    assert doc["metric"] == "mae" and doc["output"] == "prediction"
    window = sketch.empty_like()
    window.update(predicted[predicted > 0])
    compact = {"outputs": {"prediction": [window.counts.tolist()]}}
    assert Calibration.read(doc).estimate(compact) == pytest.approx(2.0 * np.sqrt(2 / np.pi), rel=0.1)


# -- the format: an optional field of the baseline profile ---------------------------------------------------


def test_the_calibration_travels_in_the_profile_outside_its_baseline_id():
    base = synthetic_baseline()
    plain = base.to_dict()
    assert "calibration" not in plain  # a profile without one is written exactly as before
    base.calibration = {"schema": CALIBRATION_SCHEMA, "values": [0.5] * 12}
    again = Profile.from_dict(json.loads(json.dumps(base.to_dict())))
    assert again.calibration == base.calibration and again.baseline_id == base.baseline_id
    message = baseline_payload(device="d1", model={"name": "m", "version": 1}, baseline=again)
    assert message["profile"]["calibration"] == base.calibration  # what the agent publishes, unchanged


def test_a_version_1_bundle_has_no_calibration_and_no_estimate():
    opened = read_bundle(FORMATS / "digits-1.edgebundle", load_public_key(FORMATS / "edgekit.pub"))
    profile = opened.baseline()
    assert profile.calibration is None
    doc = baseline_payload(device="d1", model={"name": "digits", "version": 1}, baseline=profile)
    estimates = Estimates(lambda _: None, clock=lambda: 0.0)
    estimates.learn(doc)
    window = profile.empty_like()
    window.update_outputs(labels=[0, 1], probabilities=[[0.9, 0.1] + [0.0] * 8, [0.2, 0.8] + [0.0] * 8])
    summary = {"model": {"name": "digits", "version": 1}, "profile": window.to_compact()}
    assert estimates.facts(summary) == {}


@pytest.mark.parametrize(
    "doc",
    [None, [], {"schema": "edgekit.calibration/9"}, {"schema": CALIBRATION_SCHEMA, "metric": "accuracy"}],
)
def test_a_malformed_calibration_gives_no_estimate_rather_than_an_error(doc):
    assert Calibration.read(doc) is None


# -- package --eval, then ingest and alerts --------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(digits, digits_onnx, keypair, tmp_path_factory):
    """digits v1 packaged by the CLI with half the test split as --eval; the other half feeds the windows."""
    from tests.conftest import Cli

    work = tmp_path_factory.mktemp("cbpe")
    with np.load(digits.test) as npz:
        test = dict(npz)
    order = np.random.default_rng(0).permutation(len(test["y"]))
    held, windows = order[: len(order) // 2], order[len(order) // 2 :]
    np.savez(work / "eval.npz", X=test["X"][held], y=test["y"][held], feature_names=test["feature_names"])
    path = work / "digits-1.edgebundle"
    result = Cli()(
        "package", digits_onnx, "--name", "digits", "--version", 1, "--baseline", digits.train,
        "--eval", work / "eval.npz", "--key", keypair[0], "-o", path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    profile = read_bundle(path, load_public_key(keypair[1])).baseline()
    return profile, load_model(str(digits_onnx)), test["X"][windows].astype(np.float32), test["y"][windows]


def window_message(profile, model, X, y, seq, *, device="d1", version=1, rows=1000, seed=0, noise=0.0):
    """One summary as an agent sends it: the device's own sketches and drift report; the window's realized
    accuracy (delayed labels on every row) is in its ``accuracy``."""
    rng = np.random.default_rng(seed)
    index = rng.choice(len(y), rows)
    values = np.clip(X[index] + rng.normal(0.0, noise, (rows, X.shape[1])), 0, 16).astype(np.float32)
    answer = model.predict(values)
    window = profile.empty_like()
    window.update_inputs(values)
    window.update_outputs(labels=answer.labels, probabilities=answer.probabilities)
    window.update_latency(np.ones(rows))
    correct = int((answer.labels == y[index]).sum())
    start = 1.7e9 + 60 * seq
    closed = ClosedWindow(
        window, start, start + 60, np.ones(rows), {}, rows, correct, drift=drift_report(profile, window)
    )
    doc = build_summary(closed, device=device, fleet="f", model={"name": "digits", "version": version}, seq=seq)
    return Message(f"edgekit/v1/f/{device}/summary", encode(doc), start + 60), correct / rows


def baseline_message(profile, *, device="d1", version=1):
    doc = baseline_payload(device=device, model={"name": "digits", "version": version}, baseline=profile)
    return Message(f"edgekit/v1/f/{device}/baseline", encode(doc), 1.7e9)


def test_package_eval_stores_the_map_in_the_baseline(calibrated):
    profile = calibrated[0]
    doc = profile.calibration
    assert doc["schema"] == CALIBRATION_SCHEMA and doc["model"] == {"name": "digits", "version": 1}
    assert doc["rows"] == 297 and len(doc["values"]) == len(profile.outputs["confidence"].counts)
    assert 0.9 < doc["expected"] <= 1.0 and abs(doc["expected"] - doc["observed"]) < 0.01


def test_package_eval_without_labels_says_what_to_give(digits, digits_onnx, keypair, tmp_path):
    from edgekit.bundle.package import build_bundle

    with np.load(digits.test) as npz:
        test = dict(npz)
    np.savez(tmp_path / "unlabelled.npz", X=test["X"])
    with pytest.raises(EdgekitError, match="has no labels"):
        build_bundle(
            str(digits_onnx), name="digits", version=1, baseline_path=str(digits.train), key_path=str(keypair[0]),
            output=str(tmp_path / "b.edgebundle"), eval_paths=[str(tmp_path / "unlabelled.npz")],
        )  # fmt: skip


def test_windows_under_shift_carry_an_estimate_close_to_their_realized_accuracy(calibrated, tmp_path):
    profile, model, X, y = calibrated
    store = open_store(str(tmp_path / "fleet.db"))
    ingestor = Ingestor(store)
    ingestor.handle([baseline_message(profile)])
    realized = {}
    for seq, noise in enumerate((0.0, 0.0, 0.1, 0.1), start=1):  # sensor noise the model still reads right
        message, realized[seq] = window_message(profile, model, X, y, seq, seed=seq, noise=noise)
        ingestor.handle([message])
    facts = {f["seq"]: f for f in store.recent_facts("d1", 10)}
    errors = [abs(facts[s]["estimated_accuracy"] - realized[s]) for s in realized]
    assert np.mean(errors) < 0.02 and max(errors) < 0.035, (errors, realized)
    assert facts[1]["expected_accuracy"] == pytest.approx(profile.calibration["expected"], abs=1e-4)
    assert all(facts[s]["accuracy"] == pytest.approx(realized[s]) for s in realized)
    # an ingest worker sees no baseline message: it reads the stored one
    worker = Ingestor(store)
    message, _ = window_message(profile, model, X, y, 5, seed=5)
    worker.handle([message])
    assert store.recent_facts("d1", 1)[0]["estimated_accuracy"] > 0.9
    store.close()


def test_estimated_accuracy_drop_opens_on_noisy_windows_and_closes_when_clean(calibrated, tmp_path):
    profile, model, X, y = calibrated
    store = open_store(str(tmp_path / "fleet.db"))
    ingestor, engine = Ingestor(store), AlertEngine(store, AlertRules(), AlertSinks(log=False))
    ingestor.handle([baseline_message(profile), window_message(profile, model, X, y, 1, seed=1)[0]])
    assert engine.evaluate(now=1.7e9 + 200) == []
    ingestor.handle([window_message(profile, model, X, y, 2, seed=2, noise=0.5)[0]])
    opened = [a for a in engine.evaluate(now=1.7e9 + 300) if a["rule"] == RULE]  # drift and labels' rules fire too
    assert [(a["state"], a["rule"], a["subject"]) for a in opened] == [
        ("open", "estimated_accuracy_drop", "confidence")
    ]
    assert opened[0]["evidence"]["estimated_accuracy"] < opened[0]["evidence"]["expected_accuracy"] - 0.05
    ingestor.handle([window_message(profile, model, X, y, 3, rows=20, seed=3)[0]])  # too small to close it
    assert [a for a in engine.evaluate(now=1.7e9 + 400) if a["rule"] == RULE] == []
    ingestor.handle([window_message(profile, model, X, y, 4, seed=4)[0]])
    closed = [a for a in engine.evaluate(now=1.7e9 + 500) if a["rule"] == RULE]
    assert [(a["state"], a["rule"]) for a in closed] == [("closed", "estimated_accuracy_drop")]
    store.close()


def test_another_version_sharing_the_baseline_gets_no_estimate_from_its_map(calibrated, tmp_path):
    profile, model, X, y = calibrated
    store = open_store(str(tmp_path / "fleet.db"))
    Ingestor(store).handle([baseline_message(profile)])  # stored: version 1's map
    Ingestor(store).handle([window_message(profile, model, X, y, 1, version=2, seed=1)[0]])  # a worker, version 2
    assert "estimated_accuracy" not in store.recent_facts("d1", 1)[0]
    store.close()


def test_a_bundle_without_a_map_stores_windows_without_estimate_or_alert(tmp_path):
    base = synthetic_baseline()  # as an older agent publishes it (no calibration field), or no --eval
    store = open_store(str(tmp_path / "fleet.db"))
    ingestor, engine = Ingestor(store), AlertEngine(store, AlertRules(), AlertSinks(log=False))
    topic, payload = synthetic_summary(base, "d1", 1)
    ingestor.handle([Message(topic, payload, 1.7e9)])
    facts = store.recent_facts("d1", 1)[0]
    assert "estimated_accuracy" not in facts and facts["seq"] == 1
    assert all(a["rule"] != "estimated_accuracy_drop" for a in engine.evaluate(now=1.7e9 + 60))
    store.close()


def test_the_rule_reads_its_limit_from_alerts_toml(tmp_path):
    path = tmp_path / "alerts.toml"
    path.write_text("[rules]\nestimated_accuracy_drop_max = 0.1\nestimated_accuracy_min_rows = 50\n")
    rules, _ = load_alert_config(path)
    assert rules.estimated_accuracy_drop_max == 0.1 and rules.estimated_accuracy_min_rows == 50


def test_the_device_page_shows_the_estimate_beside_realized_accuracy():
    from edgekit.fleet.pages.device import render_estimates

    facts = [
        {"seq": 2, "window": {"end": "t2"}, "rows": 1000, "estimated_accuracy": 0.912, "expected_accuracy": 0.97,
         "accuracy": 0.905},
        {"seq": 1, "window": {"end": "t1"}, "rows": 1000, "accuracy": None},
    ]  # fmt: skip
    html = render_estimates(facts)
    assert "Estimated vs realized accuracy" in html and "0.912" in html and "0.905" in html and "0.970" in html
    assert render_estimates([facts[1]]) == ""


def test_build_baseline_confidence_sketch_matches_the_map_length():
    base = build_baseline(np.zeros((10, 2)), ["a", "b"], labels=[0, 1], predicted_labels=[0] * 10)
    doc = classifier_map(base.outputs["confidence"], np.full(30, 0.95), np.ones(30))
    assert len(doc["values"]) == len(base.outputs["confidence"].counts)


@pytest.mark.slow
def test_bench_quick_run_measures_every_method_with_bias_and_floor(tmp_path):
    """scripts/bench_cbpe.py --quick runs end to end (the fixtures, onnxruntime, the device's sketch, the
    collector's estimate) and writes every method's error with the bias and floor that explain it."""
    import subprocess
    import sys

    root = FORMATS.parent.parent
    out = tmp_path / "cbpe.json"
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_cbpe.py"), "--quick", "--windows", "2", "--json", str(out)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "its floor (a perfect estimate's MAE)" in done.stdout
    rows = json.loads(out.read_text())["table"]
    assert {(r["fixture"], r["family"]) for r in rows} == {
        (f, k) for f in ("digits", "cancer") for k in ("none", "noise")
    }
    for row in rows:
        assert len(row["mae_points"]) == 10 and all(v is not None and v >= 0 for v in row["mae_points"].values())
        assert row["floor_points"] > 0 and row["bias_points"] is not None
    unshifted = [r for r in rows if r["family"] == "none"]
    assert all(r["mae_points"]["isotonic+prior (default)"] < 2.5 for r in unshifted), unshifted
    # the shift the docs cite is real (pixel noise of sigma 1 costs the digits MLP 40 points), and what error
    # the estimate shows there is not the window's sampling: its floor is small
    worst = next(r for r in rows if r["fixture"] == "digits" and r["shift"] == "sigma 1.0")
    assert worst["realized"] < 0.6 and worst["floor_points"] < 2
