import json

import numpy as np


def test_int8_against_scikit_learn_passes_with_the_full_report(cli, digits, digits_int8):
    result = cli(
        "validate",
        digits_int8,
        "--reference",
        digits.model,
        "--data",
        digits.test,
        "--max-accuracy-drop",
        "0.02",
        "--min-agreement",
        "0.97",
        "--json",
    )
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
    result = cli(
        "validate",
        digits_int8,
        "--reference",
        digits_onnx,
        "--data",
        digits.test,
        "--min-agreement",
        "1.0",
        "--max-size-ratio",
        "0.01",
        "--json",
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert {f["check"] for f in report["failures"]} >= {"size_ratio"}
    assert report["layer_errors"] and "sqnr_db" in report["layer_errors"][0]
    text = cli("validate", digits_int8, "--reference", digits_onnx, "--data", digits.test, "--max-size-ratio", "0.01")
    assert (
        text.exit_code == 1
        and "FAILED: size " in text.stdout
        and "of digits.onnx is over --max-size-ratio 0.01" in text.stdout
    )
    assert "per-layer error" in text.stdout


def test_bad_inputs_exit_2(cli, digits, digits_onnx, tmp_path):
    X = np.load(digits.test)["X"]
    np.savez(tmp_path / "unlabelled.npz", X=X)
    np.savez(tmp_path / "narrow.npz", X=X[:, :10], y=np.load(digits.test)["y"])
    nan = X.copy()
    nan[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", X=nan)
    (tmp_path / "cols.csv").write_text("a,b,label\n1,2,0\n")
    cases = [
        (
            ["--data", tmp_path / "unlabelled.npz", "--max-accuracy-drop", "0.01"],
            "has no labels, which --max-accuracy-drop needs",
        ),
        (["--data", tmp_path / "narrow.npz"], "has 10 feature columns, the model takes 64"),
        (["--data", tmp_path / "nan.npz"], "missing value(s), first at row 0 column 'pixel_0_0'"),
        (
            ["--data", tmp_path / "cols.csv"],
            "lacks the model's columns 'pixel_0_0'",
        ),  # the model knows its names: matched by name
        (["--data", tmp_path / "missing.npz"], "no such file"),
    ]
    for args, message in cases:
        result = cli("validate", digits_onnx, "--reference", digits.model, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (message, result.stderr)


def test_models_of_different_shapes_are_not_compared(cli, digits, cancer, tmp_path):
    result = cli("validate", digits.model, "--reference", cancer.model, "--data", digits.test)
    assert result.exit_code == 2 and "the reference takes 30 features and the candidate 64" in result.stderr


def test_size_ratio_says_what_it_is_relative_to(cli, digits, digits_onnx):
    """The ratio is against the --reference file (here the pickle), so the table and the JSON name it."""
    report = json.loads(
        cli("validate", digits_onnx, "--reference", digits.model, "--data", digits.test, "--json").stdout
    )
    assert (
        report["size_ratio_of"] == "digits.joblib"
        and report["size_ratio"] == report["candidate"]["size_bytes"] / report["reference"]["size_bytes"]
    )
    text = cli("validate", digits_onnx, "--reference", digits.model, "--data", digits.test).stdout
    header = text.splitlines()[0]
    assert "candidate vs reference" in header and f"{report['size_ratio']:.3f}x the size" in text


def _ridge(path, X, y, alpha):
    import joblib
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    joblib.dump(make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, y), path)
    return path


def test_regressor_reports_name_rmse_and_the_agreement_tolerance(cli, keypair, tmp_path):
    """A regressor has no accuracy: every report names RMSE, and agreement says its tolerance."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    np.savez(tmp_path / "r.npz", X=X, y=y)
    _ridge(tmp_path / "r.joblib", X, y, 1.0)
    _ridge(tmp_path / "stiff.joblib", X, y, 100.0)  # more shrinkage: a higher RMSE on the data it was fitted on
    assert cli("convert", tmp_path / "stiff.joblib", "-o", tmp_path / "stiff.onnx").exit_code == 0
    args = (
        "validate",
        tmp_path / "stiff.onnx",
        "--reference",
        tmp_path / "r.joblib",
        "--data",
        tmp_path / "r.npz",
        "--max-accuracy-drop",
        "0.01",
        "--min-agreement",
        "0.99",
    )
    report = json.loads(cli(*args, "--json").stdout)
    assert (
        report["metric"] == "rmse"
        and "RMSE" in report["accuracy_drop_meaning"]
        and "standard deviation" in report["agreement_meaning"]
    )
    messages = {f["check"]: f["message"] for f in report["failures"]}
    assert (
        messages["accuracy_drop"].startswith("RMSE increase ")
        and "(RMSE increase ≤ 1.00 %)" in messages["accuracy_drop"]
    )
    assert "within 1% of the reference outputs' standard deviation" in messages["agreement"]
    text = cli(*args).stdout
    assert "RMSE change +" in text and "mae" in text and "accuracy" not in text.replace("--max-accuracy-drop", "")
    (tmp_path / "report.json").write_text(
        cli(
            "validate",
            tmp_path / "stiff.onnx",
            "--reference",
            tmp_path / "r.joblib",
            "--data",
            tmp_path / "r.npz",
            "--json",
        ).stdout
    )
    bundle = tmp_path / "r.edgebundle"
    assert (
        cli(
            "package",
            tmp_path / "stiff.onnx",
            "--name",
            "r",
            "--version",
            "1",
            "--baseline",
            tmp_path / "r.npz",
            "--key",
            keypair[0],
            "--report",
            tmp_path / "report.json",
            "-o",
            bundle,
        ).exit_code
        == 0
    )
    line = next(x for x in cli("inspect", bundle).stdout.splitlines() if x.startswith("validation"))
    assert (
        "RMSE increase" in line and "accuracy" not in line and "standard deviation" in line and "x of r.joblib" in line
    )


def test_the_limits_help_says_what_they_mean_for_regressors(cli):
    for command in ("validate", "convert"):
        text = " ".join(cli(command, "--help").stdout.split())
        assert "relative RMSE increase" in text and "standard deviation" in text, command
