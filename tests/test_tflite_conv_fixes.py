"""The TFLite writer for convolutional networks (edgekit/build/tflite): the review's cases. Padding counted by
AveragePool, Softmax before opset 13, channel-last inputs, square .npz files, and the graphs that used to end in a
traceback, each against onnxruntime (float32 within 1e-4, int8 the same class)."""

import json

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgekit.build.tflite.conv_writer import write_float  # noqa: E402
from edgekit.build.tflite.onnx_ops import graph_from_onnx  # noqa: E402
from edgekit.errors import ConversionError, DataError  # noqa: E402
from edgekit.models.loading import tflite_metadata  # noqa: E402
from tests.test_tflite_conv import _bn, _conv, _i64, _n  # noqa: E402


def make_model(nodes, constants, shape, *, opset=17, head=True, extra_outputs=None):
    """x [N, *shape] through ``nodes`` to "y", then (with ``head``) Flatten, Gemm of 10 classes and Softmax."""
    rng = np.random.default_rng(0)
    constants = dict(constants)

    def graph(nodes, outputs):
        return helper.make_graph(
            nodes,
            "case",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
            outputs,
            initializer=[
                numpy_helper.from_array(
                    v if isinstance(v, np.ndarray) else rng.normal(0, v[1], v[0]).astype(np.float32), k
                )
                for k, v in constants.items()
            ],
        )

    opsets = [helper.make_opsetid("", opset)]
    ir = 8 if opset <= 17 else 9
    if head:
        probe = graph(nodes, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        inferred = onnx.shape_inference.infer_shapes(helper.make_model(probe, opset_imports=opsets, ir_version=ir))
        dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim[1:]]
        features = int(np.prod(dims))
        nodes = [
            *nodes,
            _n("Flatten", ["y"], "flat"),
            _n("Gemm", ["flat", "head.w", "head.b"], "logits", transB=1),
            _n("Softmax", ["logits"], "probabilities", axis=1 if opset < 13 else -1),
        ]
        constants.update({"head.w": ((10, features), 3 / np.sqrt(features)), "head.b": ((10,), 0.1)})
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])]
    for name, dims in (extra_outputs or {}).items():
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *dims]))
    model = helper.make_model(graph(nodes, outputs), opset_imports=opsets, ir_version=ir)
    onnx.checker.check_model(model, full_check=True)
    return model


def onnxruntime_run(model, X, outputs=("probabilities",)):
    import onnxruntime

    return onnxruntime.InferenceSession(model.SerializeToString()).run(list(outputs), {"x": X})


def round_trip(model, shape, *, int8=True, rows=200):
    """``export.build`` of ``model``: the float .tflite within 1e-4 of onnxruntime, the int8 one the same class on
    nearly every example; each fed the layout its own input schema says. Returns the float .tflite."""
    from edgekit.build.tflite.export import FLOAT, INT8, build
    from edgekit.models.loading import OnnxModel, TfliteModel
    from edgekit.models.tensor_data import in_layout

    rng = np.random.default_rng(3)
    X = rng.normal(0, 1, (rows, *shape)).astype(np.float32)
    calibration = rng.normal(0, 1, (rows, *shape)).astype(np.float32) if int8 else None
    built = build(model, calibration=calibration, source="case.onnx")
    expected = onnxruntime_run(model, X)[0]
    reference = OnnxModel.from_bytes(model.SerializeToString(), path="case.onnx")
    float_model = TfliteModel.from_bytes(built[FLOAT])
    fed = in_layout(X, reference.input.tensor, float_model.input.tensor)
    got = float_model.raw(fed)
    got = got["probabilities"] if isinstance(got, dict) else got
    assert np.abs(np.asarray(got).reshape(expected.shape) - expected).max() <= 1e-4
    if int8:
        scores = TfliteModel.from_bytes(built[INT8]).predict(fed).probabilities
        assert np.mean(scores.argmax(1) == expected.argmax(1)) >= 0.95
    return built[FLOAT]


# -- 1. AveragePool counting its padding --------------------------------------------------------------------------

COUNTED = {
    "pads SAME": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "SAME_UPPER": dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
    "SAME_LOWER": dict(kernel_shape=[2, 2], auto_pad="SAME_LOWER"),
    "SAME_UPPER strided": dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
}


@pytest.mark.parametrize("case", list(COUNTED))
def test_average_pool_counting_its_padding_matches_onnxruntime(case):
    model = make_model([_n("AveragePool", ["x"], "y", count_include_pad=1, **COUNTED[case])], {}, (4, 8, 8))
    round_trip(model, (4, 8, 8))


@pytest.mark.parametrize("op_type", ["MaxPool", "Conv"])
def test_same_lower_with_an_odd_total_is_padded_explicitly(op_type):
    conv, constants = _conv("c", "x", "y", (6, 4, 2, 2), auto_pad="SAME_LOWER", pads=None)
    if op_type == "MaxPool":
        conv, constants = _n("MaxPool", ["x"], "y", kernel_shape=[2, 2], auto_pad="SAME_LOWER"), {}
    round_trip(make_model([conv], constants, (4, 8, 8)), (4, 8, 8))


# -- 2. Softmax before opset 13 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 2, 3])
def test_softmax_before_opset_13_flattens_from_its_axis(axis):
    """A small map: int8's softmax ends at 1/256, so a softmax over hundreds of values would round to nothing."""
    conv, constants = _conv("c", "x", "c", (2, 2, 3, 3))
    attrs = {} if axis is None else {"axis": axis}
    model = make_model([conv, _n("Softmax", ["c"], "y", **attrs)], constants, (2, 2, 3), opset=11)
    round_trip(model, (2, 2, 3))


# -- 3. channel-last inputs ------------------------------------------------------------------------------------------


def test_a_channel_last_image_input_is_taken_as_it_is():
    """A Keras-style [N, 8, 8, 3] input read through a Transpose to NCHW: the device is sent it as it is, the
    Transpose cancels with the NHWC layout, and the bundle's schema says NHWC [8, 8, 3]."""
    conv, constants = _conv("c", "nchw", "c", (8, 3, 3, 3))
    nodes = [_n("Transpose", ["x"], "nchw", perm=[0, 3, 1, 2]), conv, _n("Relu", ["c"], "y")]
    model = make_model(nodes, constants, (8, 8, 3))
    graph = graph_from_onnx(model, ["probabilities"])
    assert graph.shapes[graph.input] == (1, 8, 8, 3) and graph.ops[0].kind == "CONV_2D"
    data = round_trip(model, (8, 8, 3))
    schema = json.loads(tflite_metadata(data)["edgekit.input"])["tensor"]
    assert schema["shape"] == [None, 8, 8, 3] and schema["layout"] == "NHWC"


def test_a_channel_last_sensor_input_is_taken_as_it_is():
    conv, constants = _conv("c", "ncw", "c", (6, 3, 3))
    nodes = [_n("Transpose", ["x"], "ncw", perm=[0, 2, 1]), conv, _n("Relu", ["c"], "y")]
    model = make_model(nodes, constants, (16, 3))
    graph = graph_from_onnx(model, ["probabilities"])
    assert graph.shapes[graph.input] == (1, 16, 3) and "TRANSPOSE" not in [op.kind for op in graph.ops]
    data = round_trip(model, (16, 3))
    schema = json.loads(tflite_metadata(data)["edgekit.input"])["tensor"]
    assert schema["shape"] == [None, 16, 3] and schema["layout"] == "NWC"


# -- 4. a square .npz ------------------------------------------------------------------------------------------------


def _schema(shape, layout):
    from device_agent.schema import InputSchema
    from device_agent.tensors import TensorSpec

    return InputSchema.of_tensor(TensorSpec("x", "float32", (None, *shape), layout, "image"))


def test_a_square_npz_for_a_channel_last_model_is_refused_unless_it_says_its_layout(tmp_path):
    from edgekit.models.tensor_data import load_tensor_dataset

    X = np.random.default_rng(0).normal(0, 1, (4, 8, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "square.npz", X=X)
    with pytest.raises(DataError) as refused:
        load_tensor_dataset(tmp_path / "square.npz", _schema((8, 8, 8), "NHWC"))
    assert "NCHW" in str(refused.value) and "layout=" in str(refused.value) and "\n" not in str(refused.value)
    np.savez(tmp_path / "nchw.npz", X=X, layout="NCHW")
    got, _, _ = load_tensor_dataset(tmp_path / "nchw.npz", _schema((8, 8, 8), "NHWC"))
    assert np.array_equal(got, X.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "nhwc.npz", X=X, layout="NHWC")
    assert np.array_equal(load_tensor_dataset(tmp_path / "nhwc.npz", _schema((8, 8, 8), "NHWC"))[0], X)
    # the channels-first model the file was made for reads it as it is; a layout entry is honoured there too
    assert np.array_equal(load_tensor_dataset(tmp_path / "square.npz", _schema((8, 8, 8), "NCHW"))[0], X)
    assert np.array_equal(
        load_tensor_dataset(tmp_path / "nhwc.npz", _schema((8, 8, 8), "NCHW"))[0], X.transpose(0, 3, 1, 2)
    )


def test_a_non_square_npz_is_still_transposed_by_its_shape(tmp_path):
    from edgekit.models.tensor_data import load_tensor_dataset

    X = np.random.default_rng(0).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "nchw.npz", X=X)
    got, _, _ = load_tensor_dataset(tmp_path / "nchw.npz", _schema((8, 8, 3), "NHWC"))
    assert np.array_equal(got, X.transpose(0, 2, 3, 1))


# -- 5. graphs that ended in a traceback -------------------------------------------------------------------------------

SUPPORTED = {
    "Gemm with C of shape [1, N]": lambda: (
        [_n("GlobalAveragePool", ["x"], "g"), _n("Flatten", ["g"], "f"), _n("Gemm", ["f", "w", "b"], "y")],
        {"w": ((4, 16), 1.0), "b": ((1, 16), 0.1)},
        17,
    ),
    "Pad with axes": lambda: (
        [_n("Pad", ["x", "pads", "", "axes"], "y")],
        {"pads": _i64(1, 2, 2, 1), "axes": _i64(2, 3)},
        18,
    ),
    "Pad with negative pads": lambda: (
        [_n("Pad", ["x", "pads"], "y")],
        {"pads": _i64(0, 0, -1, 1, 0, 0, 2, -2)},
        17,
    ),
    "Flatten axis=2 before MatMul": lambda: (
        [
            _conv("c", "x", "c", (4, 4, 3, 3))[0],
            _n("Flatten", ["c"], "f", axis=2),
            _n("MatMul", ["f", "m"], "mm"),
            _n("Reshape", ["mm", "rows"], "y"),
        ],
        {**_conv("c", "x", "c", (4, 4, 3, 3))[1], "m": ((64, 6), 0.2), "rows": _i64(-1, 24)},
        17,
    ),
}


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_graphs_that_crashed_now_convert(case):
    nodes, constants, opset = SUPPORTED[case]()
    round_trip(make_model(nodes, constants, (4, 8, 8), opset=opset), (4, 8, 8))


def test_concat_with_a_constant_input_is_refused_in_one_line(tmp_path, cli):
    """ONNX's Concat does not broadcast: a constant input fixes the batch size, which a served model cannot keep."""
    conv, constants = _conv("c", "x", "c", (4, 4, 3, 3))
    k = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    model = make_model([conv, _n("Concat", ["c", "k"], "y", axis=1)], {**constants, "k": k}, (4, 8, 8))
    (tmp_path / "concat.onnx").write_bytes(model.SerializeToString())
    result = cli("convert", tmp_path / "concat.onnx", "--target", "tflite", "-o", tmp_path / "concat.tflite")
    message = result.stderr.strip()
    assert result.exit_code == 2 and not (tmp_path / "concat.tflite").exists()
    assert len(message.splitlines()) == 1 and "Concat" in message and "'k'" in message and "--target onnx" in message


def test_a_folded_batch_norm_keeps_the_convolution_output_it_also_exposes():
    """A Conv read by one BatchNormalization and also a graph output (an embedding): not folded, both outputs right."""
    conv, constants = _conv("c", "x", "c", (8, 4, 3, 3))
    nodes = [conv, _n("BatchNormalization", ["c", *_bn("bn", 8)], "y")]
    model = make_model(nodes, {**constants, **_bn("bn", 8)}, (4, 8, 8), extra_outputs={"c": (8, 8, 8)})
    graph = graph_from_onnx(model, ["probabilities", "c"])
    data = write_float(graph, None, {})
    X = np.random.default_rng(1).normal(0, 1, (16, 4, 8, 8)).astype(np.float32)
    expected = onnxruntime_run(model, X, ("probabilities", "c"))
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    entry = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(entry, [16, 8, 8, 4])
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry, np.ascontiguousarray(X.transpose(0, 2, 3, 1)))
    interpreter.invoke()
    got = {o["name"]: interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()}
    assert np.abs(got["probabilities"] - expected[0]).max() <= 1e-4
    assert np.abs(got["c"] - expected[1]).max() <= 1e-4


def test_an_unexpected_error_in_one_node_is_refused_by_name(monkeypatch):
    from edgekit.build.tflite import onnx_ops

    def broken(b, node, attrs):
        raise IndexError("tuple index out of range")

    monkeypatch.setitem(onnx_ops.CONVERTERS, "Relu", broken)
    conv, constants = _conv("c", "x", "c", (8, 4, 3, 3))
    model = make_model([conv, helper.make_node("Relu", ["c"], ["y"], name="act1")], constants, (4, 8, 8))
    with pytest.raises(ConversionError) as refused:
        graph_from_onnx(model, ["probabilities"])
    message = str(refused.value)
    assert "Relu" in message and "act1" in message and "--target onnx" in message and "\n" not in message


def test_softmax_over_the_batch_before_opset_13_is_refused_by_name():
    model = make_model([_n("Softmax", ["x"], "y", axis=0)], {}, (4, 8, 8), opset=11)
    with pytest.raises(ConversionError, match="Softmax"):
        graph_from_onnx(model, ["probabilities"])
