import numpy as np
import pytest

from device_agent.errors import ModelError, RuntimeUnavailableError
from device_agent.outputs import OutputSpec
from device_agent.runtimes import open_runtime


def test_onnx_runtime_through_the_seam(digits_onnx, digits):
    runtime = open_runtime("onnx", digits_onnx.read_bytes(), threads=1)
    X = np.load(digits.test)["X"][:5]
    raw = runtime.predict(X)
    assert set(raw) == {"label", "probabilities"}
    prediction = OutputSpec(
        "classification", labels=tuple(range(10)), label_output="label", probabilities_output="probabilities"
    ).interpret(raw)
    assert prediction.labels.shape == (5,) and np.allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    runtime.close()
    with pytest.raises(ModelError, match="has no model loaded"):
        runtime.predict(X)


def test_runtime_errors_are_translated(digits_onnx):
    with pytest.raises(ModelError, match="onnxruntime cannot load the model"):
        open_runtime("onnx", b"not a model", source="bad.onnx")
    runtime = open_runtime("onnx", digits_onnx.read_bytes())
    with pytest.raises(ModelError, match="failed to run"):
        runtime.predict(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(RuntimeUnavailableError, match="no runtime for model format 'caffe'"):
        open_runtime("caffe", b"")


def test_a_bare_scores_output_is_read_as_classes():
    spec = OutputSpec("classification", labels=("cat", "dog"), probabilities_output="scores")
    prediction = spec.interpret({"scores": np.array([[0.2, 0.8], [0.9, 0.1]])})
    assert prediction.labels.tolist() == ["dog", "cat"]


def test_tflite_runtime_refuses_garbage_with_a_clear_error():
    pytest.importorskip("ai_edge_litert")
    with pytest.raises(ModelError, match="cannot load the model"):
        open_runtime("tflite", b"not a flatbuffer", source="bad.tflite")


def test_tflite_runtime_says_exactly_why_tflite_runtime_cannot_run_under_numpy_2(monkeypatch):
    import builtins
    import sys
    import types

    from device_agent.runtimes import litert

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("ai_edge_litert"):
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = object
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(litert.np, "__version__", "2.1.0")
    with pytest.raises(
        RuntimeUnavailableError,
        match="tflite-runtime is the only TFLite runtime here and it cannot create an Interpreter under NumPy 2.1.0",
    ):
        litert._interpreter_class()
