import json

import numpy as np


def test_int8_against_scikit_learn_passes_with_the_full_report(cli, digits, digits_int8):
    result = cli("validate", digits_int8, "--reference", digits.model, "--data", digits.test, "--max-accuracy-drop", "0.02", "--min-agreement", "0.97", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["failures"] == []
    for key in ("size_ratio", "accuracy_drop", "agreement", "max_abs_diff", "latency"):
        assert key in report
    assert report["reference"]["kind"] == "sklearn" and report["candidate"]["size_bytes"] > 0
    assert report["reference"]["metric"] > 0.95 and report["candidate"]["metric"] > 0.95
    for side in ("reference", "candidate"):
        for batch in ("1", "256"):
            assert 0 < report["latency"][side][batch]["p50_ms"] <= report["latency"][side][batch]["p99_ms"]
    assert "1 intra-op thread" in report["latency"]["method"]


def test_human_table_by_default(cli, digits, digits_onnx):
    result = cli("validate", digits_onnx, "--reference", digits.model, "--data", digits.test_csv)
    assert result.exit_code == 0
    assert "accuracy" in result.stdout and "latency b256 p50/p99 ms" in result.stdout and "PASSED" in result.stdout


def test_failing_threshold_exits_1_names_it_and_shows_layer_errors(cli, digits_onnx, digits_int8, digits):
    result = cli("validate", digits_int8, "--reference", digits_onnx, "--data", digits.test, "--min-agreement", "1.0", "--max-size-ratio", "0.01", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert {f["check"] for f in report["failures"]} >= {"size_ratio"}
    assert report["layer_errors"] and "sqnr_db" in report["layer_errors"][0]
    text = cli("validate", digits_int8, "--reference", digits_onnx, "--data", digits.test, "--max-size-ratio", "0.01")
    assert text.exit_code == 1 and "FAILED: size_ratio" in text.stdout and "per-layer error" in text.stdout


def test_bad_inputs_exit_2(cli, digits, digits_onnx, tmp_path):
    X = np.load(digits.test)["X"]
    np.savez(tmp_path / "unlabelled.npz", X=X)
    np.savez(tmp_path / "narrow.npz", X=X[:, :10], y=np.load(digits.test)["y"])
    nan = X.copy()
    nan[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", X=nan)
    (tmp_path / "cols.csv").write_text("a,b,label\n1,2,0\n")
    cases = [
        (["--data", tmp_path / "unlabelled.npz", "--max-accuracy-drop", "0.01"], "has no labels, which --max-accuracy-drop needs"),
        (["--data", tmp_path / "narrow.npz"], "has 10 feature columns, the model takes 64"),
        (["--data", tmp_path / "nan.npz"], "missing value(s), first at row 0 column 'pixel_0_0'"),
        (["--data", tmp_path / "cols.csv"], "lacks the model's columns 'pixel_0_0'"),  # the model knows its names: matched by name
        (["--data", tmp_path / "missing.npz"], "no such file"),
    ]
    for args, message in cases:
        result = cli("validate", digits_onnx, "--reference", digits.model, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (message, result.stderr)


def test_models_of_different_shapes_are_not_compared(cli, digits, cancer, tmp_path):
    result = cli("validate", digits.model, "--reference", cancer.model, "--data", digits.test)
    assert result.exit_code == 2 and "the reference takes 30 features and the candidate 64" in result.stderr
