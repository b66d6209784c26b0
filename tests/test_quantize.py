import json

import numpy as np
import onnx

from edgekit.build.layer_error import layer_errors
from edgekit.build.quant_search import Limits, Trial, _choose
from edgekit.build.quantize import QuantConfig
from edgekit.models.loading import load_model


def ops(path):
    return {n.op_type for n in onnx.load(path).graph.node}


def test_dynamic_int8_without_calibration(cli, digits, tmp_path):
    out = tmp_path / "d.int8.onnx"
    result = cli("convert", digits.model, "--quantize", "int8", "--force", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["quantization"]["chosen"] == "dynamic per-tensor S8 weights"
    assert "DynamicQuantizeLinear" in ops(out)
    assert "accuracy was not checked" in doc["notes"][0]


def test_static_qdq_with_calibration_keeps_preprocessing_in_float(cli, digits, tmp_path):
    out = tmp_path / "d.int8.onnx"
    result = cli(
        "convert",
        digits.model,
        "--quantize",
        "int8",
        "--calibration",
        digits.train,
        "--per-channel",
        "--force",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["quantization"]["chosen"] == "static QDQ per-channel U8/S8 minmax"
    graph = onnx.load(out).graph
    assert "QuantizeLinear" in ops(out) and "Scaler" not in ops(out)
    scaler_mul = next(n for n in graph.node if n.name.startswith("edgekit_preprocessing/") and n.op_type == "Mul")
    assert "DequantizeLinear" not in {p.op_type for p in graph.node if scaler_mul.input[0] in p.output}
    X, y = np.load(digits.test)["X"], np.load(digits.test)["y"]
    assert np.mean(load_model(out).predict(X).labels == y) > 0.95


def test_search_tries_every_configuration_and_prints_the_table(cli, digits, tmp_path):
    out = tmp_path / "d.int8.onnx"
    result = cli(
        "convert",
        digits.model,
        "--quantize",
        "int8",
        "--calibration",
        digits.train,
        "--eval",
        digits.test_csv,
        "--max-accuracy-drop",
        "0.01",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    for name in (
        "float32",
        "dynamic per-tensor",
        "static QDQ per-tensor U8/S8",
        "static QDQ per-channel U8/S8",
        "static QDQ per-tensor S8/S8",
        "static QDQ per-channel S8/S8",
    ):
        assert name in result.stdout
    assert "wrote" in result.stdout and out.exists()


def test_search_json_records_each_trial(cli, digits, tmp_path):
    result = cli(
        "convert",
        digits.model,
        "--quantize",
        "int8",
        "--calibration",
        digits.train,
        "--eval",
        digits.test,
        "-o",
        tmp_path / "o.onnx",
        "--json",
    )
    doc = json.loads(result.stdout)["quantization"]
    assert len(doc["trials"]) == 6 and doc["max_accuracy_drop"] == 0.01 and doc["min_agreement"] is None
    chosen = next(t for t in doc["trials"] if t["name"] == doc["chosen"])
    assert chosen["accuracy_drop"] <= 0.01
    if doc["quantized"]:  # int8 is kept only when it is not slower at any batch size
        assert all(s >= 1.0 for s in chosen["speedup"].values())


def test_linear_ml_ops_are_reported_not_quantizable_and_nothing_is_written(cli, cancer, tmp_path):
    out = tmp_path / "c.int8.onnx"
    result = cli("convert", cancer.model, "--quantize", "int8", "--calibration", cancer.train, "-o", out)
    assert result.exit_code == 2
    assert "cannot quantize to int8: its work is done by LinearClassifier (ai.onnx.ml operators)" in result.stderr
    assert not out.exists()


def test_tree_ensembles_are_reported_not_quantizable(cli, tmp_path):
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    X, y = load_iris(return_X_y=True)
    joblib.dump(RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y), tmp_path / "rf.joblib")
    result = cli("convert", tmp_path / "rf.joblib", "--quantize", "int8", "-o", tmp_path / "rf.onnx")
    assert result.exit_code == 2 and "TreeEnsembleClassifier" in result.stderr


def test_options_that_need_each_other(cli, digits, tmp_path):
    result = cli(
        "convert", digits.model, "--quantize", "int8", "--max-accuracy-drop", "0.01", "-o", tmp_path / "o.onnx"
    )
    assert result.exit_code == 2 and "--max-accuracy-drop needs labelled --eval data" in result.stderr
    result = cli("convert", digits.model, "--calibration", digits.train, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "only with --quantize int8" in result.stderr
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, X=np.load(digits.test)["X"])
    result = cli("convert", digits.model, "--quantize", "int8", "--eval", unlabelled, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "has no labels, which --eval needs" in result.stderr


def test_nan_in_calibration_data_is_refused(cli, digits, tmp_path):
    X = np.load(digits.train)["X"].copy()
    X[3, 5] = np.nan
    np.savez(tmp_path / "nan.npz", X=X)
    result = cli(
        "convert", digits.model, "--quantize", "int8", "--calibration", tmp_path / "nan.npz", "-o", tmp_path / "o.onnx"
    )
    assert result.exit_code == 2
    assert "missing value(s), first at row 3 column 'f5', and the model has no imputer" in result.stderr


def test_layer_errors_rank_quantized_layers(digits_onnx, digits_int8, digits):
    X = np.load(digits.test)["X"]
    report = layer_errors(onnx.load(digits_onnx), onnx.load(digits_int8), X)
    assert report and report == sorted(report, key=lambda r: r["sqnr_db"])
    assert any(r["op"] == "Gemm" for r in report)


def _trial(name, drop, speed1, speed256, config=QuantConfig("dynamic")):
    trial = Trial(name, config, drop=drop, agreement=0.99, within=drop <= 0.01, size_bytes=10)
    trial.latency = {1: {"p50_ms": 1.0 / speed1}, 256: {"p50_ms": 1.0 / speed256}}
    return trial


def _baseline():
    base = Trial("float32", None, drop=0.0, within=True, size_bytes=40)
    base.latency = {1: {"p50_ms": 1.0}, 256: {"p50_ms": 1.0}}
    return base


def test_choice_keeps_the_fastest_within_the_limit():
    outcome = _choose(
        _baseline(),
        [_trial("a", 0.001, 1.5, 2.0), _trial("b", 0.002, 2.0, 3.0), _trial("c", 0.05, 5.0, 5.0)],
        limits=Limits(0.01),
        force=False,
        metric_name="accuracy",
    )
    assert outcome.chosen.name == "b" and outcome.passed


def test_choice_keeps_float32_when_int8_is_slower_unless_forced():
    trials = [_trial("slow", 0.0, 0.8, 1.3)]
    kept = _choose(_baseline(), trials, limits=Limits(0.01), force=False, metric_name="accuracy")
    assert kept.chosen.name == "float32" and kept.passed and "int8 is slower than float32" in kept.verdict
    forced = _choose(_baseline(), trials, limits=Limits(0.01), force=True, metric_name="accuracy")
    assert forced.chosen.name == "slow" and "--force" in forced.verdict


def test_choice_fails_when_nothing_is_within_the_limit():
    outcome = _choose(
        _baseline(),
        [_trial("a", 0.03, 2, 2), _trial("b", 0.02, 1, 1)],
        limits=Limits(0.01),
        force=False,
        metric_name="accuracy",
    )
    assert (
        not outcome.passed
        and outcome.chosen.name == "b"
        and "no int8 candidate meets accuracy drop ≤ 1.00 points" in outcome.verdict
    )


def test_agreement_limit_keeps_worst_layers_in_float(cli, wide, tmp_path):
    """Static int8 flips a few held-out boundary rows of the wide MLP; demanding full agreement makes the
    search keep the layers of worst error in float and try again, and report each attempt."""
    result = cli(
        "convert",
        wide.model,
        "--quantize",
        "int8",
        "--calibration",
        wide.train,
        "--eval",
        wide.test,
        "--mode",
        "static",
        "--per-tensor",
        "--activation-type",
        "uint8",
        "--min-agreement",
        "1.0",
        "--force",
        "-o",
        tmp_path / "w.onnx",
        "--json",
    )
    doc = json.loads(result.stdout)["quantization"]
    assert doc["min_agreement"] == 1.0
    retried = [t for t in doc["trials"] if t["config"] and t["config"].get("float_nodes")]
    assert retried, doc["trials"]
    assert all(t["config"]["mode"] == "static" for t in retried)
    assert result.exit_code == (0 if doc["passed"] else 1)


def _faster_but_larger():
    trial = _trial("static QDQ per-channel", 0.0, 1.11, 1.05)
    trial.size_bytes = 80  # float32 is 40: Q/DQ nodes doubled a small model
    return trial


def test_choice_never_keeps_an_int8_model_larger_than_float32_by_default():
    outcome = _choose(_baseline(), [_faster_but_larger()], limits=Limits(0.01), force=False, metric_name="accuracy")
    assert outcome.chosen.name == "float32" and outcome.passed
    assert "larger than float32" in outcome.verdict and "--prefer speed" in outcome.verdict
    row = outcome.to_dict()["trials"][1]
    assert row["note"] == "larger than float32 (2.00x); --prefer speed allows it" and row["size_ratio"] == 2.0
    assert outcome.to_dict()["prefer"] == "size" and outcome.to_dict()["size_ratio_of"] == "float32"


def test_choice_keeps_the_smaller_int8_model_over_a_faster_larger_one():
    smaller = _trial("dynamic", 0.0, 1.02, 1.01)
    outcome = _choose(
        _baseline(), [_faster_but_larger(), smaller], limits=Limits(0.01), force=False, metric_name="accuracy"
    )
    assert outcome.chosen.name == "dynamic" and "0.25x the size of float32" in outcome.verdict


def test_prefer_speed_keeps_a_faster_larger_int8_model():
    outcome = _choose(
        _baseline(), [_faster_but_larger()], limits=Limits(0.01), force=False, metric_name="accuracy", prefer="speed"
    )
    assert (
        outcome.chosen.name == "static QDQ per-channel"
        and "2.00x the size of float32 (80 B vs 40 B)" in outcome.verdict
    )
    assert outcome.to_dict()["trials"][1]["note"] is None


def test_prefer_parses_and_reaches_the_library(cli, digits, tmp_path, monkeypatch):
    import edgekit.cli.convert as convert_cli

    seen = {}

    def fake_convert(source, output, *, quantize, **kwargs):
        seen["options"] = quantize
        raise SystemExit(0)

    monkeypatch.setattr(convert_cli, "convert_model", fake_convert)
    cli("convert", digits.model, "--quantize", "int8", "--prefer", "speed", "-o", tmp_path / "d.onnx")
    assert seen["options"].prefer == "speed"
    cli("convert", digits.model, "--quantize", "int8", "-o", tmp_path / "d.onnx")
    assert seen["options"].prefer == "size"
    refused = cli("convert", digits.model, "--prefer", "speed", "-o", tmp_path / "d.onnx")
    assert refused.exit_code == 2 and "--prefer only apply with --quantize int8" in refused.stderr
    assert (
        cli("convert", digits.model, "--quantize", "int8", "--prefer", "small", "-o", tmp_path / "d.onnx").exit_code
        == 2
    )


def test_a_regressors_search_speaks_of_rmse_not_accuracy():
    outcome = _choose(
        _baseline(),
        [_trial("a", 0.03, 2, 2), _trial("b", 0.02, 1, 1)],
        limits=Limits(0.01),
        force=False,
        metric_name="rmse",
    )
    assert (
        "no int8 candidate meets RMSE increase ≤ 1.00 %; kept the most accurate, b (RMSE increase 2.00 %"
        in outcome.verdict
    )
    assert (
        "RMSE" in outcome.to_dict()["accuracy_drop_meaning"]
        and "standard deviation" in outcome.to_dict()["agreement_meaning"]
    )
