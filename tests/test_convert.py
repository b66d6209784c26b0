import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekit.models.loading import load_model
from edgekit.models.targets import RuntimeTarget, installed_onnxruntime, support_for


def test_pipeline_converts_whole_and_answers_like_scikit_learn(cli, digits, tmp_path):
    out = tmp_path / "d.onnx"
    result = cli("convert", digits.model, "-o", out)
    assert result.exit_code == 0, result.output
    onnx_model, sk_model = load_model(out), load_model(digits.model)
    X = np.load(digits.test)["X"]
    onnx_pred, sk_pred = onnx_model.predict(X), sk_model.predict(X)
    assert np.array_equal(onnx_pred.labels, sk_pred.labels)
    assert np.abs(onnx_pred.probabilities - sk_pred.probabilities).max() < 1e-4
    proto = onnx.load(out)
    assert [o.name for o in proto.graph.output] == ["label", "probabilities"]  # no ZipMap
    assert "ZipMap" not in {n.op_type for n in proto.graph.node}


def test_ir_and_opsets_are_pinned_to_the_declared_device_runtime(cli, digits, tmp_path):
    out = tmp_path / "d.onnx"
    assert cli("convert", digits.model, "-o", out, "--min-runtime", "1.14").exit_code == 0
    proto = onnx.load(out)
    max_ir, max_opset, _ = min(support_for("1.14"), support_for(installed_onnxruntime()))
    assert proto.ir_version <= max_ir
    assert all(o.version <= max_opset for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["edgekit.output"])["labels"] == list(range(10))


def _tiny_onnx(path, ir_version=None, opset=17):
    weight = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], np.ones(6, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version:
        model.ir_version = ir_version
    onnx.save(model, path)
    return path


def test_onnx_written_with_a_too_new_ir_is_pinned_down(cli, tmp_path):
    source = _tiny_onnx(tmp_path / "new_ir.onnx", ir_version=8)
    proto = onnx.load(source)
    proto.ir_version = 14  # what onnx 1.23's make_model writes, more than onnxruntime loads
    onnx.save(proto, source)
    out = tmp_path / "pinned.onnx"
    result = cli("convert", source, "-o", out)
    assert result.exit_code == 0, result.output
    assert onnx.load(out).ir_version <= RuntimeTarget().max_ir
    assert load_model(out).predict(np.ones((2, 3), dtype=np.float32)).values.tolist() == [[3.0, 3.0], [3.0, 3.0]]


def test_opset_newer_than_the_device_runtime_is_refused(cli, tmp_path):
    source = _tiny_onnx(tmp_path / "m.onnx", opset=21, ir_version=10)
    result = cli("convert", source, "-o", tmp_path / "out.onnx", "--min-runtime", "1.16")
    assert result.exit_code == 2
    assert "uses ai.onnx opset 21, newer than onnxruntime 1.16 loads (at most 19)" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.onnx", b"\x08\x07garbage-not-protobuf\xff\xff", "is not a valid ONNX"),
        ("notes.txt", b"hello", "is not a model edgekit reads"),
        ("model.joblib", b"\x80\x04not really a pickle", "is not a readable joblib/pickle file"),
    ],
)
def test_files_that_are_not_models_get_one_clear_line(cli, tmp_path, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "out.onnx"
    result = cli("convert", source, "-o", out)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


def test_a_pickle_of_something_else_is_refused(cli, tmp_path):
    import joblib

    joblib.dump({"weights": [1, 2]}, tmp_path / "dict.joblib")
    result = cli("convert", tmp_path / "dict.joblib", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "holds a dict, not a fitted scikit-learn model" in result.stderr


def test_missing_file_and_debug_traceback(cli, tmp_path):
    result = cli("convert", tmp_path / "nope.joblib", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "nope.joblib: no such file; check the path" in result.stderr
    from edgekit.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        cli("--debug", "convert", tmp_path / "nope.joblib", "-o", tmp_path / "o.onnx")


def test_regressor_pipeline(cli, tmp_path):
    import joblib
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_diabetes(return_X_y=True)
    joblib.dump(make_pipeline(StandardScaler(), Ridge()).fit(X, y), tmp_path / "r.joblib")
    np.savez(tmp_path / "r.npz", X=X, y=y)
    assert cli("convert", tmp_path / "r.joblib", "-o", tmp_path / "r.onnx").exit_code == 0
    result = cli(
        "validate", tmp_path / "r.onnx", "--reference", tmp_path / "r.joblib", "--data", tmp_path / "r.npz", "--json"
    )
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["task"] == "regression" and report["metric"] == "rmse"
    assert report["agreement"] > 0.99 and report["max_abs_diff"] < 1e-2
