"""Columns are matched by name, never silently by position: a model that knows only f0… refuses named data."""

import csv
import json

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from device_agent.tabular import TableError, column_order

NAMES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


@pytest.fixture(scope="module")
def iris_files(tmp_path_factory):
    """An iris model fitted on a bare array (it records no names), and CSVs with named columns in two orders."""
    directory = tmp_path_factory.mktemp("iris")
    X, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(X, y), directory / "iris.joblib")
    np.savez(directory / "train.npz", X=X.astype(np.float32), y=y)
    for name, order in (("ordered.csv", [0, 1, 2, 3]), ("shuffled.csv", [3, 2, 1, 0])):
        with open(directory / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([NAMES[i] for i in order] + ["target"])
            writer.writerows([[*row[order].tolist(), label] for row, label in zip(X, y, strict=True)])
    return directory


def test_named_data_for_a_model_that_knows_only_positions_is_refused_with_the_fix(cli, iris_files, tmp_path):
    model = tmp_path / "iris.onnx"
    assert cli("convert", iris_files / "iris.joblib", "-o", model).exit_code == 0
    result = cli("validate", model, "--reference", iris_files / "iris.joblib", "--data", iris_files / "shuffled.csv")
    assert result.exit_code == 2
    assert "only by position" in result.stderr and "--names-from" in result.stderr and "accuracy" not in result.stdout


def test_names_recorded_at_convert_time_reorder_named_data(cli, iris_files, tmp_path):
    model = tmp_path / "iris.onnx"
    assert (
        cli("convert", iris_files / "iris.joblib", "--names-from", iris_files / "ordered.csv", "-o", model).exit_code
        == 0
    )
    result = cli(
        "validate", model, "--reference", iris_files / "iris.joblib", "--data", iris_files / "shuffled.csv", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (
        report["agreement"] == 1.0 and report["candidate"]["metric"] > 0.9
    )  # scored on the right columns (0.33 by position)


def test_names_from_a_file_that_disagrees_with_the_models_own_names_are_refused(cli, iris_files, tmp_path):
    model = tmp_path / "iris.onnx"
    assert (
        cli("convert", iris_files / "iris.joblib", "--names-from", iris_files / "ordered.csv", "-o", model).exit_code
        == 0
    )
    other = tmp_path / "other.csv"
    other.write_text("a,b,c,d,target\n1,2,3,4,0\n")
    result = cli("convert", model, "--names-from", other, "-o", tmp_path / "again.onnx")
    assert result.exit_code == 2 and "lacks the model's columns" in result.stderr


def test_column_order_is_one_rule_for_host_and_device():
    assert column_order(NAMES, None) is None and column_order(NAMES, NAMES) is None
    assert column_order(NAMES, NAMES[::-1]) == [3, 2, 1, 0]
    assert column_order(("f0", "f1"), ("f0", "f1")) is None
    with pytest.raises(TableError, match="only by position"):
        column_order(("f0", "f1", "f2", "f3"), NAMES)
    with pytest.raises(TableError, match="lacks the model's columns 'petal_width'"):
        column_order(NAMES, NAMES[:3] + ("other",))
