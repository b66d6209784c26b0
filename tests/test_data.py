import numpy as np
import pytest

from device_agent.schema import InputSchema
from edgekit.errors import DataError
from edgekit.models.data import adopt_feature_names, load_dataset


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_guessed_label_column(tmp_path):
    data = load_dataset(write(tmp_path, "d.csv", "a,b,target\n1,2,0\n3,4,1\n"))
    assert data.feature_names == ("a", "b")
    assert data.X.tolist() == [[1, 2], [3, 4]]
    assert data.y.tolist() == [0, 1]


def test_csv_label_named_explicitly_and_missing_values(tmp_path):
    data = load_dataset(write(tmp_path, "d.csv", "cls,a,b\nx,1,\ny,NA,4\n"), label="cls")
    assert data.y.tolist() == ["x", "y"]
    assert np.isnan(data.X[0, 1]) and np.isnan(data.X[1, 0])


def test_npz_with_names(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.ones((3, 2)), y=np.array([1.0, 0.0, 1.0]), feature_names=np.array(["p", "q"]))
    data = load_dataset(path)
    assert data.feature_names == ("p", "q") and data.y.dtype == np.int64 and data.X.dtype == np.float32


@pytest.mark.parametrize(
    "name, text, label, message",
    [
        ("d.csv", "a,b\n1,oops\n", None, "line 2 column 'b' holds 'oops', not a number"),
        ("d.csv", "a,b\n1,2,3\n", None, "line 2 has 3 fields, the header has 2"),
        ("d.csv", "a,a\n1,2\n", None, "duplicated column names"),
        ("d.csv", "", None, "empty or has no header"),
        ("d.csv", "a,b\n", None, "header but no rows"),
        ("d.csv", "a,b\n1,2\n", "label", "has no column 'label'"),
        ("d.xlsx", "x", None, "unknown data file type '.xlsx'"),
        ("d.parquet", "x", None, "is not a readable Parquet file"),
        ("d.npz", "not a zip", None, "not a readable .npz"),
    ],
)
def test_bad_files_say_what_and_how(tmp_path, name, text, label, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(write(tmp_path, name, text), label=label)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file; check the path"):
        load_dataset(tmp_path / "nope.csv")


def test_npz_without_X(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, data=np.ones((2, 2)))
    with pytest.raises(DataError, match=r"has no array 'X' \(it has \['data'\]\)"):
        load_dataset(path)


def test_columns_are_reordered_to_the_model_and_mismatches_named(tmp_path):
    data = load_dataset(write(tmp_path, "d.csv", "b,a\n2,1\n"))
    assert data.aligned_to(("a", "b")).X.tolist() == [[1, 2]]
    with pytest.raises(DataError, match="lacks the model's columns 'c'"):
        data.aligned_to(("a", "c"))
    with pytest.raises(DataError, match="has 2 feature columns, the model takes 3"):
        data.aligned_to(("f0", "f1", "f2"))


def test_data_names_are_adopted_only_for_unnamed_models(tmp_path):
    data = load_dataset(write(tmp_path, "d.csv", "x,y2\n1,2\n"))
    unnamed = InputSchema("X", ("f0", "f1"))
    named = InputSchema("X", ("u", "v"))
    assert adopt_feature_names(unnamed, data).feature_names == ("x", "y2")
    assert adopt_feature_names(named, data).feature_names == ("u", "v")
