"""XGBoost and LightGBM through ``edgekit convert``: every way in converts, and decides as the library does.

Exactness is checked where trees are fragile: on held-out rows with NaN, and on rows placed exactly
on every split threshold and one representable step either side of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightgbm
import numpy as np
import pytest
import xgboost  # the boost extra: dev installs it, so a missing one fails here

from edgekit.build.convert import convert_model  # noqa: E402
from edgekit.build.validate import validate  # noqa: E402
from edgekit.local.fixtures import fixtures_usable, make_fixtures  # noqa: E402
from edgekit.models import compare  # noqa: E402
from edgekit.models.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIN_AGREEMENT, MAX_DELTA_P = 0.999, 1e-4


@pytest.fixture(scope="module")
def boosters(tmp_path_factory) -> Path:
    """The committed booster fixtures, or fresh ones when scikit-learn changed since they were made."""
    names = ("xgb_cancer", "lgb_wine")
    if fixtures_usable(ROOT / "fixtures", names):
        return ROOT / "fixtures"
    directory = tmp_path_factory.mktemp("boosters")
    make_fixtures(directory, names)
    return directory


def _split(X, y, seed=0):
    """Train on two thirds; hold out the rest with a tenth of its values missing."""
    from sklearn.model_selection import train_test_split

    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.33, random_state=seed)
    X_test = X_test.copy()
    X_test[np.random.default_rng(seed).random(X_test.shape) < 0.1] = np.nan
    return X_train, X_test, y_train, y_test


def _cancer():
    from sklearn.datasets import load_breast_cancer

    return _split(*load_breast_cancer(return_X_y=True))


def _validated(candidate: Path, reference: Path, data: Path) -> dict:
    report = validate(str(candidate), reference_path=str(reference), data_path=str(data), latency_budget=0.0)
    assert report["agreement"] >= MIN_AGREEMENT, report["agreement"]
    return report


def test_xgboost_native_json_through_the_cli(cli, boosters, tmp_path):
    out = tmp_path / "xgb.onnx"
    result = cli("convert", boosters / "xgb_cancer.json", "-o", out)
    assert result.exit_code == 0, result.output
    assert "XGBoost trees in float32" in result.stdout
    test = boosters / "xgb_cancer_test.npz"
    assert np.isnan(np.load(test)["X"]).any()
    result = cli("validate", out, "--reference", boosters / "xgb_cancer.json", "--data", test, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["reference"]["kind"] == "xgboost"
    assert report["agreement"] >= MIN_AGREEMENT and report["max_abs_diff"] <= MAX_DELTA_P
    onnx_model = load_model(out)
    assert onnx_model.input.allow_nan and onnx_model.input.feature_names[0] == "mean_radius"


def test_lightgbm_native_txt_keeps_float64_thresholds(boosters, tmp_path):
    out = tmp_path / "lgb.onnx"
    outcome = convert_model(str(boosters / "lgb_wine.txt"), str(out))
    assert any("float64" in note for note in outcome.notes), outcome.notes
    report = _validated(out, boosters / "lgb_wine.txt", boosters / "lgb_wine_test.npz")
    assert report["max_abs_diff"] <= MAX_DELTA_P and report["task"] == "classification"
    assert load_model(out).input.dtype == "float64"


def test_xgb_classifier_pickled(tmp_path):
    import joblib

    X_train, X_test, y_train, y_test = _cancer()
    joblib.dump(xgboost.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(X_train, y_train), tmp_path / "x.pkl")
    np.savez(tmp_path / "test.npz", X=X_test, y=y_test)
    convert_model(str(tmp_path / "x.pkl"), str(tmp_path / "x.onnx"))
    report = _validated(tmp_path / "x.onnx", tmp_path / "x.pkl", tmp_path / "test.npz")
    assert report["max_abs_diff"] <= MAX_DELTA_P


def test_xgb_classifier_fitted_on_a_dataframe_keeps_its_column_names(tmp_path):
    import joblib
    import pandas

    X_train, X_test, y_train, y_test = _cancer()
    names = [f"col_{i}" for i in range(X_train.shape[1])]
    model = xgboost.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1)
    joblib.dump(model.fit(pandas.DataFrame(X_train, columns=names), y_train), tmp_path / "named.joblib")
    np.savez(tmp_path / "test.npz", X=X_test, y=y_test, feature_names=np.asarray(names))
    convert_model(str(tmp_path / "named.joblib"), str(tmp_path / "named.onnx"))
    assert load_model(tmp_path / "named.onnx").input.feature_names == tuple(names)
    report = _validated(tmp_path / "named.onnx", tmp_path / "named.joblib", tmp_path / "test.npz")
    assert report["max_abs_diff"] <= MAX_DELTA_P


def test_xgb_regressor(tmp_path):
    import joblib
    from sklearn.datasets import load_diabetes

    X_train, X_test, y_train, y_test = _split(*load_diabetes(return_X_y=True))
    model = xgboost.XGBRegressor(n_estimators=20, max_depth=3, n_jobs=1).fit(X_train, y_train)
    joblib.dump(model, tmp_path / "r.joblib")
    np.savez(tmp_path / "test.npz", X=X_test, y=y_test)
    convert_model(str(tmp_path / "r.joblib"), str(tmp_path / "r.onnx"))
    report = _validated(tmp_path / "r.onnx", tmp_path / "r.joblib", tmp_path / "test.npz")
    # values of a few hundred, summed in float32 by onnxruntime: a relative 1e-6 is a few float32 steps
    assert report["task"] == "regression" and report["max_abs_diff"] <= 1e-6 * np.abs(y_train).max()


def test_lgbm_classifier_at_the_end_of_a_pipeline(tmp_path):
    import joblib
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X_train, X_test, y_train, y_test = _cancer()
    model = lightgbm.LGBMClassifier(n_estimators=30, num_leaves=8, n_jobs=1, verbose=-1)
    joblib.dump(make_pipeline(StandardScaler(), model).fit(X_train, y_train), tmp_path / "p.joblib")
    np.savez(tmp_path / "test.npz", X=X_test, y=y_test)
    outcome = convert_model(str(tmp_path / "p.joblib"), str(tmp_path / "p.onnx"))
    assert any("LightGBM" in note for note in outcome.notes), outcome.notes
    report = _validated(tmp_path / "p.onnx", tmp_path / "p.joblib", tmp_path / "test.npz")
    assert report["max_abs_diff"] <= MAX_DELTA_P


def _xgboost_splits(path: Path) -> list[tuple[int, float]]:
    booster = xgboost.Booster()
    booster.load_model(str(path))
    trees = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    return [
        (feature, threshold)
        for tree in trees
        for feature, threshold, left in zip(
            tree["split_indices"], tree["split_conditions"], tree["left_children"], strict=True
        )
        if left != -1
    ]


def _lightgbm_splits(path: Path) -> list[tuple[int, float]]:
    def walk(node):
        if "split_feature" in node:
            yield node["split_feature"], float(node["threshold"])
            yield from walk(node["left_child"])
            yield from walk(node["right_child"])

    tree_info = lightgbm.Booster(model_file=str(path)).dump_model()["tree_info"]
    return [split for tree in tree_info for split in walk(tree["tree_structure"])]


@pytest.mark.parametrize(("name", "splits"), [("xgb_cancer.json", _xgboost_splits), ("lgb_wine.txt", _lightgbm_splits)])
def test_rows_on_every_threshold_branch_as_the_library_does(boosters, tmp_path, name, splits):
    reference = load_model(boosters / name)
    convert_model(str(boosters / name), str(tmp_path / "m.onnx"))
    candidate = load_model(tmp_path / "m.onnx")
    dtype = np.dtype(reference.input.dtype)
    base = np.nanmedian(np.load(str(boosters / name).rsplit(".", 1)[0] + "_test.npz")["X"], axis=0).astype(dtype)
    rows = []
    for feature, threshold in splits(boosters / name):
        at = dtype.type(threshold)
        for value in (np.nextafter(at, dtype.type(-np.inf)), at, np.nextafter(at, dtype.type(np.inf))):
            row = base.copy()
            row[feature] = value
            rows.append(row)
    X = np.asarray(rows, dtype=dtype)
    ref, cand = reference.predict(X), candidate.predict(X)
    assert len(X) > 100 and compare.agreement(reference.output, ref, cand) == 1.0
    assert compare.output_diff(ref, cand)["max_abs_diff"] <= MAX_DELTA_P


def test_int8_is_refused_with_the_reason(cli, boosters, tmp_path):
    out = tmp_path / "x.int8.onnx"
    result = cli("convert", boosters / "xgb_cancer.json", "--quantize", "int8", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "tree ensemble (TreeEnsembleClassifier)" in message
    assert "no MatMul or Conv weights" in message and "thresholds compared in int8" in message


@pytest.mark.parametrize(
    ("missing", "name"),
    [("xgboost", "xgb_cancer.json"), ("lightgbm", "lgb_wine.txt"), ("onnxmltools", "xgb_cancer.json")],
)
def test_a_missing_package_names_the_extra(cli, boosters, tmp_path, monkeypatch, missing, name):
    monkeypatch.setitem(sys.modules, missing, None)  # import now raises ImportError, as when not installed
    result = cli("convert", boosters / name, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.endswith(f": {missing} is not installed; pip install 'edgekit-ml[boost]'"), message


def _xgboost_logitraw(path: Path) -> None:
    X, y = _cancer()[0::2]
    xgboost.train({"objective": "binary:logitraw", "nthread": 1}, xgboost.DMatrix(X, label=y), 2).save_model(path)


def _lightgbm_sqrt(path: Path) -> None:
    X, y = _cancer()[0::2]
    params = {"objective": "regression", "reg_sqrt": True, "num_threads": 1, "verbose": -1}
    lightgbm.train(params, lightgbm.Dataset(X, label=y), 2).save_model(path)


@pytest.mark.parametrize(
    ("name", "train", "message"),
    [
        ("raw.json", _xgboost_logitraw, "has xgboost objective 'binary:logitraw', which edgekit does not convert"),
        ("sqrt.txt", _lightgbm_sqrt, "has objective 'regression' with sqrt, which onnxmltools does not convert"),
    ],
)
def test_an_objective_onnx_cannot_carry_is_refused(cli, tmp_path, name, train, message):
    train(tmp_path / name)
    result = cli("convert", tmp_path / name, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and message in result.stderr


def _linear_trees_file(path: Path) -> Path:
    X, y = _cancer()[0::2]
    params = {"objective": "binary", "linear_tree": True, "num_threads": 1, "verbose": -1}
    lightgbm.train(params, lightgbm.Dataset(X, label=y), 2).save_model(path / "linear.txt")
    return path / "linear.txt"


def _zeros_missing_pickle(path: Path) -> Path:
    import joblib

    X, y = _cancer()[0::2]
    model = lightgbm.LGBMClassifier(n_estimators=2, zero_as_missing=True, n_jobs=1, verbose=-1)
    joblib.dump(model.fit(np.nan_to_num(X), y), path / "zeros.joblib")
    return path / "zeros.joblib"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_linear_trees_file, "has linear trees (linear_tree=True), whose leaf models onnxmltools drops"),
        (_zeros_missing_pickle, "treats zeros as missing (zero_as_missing=True)"),
    ],
)
def test_options_onnxmltools_would_convert_wrongly_are_refused(cli, tmp_path, make, message):
    result = cli("convert", make(tmp_path), "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_a_truncated_lightgbm_file_is_refused_before_lightgbm_reads_past_its_end(cli, boosters, tmp_path):
    (tmp_path / "cut.txt").write_bytes((boosters / "lgb_wine.txt").read_bytes()[:3000])
    result = cli("convert", tmp_path / "cut.txt", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "is not a complete LightGBM model" in result.stderr


@pytest.mark.parametrize("name, content", [("notes.json", b'{"a": 1}'), ("table.txt", b"a,b\n1,2\n")])
def test_json_and_text_that_are_not_boosters_are_not_models(cli, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    result = cli("convert", tmp_path / name, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "is not a model edgekit reads" in result.stderr
