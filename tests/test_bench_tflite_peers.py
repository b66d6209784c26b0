"""scripts/bench_tflite_peers.py without TensorFlow: the Keras spec it hands the peer venv (checked by a numpy
NHWC forward against onnxruntime), edgekit's side of the bench, the file comparison and the report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_tflite_peers as peers

from edgekit.build.tflite.graph import same_padding
from edgekit.local.tensor_onnx import GraphBuilder

pytest.importorskip("ai_edge_litert")


def tiny_onnx(path: Path) -> Path:
    """x [N, 3, 8, 8] -> scale and shift -> conv stride 2 (ONNX pads 1 and 1: not SAME) -> ReLU6 ->
    depthwise (SAME) -> ReLU -> max pool -> global average -> Gemm -> softmax: every layer kind the bench maps."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("tiny")
    c = lambda name, *shape: b.constant(name, rng.normal(0, 0.5, shape).astype(np.float32))  # noqa: E731
    x = b.node("Mul", ["x", b.constant("scale", np.asarray([0.5], np.float32))], "scaled")
    x = b.node("Add", [x, b.constant("shift", np.asarray([0.1], np.float32))], "shifted")
    x = b.node("Conv", [x, c("w1", 4, 3, 3, 3), c("b1", 4)], "c1", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    low, high = b.constant("lo", np.asarray(0, np.float32)), b.constant("hi", np.asarray(6, np.float32))
    x = b.node("Clip", [x, low, high], "r1")
    x = b.node("Conv", [x, c("w2", 4, 1, 3, 3), c("b2", 4)], "c2", kernel_shape=[3, 3], pads=[1] * 4, group=4)
    x = b.node("MaxPool", [b.node("Relu", [x], "r2")], "p", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "g")], "embedding", axis=1)
    b.node("Softmax", [b.node("Gemm", [x, c("w3", 4, 3), c("b3", 3)], "logits")], "probabilities", axis=1)
    model = b.model("x", (None, 3, 8, 8), {"probabilities": (None, 3)})
    path.write_bytes(model.SerializeToString())
    return path


def conv_nhwc(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, layer: dict) -> np.ndarray:
    """What Keras' Conv2D (kernel HWIO) or DepthwiseConv2D (kernel HWC1) computes, in numpy."""
    k, s = kernel.shape[0], layer["stride"]
    if layer["padding"] == "same":
        pairs = [same_padding(x.shape[i], k, s) for i in (1, 2)]
        x = np.pad(x, ((0, 0), *pairs, (0, 0)))
    oh, ow = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    out = np.zeros((x.shape[0], oh, ow, bias.shape[0]), np.float64)
    for i in range(k):
        for j in range(k):
            patch = x[:, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s, :]
            out += patch * kernel[i, j, :, 0] if layer["depthwise"] else patch @ kernel[i, j]
    return out + bias


def keras_forward(spec: dict, arrays: dict, x: np.ndarray) -> np.ndarray:
    for layer in spec["layers"]:
        op = layer["op"]
        if op == "rescale":
            x = x * layer["scale"] + layer["offset"]
        elif op == "pad":
            x = np.pad(x, ((0, 0), *map(tuple, layer["pads"]), (0, 0)))
        elif op in ("conv", "dense"):
            kernel, bias = arrays[layer["weights"]], arrays[layer["bias"]]
            x = conv_nhwc(x, kernel, bias, layer) if op == "conv" else x @ kernel + bias
        elif op in ("relu", "relu6"):
            x = np.clip(x, 0, 6 if op == "relu6" else None)
        elif op == "maxpool":
            n, h, w, c = x.shape
            size = layer["size"]
            x = x[:, : h // size * size, : w // size * size].reshape(n, h // size, size, w // size, size, c).max((2, 4))
        elif op == "gap":
            x = x.mean(axis=(1, 2))
        else:
            assert op == "softmax"
            x = np.exp(x - x.max(1, keepdims=True))
            x = x / x.sum(1, keepdims=True)
    return x


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> peers.Network:
    work = tmp_path_factory.mktemp("peers")
    onnx_path = tiny_onnx(work / "tiny.onnx")
    rng = np.random.default_rng(1)
    calibration, test = (rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32) for n in (32, 24))
    net = peers.Network("tiny", onnx_path, calibration, test, peers.reference(onnx_path, test), work)
    np.savez(net.calibration_npz, X=calibration)
    return net


def test_keras_spec_matches_onnxruntime(tiny: peers.Network) -> None:
    spec, arrays = peers.keras_spec(tiny.onnx)
    ops = [layer["op"] for layer in spec["layers"]]
    assert ops == ["rescale", "pad", "conv", "relu6", "conv", "relu", "maxpool", "gap", "dense", "softmax"]
    assert spec["input_shape"] == [8, 8, 3]
    assert [layer["padding"] for layer in spec["layers"] if layer["op"] == "conv"] == ["valid", "same"]
    got = keras_forward(spec, arrays, tiny.nhwc(tiny.test).astype(np.float64))
    np.testing.assert_allclose(got, tiny.reference, atol=1e-5)


def test_unknown_operator_is_refused(tmp_path: Path) -> None:
    b = GraphBuilder("odd")
    b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Tanh", ["x"], "t")], "g")], "probabilities", axis=1)
    path = tmp_path / "odd.onnx"
    path.write_bytes(b.model("x", (None, 2, 4, 4), {"probabilities": (None, 2)}).SerializeToString())
    with pytest.raises(ValueError, match="Tanh has no Keras layer"):
        peers.keras_spec(path)
    b = GraphBuilder("rows")
    b.node("Softmax", ["x"], "probabilities", axis=1)
    path.write_bytes(b.model("x", (None, 4), {"probabilities": (None, 4)}).SerializeToString())
    with pytest.raises(ValueError, match="not of rank 2"):
        peers.keras_spec(path)


def test_peer_helper_is_python() -> None:
    compile(peers.PEER_HELPER, "helper.py", "exec")


def test_edgekit_side_and_report_without_peers(tiny: peers.Network, capsys: pytest.CaptureFixture) -> None:
    result = peers.bench_network(tiny, None, peers.QUICK)
    assert set(result["files"]) == {"edgekit float32", "edgekit int8"}
    int8 = result["files"]["edgekit int8"]
    assert int8["ops"]["QUANTIZE"] == 1 and int8["ops"]["DEQUANTIZE"] == 1 and int8["io"] == ["FLOAT32", "FLOAT32"]
    assert any("INT8" in signature and "bias INT32" in signature for signature in int8["weighted_ops"])
    assert int8["unshared_bytes"] >= int8["bytes"]  # edgekit's writer shares identical vectors
    assert result["files"]["edgekit float32"]["agreement"] == 1.0
    assert result["converted"]["edgekit"]["int8_calibration_seconds"] > 0
    assert set(result["p50_ms"]) == {"b1 t1", "b1 t4", "b8 t1", "b8 t4"}
    stages = result["converted"]["edgekit"]["int8_stage_seconds"]
    assert all(stages[k] is not None and stages[k] >= 0 for k in ("write", "score", "time"))
    checks = peers.network_checks(result)
    assert checks == [("tiny: int8 edgekit / TensorFlow", None, "both files", False)]
    assert peers.notes([result]) == ["tiny: no TensorFlow int8 file to compare with"]
    peers.print_table([result])
    assert "tensorflow int8" in capsys.readouterr().out


def test_file_differences_name_the_parts(tiny: peers.Network) -> None:
    result = peers.convert_edgekit(tiny)
    described = {p: peers.describe(Path(f).read_bytes()) for p, f in result["files"].items()}
    text = peers.file_differences(described["int8"], described["float32"])
    assert "QUANTIZE +1" in text and "INT8 constants" in text and "FLOAT32 constants" in text
