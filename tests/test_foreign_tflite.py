""".tflite files another converter wrote (TensorFlow's layout, no edgekit metadata): read, validated, served.

The files come from ``edgekit.local.foreign_tflite``, which writes what TFLiteConverter writes for a
small Keras CNN, fitted on scikit-learn's digits; its ONNX twin is the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from device_agent.runtimes.litert import LiteRtRuntime  # noqa: E402
from edgekit.local import foreign_tflite as ft  # noqa: E402
from edgekit.models.loading import TfliteModel, load_model, tflite_metadata  # noqa: E402

VARIANTS = {  # file stem -> conv_tflite keywords
    "float": {},
    "int8": {"quantized": True},
    "uint8": {"quantized": True, "input_dtype": "uint8"},
    "raw_uint8": {"input_dtype": "uint8"},
    "logits": {"from_logits": True},
    "int8_logits": {"quantized": True, "from_logits": True},
}


@dataclass(frozen=True)
class Foreign:
    directory: Path
    digits: ft.DigitsFixture

    def __getitem__(self, stem: str) -> Path:
        return self.directory / f"{stem}.tflite"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Foreign:
    """Every variant of the digits CNN, its ONNX twins, and the held-out digits as float [0, 1] and raw uint8."""
    directory = tmp_path_factory.mktemp("foreign")
    digits = ft.digits_fixture()
    for stem, keywords in VARIANTS.items():
        data = ft.conv_tflite(weights=digits.weights, calibration=digits.X_train, **keywords)
        (directory / f"{stem}.tflite").write_bytes(data)
    (directory / "model.onnx").write_bytes(ft.conv_onnx(digits.weights))
    (directory / "raw_uint8.onnx").write_bytes(ft.conv_onnx(digits.weights, input_dtype="uint8"))
    np.savez(directory / "eval.npz", X=digits.X_test, y=digits.y_test)
    np.savez(directory / "eval_uint8.npz", X=_pixels(digits.X_test), y=digits.y_test)
    return Foreign(directory, digits)


def _pixels(X: np.ndarray) -> np.ndarray:
    return np.round(X * 255).astype(np.uint8)


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    from edgekit.models.litert_banner import without_banner

    with without_banner():
        interpreter = Interpreter(model_content=path.read_bytes())
    interpreter.allocate_tensors()
    return interpreter


def _operators(path: Path) -> list[str]:
    """The builtin operators of the file's graph, in order, by name (read off the flatbuffer, not the
    interpreter, which lists its XNNPACK delegate instead of the ops it took over)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return [names[codes[op.opcodeIndex]] for op in model.subgraphs[0].operators]


def test_the_files_look_like_tensorflows_and_carry_no_edgekit_metadata(foreign):
    interpreter = _interpreter(foreign["float"])
    (given,), (answer,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert given["name"] == "serving_default_x:0" and given["dtype"] == np.float32
    assert given["shape"].tolist() == [1, 8, 8, 1] and given["shape_signature"].tolist() == [-1, 8, 8, 1]
    assert answer["name"] == "StatefulPartitionedCall:0" and answer["shape"].tolist() == [1, 10]
    assert list(interpreter.get_signature_list()) == ["serving_default"]
    assert _operators(foreign["float"]) == ["CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"]
    assert _operators(foreign["uint8"])[0] == "QUANTIZE" and _operators(foreign["raw_uint8"])[:2] == ["CAST", "MUL"]
    assert b"min_runtime_version" in foreign["float"].read_bytes()
    assert all(tflite_metadata(foreign[stem].read_bytes()) == {} for stem in VARIANTS)
    assert ft.conv_tflite(seed=3) == ft.conv_tflite(seed=3) != ft.conv_tflite(seed=4)


def test_float_runs_like_numpy_and_the_onnx_twin(foreign):
    import onnxruntime

    X = foreign.digits.X_test
    expected = ft.forward(foreign.digits.weights, X)
    assert foreign.digits.accuracy() >= 0.9
    ours = LiteRtRuntime()
    ours.load(foreign["float"].read_bytes())
    assert np.abs(ours.predict(X)["StatefulPartitionedCall:0"] - expected).max() < 1e-5  # batch 450: resized
    session = onnxruntime.InferenceSession((foreign.directory / "model.onnx").read_bytes())
    assert np.abs(session.run(None, {"x": X})[0] - expected).max() < 1e-5


def test_int8_is_full_integer_per_channel_and_keeps_the_answers(foreign):
    interpreter = _interpreter(foreign["int8"])
    (given,), (answer,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert given["dtype"] == np.int8 and given["quantization"][0] > 0
    assert answer["dtype"] == np.int8 and answer["quantization"] == (1 / 256, -128)
    kernel = next(t for t in interpreter.get_tensor_details() if t["name"] == "sequential/conv2d/Conv2D")
    assert kernel["dtype"] == np.int8 and len(kernel["quantization_parameters"]["scales"]) == ft.FILTERS
    X, weights = foreign.digits.X_test, foreign.digits.weights
    for stem in ("int8", "uint8"):
        runtime = LiteRtRuntime()
        runtime.load(foreign[stem].read_bytes())
        top1 = runtime.predict(X)["StatefulPartitionedCall:0"].argmax(axis=1)
        assert np.mean(top1 == ft.logits(weights, X).argmax(axis=1)) >= 0.95


@pytest.mark.parametrize(
    ("stem", "dtype", "logits"),
    [
        ("float", "float32", False),
        ("int8", "float32", False),  # quantized: fed real values, the runtime quantizes them
        ("uint8", "float32", False),
        ("raw_uint8", "uint8", False),  # no scale: raw pixel values
        ("logits", "float32", True),
        ("int8_logits", "float32", True),
    ],
)
def test_the_schema_and_output_are_read_off_the_tensors(foreign, stem, dtype, logits):
    model = load_model(foreign[stem])
    assert isinstance(model, TfliteModel)
    tensor = model.input.tensor
    assert (tensor.name, tensor.layout, tensor.kind, tensor.shape) == (
        "serving_default_x:0",
        "NHWC",
        "image",
        (None, 8, 8, 1),
    )
    assert tensor.dtype == dtype
    output = model.output
    assert output.task == "classification" and output.labels == tuple(range(10)) and output.logits is logits
    assert output.probabilities_output == "StatefulPartitionedCall:0"


@pytest.mark.parametrize(
    ("stem", "reference", "data", "agreement"),
    [
        ("float", "model.onnx", "eval.npz", 1.0),
        ("logits", "model.onnx", "eval.npz", 1.0),
        ("raw_uint8", "raw_uint8.onnx", "eval_uint8.npz", 1.0),
        ("int8", "model.onnx", "eval.npz", 0.95),
        ("uint8", "model.onnx", "eval.npz", 0.95),
    ],
)
def test_validate_against_the_onnx_twin(cli, foreign, stem, reference, data, agreement):
    d = foreign.directory
    result = cli("validate", foreign[stem], "--reference", d / reference, "--data", d / data, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["candidate"]["kind"] == "tflite" and report["rows"] == 450
    assert report["agreement"] >= agreement
    if agreement == 1.0:  # logits are softmaxed: probabilities, not scores, are compared
        assert report["max_abs_diff"] < 1e-5
    assert report["candidate"]["metric"] >= 0.9


def test_batches_of_any_size_give_the_same_answers(foreign):
    model = load_model(foreign["int8"])
    X = foreign.digits.X_test[:64]
    whole = model.predict(X).probabilities
    for size in (1, 7, 64):
        parts = np.concatenate([model.predict(X[i : i + size]).probabilities for i in range(0, len(X), size)])
        assert np.array_equal(parts, whole)


def test_a_raw_uint8_input_takes_whole_numbers_of_any_dtype(foreign):
    """The runtime casts them (there is no scale to divide by): float pixels answer as uint8 ones."""
    runtime = LiteRtRuntime()
    runtime.load(foreign["raw_uint8"].read_bytes())
    pixels = _pixels(foreign.digits.X_test[:20])
    as_uint8 = runtime.predict(pixels)["StatefulPartitionedCall:0"]
    assert np.array_equal(runtime.predict(pixels.astype(np.float32))["StatefulPartitionedCall:0"], as_uint8)
    expected = ft.forward(foreign.digits.weights, pixels.astype(np.float32) * np.float32(1 / 255))
    assert np.abs(as_uint8 - expected).max() < 1e-5


@pytest.mark.parametrize("cut", ["half", "header", "empty", "text"])
def test_a_damaged_file_is_one_clear_line(cli, foreign, tmp_path, cut):
    data = foreign["float"].read_bytes()
    damaged = {"half": data[: len(data) // 2], "header": data[:12], "empty": b"", "text": b"not a model\n" * 50}[cut]
    path = tmp_path / "damaged.tflite"
    path.write_bytes(damaged)
    result = cli(
        "validate", path, "--reference", foreign.directory / "model.onnx", "--data", foreign.directory / "eval.npz"
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and ("flatbuffer" in result.stderr.lower())


def test_a_model_of_several_inputs_is_refused(foreign, tmp_path):
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(foreign["float"].read_bytes(), 0)
    graph = model.subgraphs[0]
    extra = schema.TensorT()
    extra.name, extra.shape, extra.type, extra.buffer = b"serving_default_mask:0", np.asarray([1, 4], np.int32), 0, 0
    graph.tensors.append(extra)
    graph.inputs = np.append(graph.inputs, len(graph.tensors) - 1).astype(np.int32)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = tmp_path / "two.tflite"
    path.write_bytes(bytes(builder.Output()))
    from edgekit.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="several inputs"):
        load_model(path)


def test_a_foreign_int8_model_is_packaged_with_its_labels_and_served(cli, foreign, keypair, tmp_path):
    from device_agent import Agent
    from tests.agent_helpers import config_of, make_device

    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"digit {i}\n" for i in range(10)))
    bundle = tmp_path / "cam-1.edgebundle"
    eval_npz = foreign.directory / "eval.npz"
    args = ["--name", "cam", "--version", "1", "--baseline", eval_npz, "--labels", labels, "--key", keypair[0]]
    result = cli("package", foreign["int8"], *args, "-o", bundle, "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["runtime"]["format"] == "tflite" and manifest["input"]["tensor"]["layout"] == "NHWC"
    assert manifest["output"]["labels"] == [f"digit {i}" for i in range(10)]
    config = make_device(tmp_path / "dev", bundle, keypair[1], window_rows=100, http=False)
    X, y = foreign.digits.X_test, foreign.digits.y_test
    with Agent(config_of(config)).start(http=False) as agent:
        answers = agent.predict(X[:100]).answers()
    assert np.mean(np.asarray(answers) == np.asarray([f"digit {i}" for i in y[:100]])) >= 0.9
