"""Convolutional networks to TFLite (edgekit/build/tflite/onnx_ops, conv_writer, tensor_export): NHWC,
float32 against onnxruntime and full int8 against float, the tensor fixtures through the CLI, the agent."""

import json

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgekit.build.tflite.conv_writer import write_float, write_int8  # noqa: E402
from edgekit.build.tflite.onnx_ops import graph_from_onnx  # noqa: E402
from edgekit.build.tflite.tensor_export import calibrated_ranges, to_tflite_layout  # noqa: E402
from edgekit.models.loading import tflite_metadata  # noqa: E402
from tests.test_tensor_models import b64, post  # noqa: E402


def _model(nodes, constants, shape, classes=10):
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(v if isinstance(v, np.ndarray) else rng.normal(0, v[1], v[0]).astype(np.float32), k)
        for k, v in constants.items()
    ]
    graph = helper.make_graph(
        nodes,
        "ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn(name, channels):
    rng = np.random.default_rng(len(name))
    return {
        f"{name}.g": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{name}.b": rng.normal(0, 0.1, channels).astype(np.float32),
        f"{name}.m": rng.normal(0, 0.1, channels).astype(np.float32),
        f"{name}.v": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    }


def resnet_block():
    """Conv-BN-Relu, a second conv-BN and the Add skip, LeakyRelu, a grouped conv and HardSwish, Concat,
    Pad, AveragePool, MaxPool with padding, a squeeze-excite Mul broadcast (Sigmoid), constant Mul/Add,
    Flatten of a 5x5 map into Gemm, Softmax."""
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c1.w", "c1.b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "bn1.g", "bn1.b", "bn1.m", "bn1.v"], ["bn1"]),
        n("Relu", ["bn1"], ["a"]),
        n("Conv", ["a", "c2.w"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c2", "bn2.g", "bn2.b", "bn2.m", "bn2.v"], ["bn2"]),
        n("Add", ["a", "bn2"], ["skip"]),
        n("Relu", ["skip"], ["c"]),
        n("LeakyRelu", ["c"], ["d"], alpha=0.1),
        n("Conv", ["c", "g.w", "g.b"], ["g"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2),
        n("HardSwish", ["g"], ["e"]),
        n("Concat", ["d", "e"], ["f"], axis=1),
        n("Pad", ["f", "pads"], ["padded"]),
        n("AveragePool", ["padded"], ["h"], kernel_shape=[2, 2], strides=[2, 2]),
        n("MaxPool", ["h"], ["i"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        n("GlobalAveragePool", ["i"], ["squeezed"]),
        n("Conv", ["squeezed", "se.w", "se.b"], ["se"], kernel_shape=[1, 1]),
        n("Sigmoid", ["se"], ["gate"]),
        n("Mul", ["i", "gate"], ["j"]),
        n("Mul", ["j", "scale"], ["k0"]),
        n("Add", ["k0", "shift"], ["k"]),
        n("Flatten", ["k"], ["flat"], axis=1),
        n("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1),
        n("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    constants = {
        "c1.w": ((8, 3, 3, 3), 0.4),
        "c1.b": ((8,), 0.1),
        **_bn("bn1", 8),
        "c2.w": ((8, 8, 3, 3), 0.2),
        **_bn("bn2", 8),
        "g.w": ((8, 4, 3, 3), 0.3),
        "g.b": ((8,), 0.1),
        "pads": np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "se.w": ((16, 16, 1, 1), 0.3),
        "se.b": ((16,), 0.1),
        "scale": np.linspace(0.5, 1.5, 16, dtype=np.float32).reshape(16, 1, 1),
        "shift": np.linspace(-0.2, 0.2, 16, dtype=np.float32).reshape(16, 1, 1),
        "fc.w": ((10, 16 * 5 * 5), 0.3),
        "fc.b": ((10,), 0.1),
    }
    return _model(nodes, constants, (3, 16, 16))


def shapes_block():
    """A 1-D signal through Conv, a general Clip (MAXIMUM/MINIMUM), Unsqueeze to 2-D, a Transpose to NWHC that
    cancels the layout's, Reshape, MatMul + Add (one dense layer), Tanh, and Squeeze of a pooled value."""
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c.w", "c.b"], ["c"], kernel_shape=[3], pads=[1, 1]),
        n("Clip", ["c", "low", "high"], ["clipped"]),
        n("Unsqueeze", ["clipped", "axis2"], ["image"]),  # [N, 6, 1, 24]
        n("Conv", ["image", "d.w", "d.b"], ["d"], kernel_shape=[1, 3], strides=[1, 2], pads=[0, 1, 0, 1]),
        n("Relu", ["d"], ["r"]),
        n("GlobalAveragePool", ["r"], ["pooled"]),
        n("Squeeze", ["pooled", "axes23"], ["vector"]),
        n(
            "Transpose",
            [
                "r",
            ],
            ["nhwc"],
            perm=[0, 2, 3, 1],
        ),
        n("Reshape", ["nhwc", "rows"], ["flat"]),
        n("MatMul", ["flat", "m.w"], ["mm"]),
        n("Add", ["mm", "m.b"], ["dense"]),
        n("Tanh", ["dense"], ["t"]),
        n("Concat", ["t", "vector"], ["both"], axis=1),
        n("Gemm", ["both", "fc.w", "fc.b"], ["logits"], transB=1),
        n("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    constants = {
        "c.w": ((6, 2, 3), 0.5),
        "c.b": ((6,), 0.1),
        "low": np.asarray(-0.5, np.float32),
        "high": np.asarray(1.5, np.float32),
        "axis2": np.asarray([2], np.int64),
        "d.w": ((8, 6, 1, 3), 0.4),
        "d.b": ((8,), 0.1),
        "axes23": np.asarray([2, 3], np.int64),
        "rows": np.asarray([-1, 12 * 8], np.int64),
        "m.w": ((12 * 8, 16), 0.2),
        "m.b": ((16,), 0.1),
        "fc.w": ((4, 24), 0.5),
        "fc.b": ((4,), 0.1),
    }
    return _model(nodes, constants, (2, 24), classes=4)


def _litert(data, X):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], list(X.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry["index"], X)
    interpreter.invoke()
    out = next(o for o in interpreter.get_output_details() if o["name"] == "probabilities")
    return interpreter.get_tensor(out["index"])


def _onnxruntime(model, X):
    import onnxruntime

    return onnxruntime.InferenceSession(model.SerializeToString()).run(["probabilities"], {"x": X})[0]


@pytest.mark.parametrize("make", [resnet_block, shapes_block])
def test_each_operator_round_trips_in_float_and_int8(make):
    model = make()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    X = np.random.default_rng(1).normal(0, 1, (64, *shape)).astype(np.float32)
    graph = graph_from_onnx(model, ["probabilities"])
    float_data = write_float(graph, None, {})
    expected = _onnxruntime(model, X)
    got = _litert(float_data, to_tflite_layout(X, graph))
    assert np.abs(got - expected).max() <= 1e-4
    calibration = np.random.default_rng(2).normal(0, 1, (128, *shape)).astype(np.float32)
    ranges = calibrated_ranges(float_data, graph, to_tflite_layout(calibration, graph))
    int8 = _litert(write_int8(graph, ranges, None, {}), to_tflite_layout(X, graph))
    assert np.mean(int8.argmax(1) == expected.argmax(1)) >= 0.9


def _refused_models():
    """Per refused operator: the nodes from "x" to "pooled" [N, 4, 1, 1] (or [N, 4]), constants, input shape."""
    n = helper.make_node
    conv = n("Conv", ["x", "c.w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    image = {"c.w": ((4, 1, 3, 3), 0.5), "fc.w": ((3, 4), 0.5)}
    lstm = [
        n("Transpose", ["x"], ["steps"], perm=[2, 0, 1]),  # [N, 4, 16] -> [16, N, 4]
        n("LSTM", ["steps", "l.w", "l.r"], ["", "hidden"], hidden_size=4),
        n("Squeeze", ["hidden", "zero"], ["pooled"]),
    ]
    return {
        "LpNormalization": (
            [conv, n("LpNormalization", ["c"], ["normed"], axis=1), n("GlobalAveragePool", ["normed"], ["pooled"])],
            image,
            (1, 8, 8),
        ),
        "ConvTranspose": (
            [conv, n("ConvTranspose", ["c", "t.w"], ["up"], kernel_shape=[2, 2], strides=[2, 2], group=2)]
            + [n("GlobalAveragePool", ["up"], ["pooled"])],
            {**image, "t.w": ((4, 2, 2, 2), 0.5)},  # grouped: TRANSPOSE_CONV has no groups
            (1, 8, 8),
        ),
        "Resize": (
            [conv, n("Resize", ["c", "", "scales"], ["up"], mode="cubic")]  # RESIZE_* are nearest and bilinear
            + [n("GlobalAveragePool", ["up"], ["pooled"])],
            {**image, "scales": np.asarray([1, 1, 2, 2], np.float32)},
            (1, 8, 8),
        ),
        "LSTM": (
            lstm,
            {"l.w": ((1, 16, 4), 0.5), "l.r": ((1, 16, 4), 0.5), "zero": _i64(0), "fc.w": ((3, 4), 0.5)},
            (4, 16),
        ),
    }


@pytest.mark.parametrize("operator", ["LpNormalization", "ConvTranspose", "Resize", "LSTM"])
def test_an_operator_without_a_tflite_equivalent_is_refused_by_name(operator, tmp_path, cli):
    """``convert --target tflite`` of a network with an operator the writer has no translation for exits 2 with
    one line on stderr that names the operator and points at ``--target onnx``, and writes no file."""
    nodes, constants, shape = _refused_models()[operator]
    n = helper.make_node
    nodes = [*nodes, n("Flatten", ["pooled"], ["flat"]), n("Gemm", ["flat", "fc.w"], ["logits"], transB=1)]
    nodes.append(n("Softmax", ["logits"], ["probabilities"]))
    path = tmp_path / "odd.onnx"
    path.write_bytes(_model(nodes, constants, shape, 3).SerializeToString())
    result = cli("convert", path, "--target", "tflite", "-o", tmp_path / "odd.tflite")
    assert result.exit_code == 2 and not (tmp_path / "odd.tflite").exists()
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and operator in message and "--target onnx" in message, message
    assert "node ''" not in message  # an unnamed node is called by its first output that is named


# -- the tensor fixtures ------------------------------------------------------------------------------------------


def _fixture_check(paths, calibration_key):
    """float32 against onnxruntime and int8 against float, on the fixture's held-out examples, as export builds them."""
    from edgekit.build.tflite.export import FLOAT, INT8, build
    from edgekit.models.loading import OnnxModel, TfliteModel
    from edgekit.models.tensor_data import in_layout

    proto = onnx.load(paths["model"])
    X, calibration = np.load(paths["test"])["X"], np.load(paths[calibration_key])["X"][:200]
    built = build(proto, calibration=calibration, source=paths["model"])
    reference = OnnxModel.from_bytes(proto.SerializeToString(), path=paths["model"])
    expected = reference.predict(X).probabilities
    models = {name: TfliteModel.from_bytes(data) for name, data in built.items()}
    rows = in_layout(X, reference.input.tensor, models[FLOAT].input.tensor)
    float_scores = models[FLOAT].predict(rows).probabilities
    int8_scores = models[INT8].predict(rows).probabilities
    assert models[FLOAT].input.tensor.layout in ("NHWC", "NWC")
    assert np.abs(float_scores - expected).max() <= 1e-4
    assert np.mean(int8_scores.argmax(1) == float_scores.argmax(1)) >= 0.99
    assert len(built[INT8]) < 0.6 * len(built[FLOAT])  # metadata and shapes weigh in a 3k-parameter model
    return built


def test_digits_cnn_converts_float_and_int8(digits_cnn):
    paths = {"model": str(digits_cnn.model), "test": str(digits_cnn.test), "train": str(digits_cnn.train)}
    _fixture_check(paths, "train")


def test_sensor_cnn_converts_as_a_one_row_image(tmp_path):
    from edgekit.local.tensor_fixtures import make_sensor_cnn

    built = _fixture_check(make_sensor_cnn(tmp_path), "train")
    schema = json.loads(tflite_metadata(built["tflite float32"])["edgekit.input"])
    assert schema["tensor"]["shape"] == [None, 128, 3] and schema["tensor"]["layout"] == "NWC"


@pytest.mark.slow
def test_mobilenet96_and_kws_convert_float_and_int8(tmp_path):
    from edgekit.local.tensor_fixtures import make_kws_cnn, make_mobilenet96

    _fixture_check(make_kws_cnn(tmp_path), "train")
    _fixture_check(make_mobilenet96(tmp_path), "test")  # no training npz: its crops calibrate (as the CLI's folder)


# -- the CLI, the bundle and the agent -----------------------------------------------------------------------------


def test_cli_converts_validates_packages_and_the_agent_serves_nhwc(digits_cnn, keypair, cli, tmp_path):
    from device_agent import Agent
    from tests.agent_helpers import config_of, make_device

    model = tmp_path / "cnn.tflite"
    result = cli("convert", digits_cnn.onnx, "--target", "tflite", "-o", model)
    assert result.exit_code == 0, result.stderr
    result = cli("validate", model, "--reference", digits_cnn.onnx, "--data", digits_cnn.test, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["passed"] and report["max_abs_diff"] <= 1e-4
    bundle = tmp_path / "cam-2.edgebundle"
    args = ["package", model, "--name", "cam", "--version", 2, "--baseline", digits_cnn.images]
    result = cli(*args, "--labels", digits_cnn.labels, "--key", keypair[0], "-o", bundle)
    assert result.exit_code == 0, result.stderr
    config = make_device(tmp_path / "device", bundle, keypair[1], device_id="cam-2")
    files = sorted(digits_cnn.images.glob("*.png"))[:40]
    expected = [str(int(f.stem.split("_")[1])) for f in files]
    with Agent(config_of(config)).start() as agent:  # v1 predict: PNGs through the bundle's preprocessing, NHWC
        status, answer = post(agent.server.server_address[1], {"instances": [b64(f) for f in files]})
        assert agent.predict(np.load(digits_cnn.test)["X"][:2].transpose(0, 2, 3, 1)) is not None
    assert status == 200 and np.mean(np.asarray(answer["predictions"]) == np.asarray(expected)) >= 0.95


# -- one operator at a time ----------------------------------------------------------------------------------------
# Each case reads "x" [N, 4, 8, 8] and ends at "y"; ``_isolated`` adds the head (Flatten, Gemm, Softmax) when "y"
# is not already the scores. Weights are seeded, so every run converts the same graphs.

OP_INPUT = (4, 8, 8)


def _conv(name, source, out, weights, **attrs):
    """A convolution node and its seeded weights (kernel 3x3, padded to keep the size, unless ``attrs`` say)."""
    attrs = {"kernel_shape": list(weights[2:]), "pads": [w // 2 for w in weights[2:]] * 2, **attrs}
    node = helper.make_node("Conv", [source, f"{name}.w", f"{name}.b"], [out], **attrs)
    return node, {f"{name}.w": (weights, 1.5 / np.sqrt(np.prod(weights[1:]))), f"{name}.b": ((weights[0],), 0.1)}


def _after_conv(op_type, *constants, **attrs):
    """A case: a 3x3 convolution, then ``op_type`` reading it and the named ``constants`` (as further inputs)."""
    named = {f"k{i}": value for i, value in enumerate(constants)}
    return lambda: _case(_conv("c", "x", "c", (8, 4, 3, 3)), (_n(op_type, ["c", *named], "y", **attrs), named))


def _case(*nodes_and_constants):
    """Nodes (with their constants) chained as given: the last one writes "y"."""
    nodes, constants = [], {}
    for item in nodes_and_constants:
        node, more = item if isinstance(item, tuple) else (item, {})
        nodes.append(node)
        constants.update(more)
    return nodes, constants


def _n(op_type, inputs, output, **attrs):
    return helper.make_node(op_type, inputs, [output], **attrs)


def _f32(*values, shape=None):
    array = np.asarray(values, np.float32)
    return array.reshape(shape) if shape is not None else array


def _i64(*values):
    return np.asarray(values, np.int64)


OPERATOR_CASES = {
    "Conv": lambda: _case(_conv("c", "x", "y", (8, 4, 3, 3))),
    "Conv strided and dilated": lambda: _case(_conv("c", "x", "y", (8, 4, 3, 3), strides=[2, 2], dilations=[2, 2])),
    "Conv 5x5 asymmetric pads": lambda: _case(_conv("c", "x", "y", (6, 4, 5, 5), pads=[1, 2, 2, 1])),
    "Conv grouped": lambda: _case(_conv("c", "x", "y", (8, 2, 3, 3), group=2)),
    "Conv depthwise": lambda: _case(_conv("c", "x", "y", (4, 1, 3, 3), group=4)),
    "Conv depthwise multiplier 2": lambda: _case(_conv("c", "x", "y", (8, 1, 3, 3), group=4)),
    "BatchNormalization folded": lambda: _case(
        _conv("c", "x", "c", (8, 4, 3, 3)), (_n("BatchNormalization", ["c", *_bn("bn", 8)], "y"), _bn("bn", 8))
    ),
    "BatchNormalization alone": lambda: _case((_n("BatchNormalization", ["x", *_bn("bn", 4)], "y"), _bn("bn", 4))),
    "Relu": _after_conv("Relu"),
    "Relu6 (Clip 0..6)": _after_conv("Clip", _f32(0.0), _f32(6.0)),
    "Clip -0.5..1.5": _after_conv("Clip", _f32(-0.5), _f32(1.5)),
    "LeakyRelu": _after_conv("LeakyRelu", alpha=0.2),
    "HardSwish": _after_conv("HardSwish"),
    "Sigmoid": _after_conv("Sigmoid"),
    "MaxPool": lambda: _case(_n("MaxPool", ["x"], "y", kernel_shape=[2, 2], strides=[2, 2])),
    "MaxPool padded": lambda: _case(_n("MaxPool", ["x"], "y", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)),
    "AveragePool": lambda: _case(_n("AveragePool", ["x"], "y", kernel_shape=[2, 2], strides=[2, 2])),
    "AveragePool SAME excluding pads": lambda: _case(_n("AveragePool", ["x"], "y", kernel_shape=[3, 3], pads=[1] * 4)),
    "GlobalAveragePool": _after_conv("GlobalAveragePool"),
    "Add per-channel constant": _after_conv("Add", _f32(*range(8), shape=(8, 1, 1))),
    "Mul spatial constant": lambda: _case(
        (_n("Mul", ["k", "x"], "y"), {"k": np.linspace(0.5, 2, 64, dtype=np.float32).reshape(1, 8, 8)})
    ),
    "Add broadcast of a pooled map": lambda: _case(
        _conv("c", "x", "c", (8, 4, 3, 3)), _n("GlobalAveragePool", ["c"], "g"), _n("Add", ["c", "g"], "y")
    ),
    "Mul squeeze-excite gate": lambda: _case(
        _conv("c", "x", "c", (8, 4, 3, 3)),
        _n("GlobalAveragePool", ["c"], "g"),
        _n("Sigmoid", ["g"], "s"),
        _n("Mul", ["s", "c"], "y"),
    ),
    "Sub and Div by constants": lambda: _case(
        (_n("Sub", ["x", "m"], "centred"), {"m": _f32(0.1, 0.2, 0.3, 0.4, shape=(4, 1, 1))}),
        (_n("Div", ["centred", "s"], "y"), {"s": _f32(0.5, 1.0, 2.0, 4.0, shape=(4, 1, 1))}),
    ),
    "Concat channels": lambda: _case(
        _conv("a", "x", "a", (4, 4, 3, 3)),
        _conv("b", "x", "b", (6, 4, 1, 1)),
        _n("Concat", ["a", "b", "x"], "y", axis=1),
    ),
    "Concat height": lambda: _case(_conv("a", "x", "a", (4, 4, 3, 3)), _n("Concat", ["a", "x"], "y", axis=2)),
    "Reshape into Gemm": _after_conv("Reshape", _i64(-1, 512)),
    "Reshape 4-D": lambda: _case(
        _conv("c", "x", "c", (8, 4, 3, 3)),
        (_n("Reshape", ["c", "to"], "r"), {"to": _i64(-1, 4, 16, 8)}),
        _conv("d", "r", "y", (4, 4, 3, 3)),
    ),
    "Squeeze and Unsqueeze": lambda: _case(
        _conv("c", "x", "c", (8, 4, 3, 3)),
        _n("GlobalAveragePool", ["c"], "g"),
        (_n("Squeeze", ["g", "axes"], "s"), {"axes": _i64(2, 3)}),
        (_n("Unsqueeze", ["s", "axis"], "y"), {"axis": _i64(1)}),
    ),
    "Pad": lambda: _case(
        (_n("Pad", ["x", "pads"], "p"), {"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)}),
        _conv("c", "p", "y", (8, 4, 3, 3), pads=[0] * 4),
    ),
    "Pad with a value": lambda: _case(
        (_n("Pad", ["x", "pads", "fill"], "y"), {"pads": _i64(0, 0, 1, 1, 0, 0, 1, 1), "fill": _f32(0.5)})
    ),
    "Transpose to NHWC": _after_conv("Transpose", perm=[0, 2, 3, 1]),
    "Transpose H and W": _after_conv("Transpose", perm=[0, 1, 3, 2]),
    "MatMul with bias": lambda: _case(
        _n("Flatten", ["x"], "f"),
        (_n("MatMul", ["f", "m.w"], "mm"), {"m.w": ((256, 32), 0.1)}),
        (_n("Add", ["mm", "m.b"], "d"), {"m.b": ((32,), 0.1)}),
        _n("Relu", ["d"], "y"),
    ),
    "Gemm": lambda: _case(
        _n("GlobalAveragePool", ["x"], "g"),
        _n("Flatten", ["g"], "f"),
        (_n("Gemm", ["f", "g.w", "g.b"], "y", alpha=0.5, beta=2.0), {"g.w": ((4, 16), 1.0), "g.b": ((16,), 0.1)}),
    ),
    "Softmax over channels": _after_conv("Softmax", axis=1),
}


def _isolated(case):
    """The case's graph with its head: "y" flattened into a Gemm of 10 classes and a Softmax."""
    nodes, constants = OPERATOR_CASES[case]()
    probe = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *OP_INPUT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(v if isinstance(v, np.ndarray) else np.zeros(v[0], np.float32), k)
            for k, v in constants.items()
        ],
    )
    inferred = onnx.shape_inference.infer_shapes(helper.make_model(probe, opset_imports=[helper.make_opsetid("", 17)]))
    features = int(np.prod([d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim[1:]]))
    head = [
        _n("Flatten", ["y"], "flat"),
        _n("Gemm", ["flat", "head.w", "head.b"], "logits", transB=1),
        _n("Softmax", ["logits"], "probabilities", axis=1),
    ]
    constants = {**constants, "head.w": ((10, features), 3 / np.sqrt(features)), "head.b": ((10,), 0.1)}
    return _model([*nodes, *head], constants, OP_INPUT)


@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_one_operator_round_trips_against_onnxruntime_in_float_and_int8(case):
    """Each ONNX operator alone (after a convolution where it needs one), as ``export.build`` converts it: the
    float .tflite gives onnxruntime's probabilities within 1e-4, and the int8 one calibrated on other random
    inputs picks the same class on nearly all of 200 and stays close in probability."""
    from edgekit.build.tflite.export import FLOAT, INT8, build

    model = _isolated(case)
    rng = np.random.default_rng(3)
    X, calibration = rng.normal(0, 1, (200, *OP_INPUT)).astype(np.float32), rng.normal(0, 1, (200, *OP_INPUT))
    built = build(model, calibration=calibration.astype(np.float32), source=f"{case}.onnx")
    expected = _onnxruntime(model, X)
    nhwc = np.ascontiguousarray(X.transpose(0, 2, 3, 1))
    assert np.abs(_litert(built[FLOAT], nhwc) - expected).max() <= 1e-4
    int8 = _litert(built[INT8], nhwc)
    assert np.mean(int8.argmax(1) == expected.argmax(1)) >= 0.95
    assert np.abs(int8 - expected).max() <= 0.2 and np.abs(int8 - expected).mean() <= 0.01
