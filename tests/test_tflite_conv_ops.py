"""The TFLite writer's later operators, one at a time against onnxruntime as in test_tflite_conv: ReduceMean,
HardSigmoid, Resize (nearest and bilinear), reflection Pad, ceil_mode pooling and ConvTranspose, each float32 within
1e-4 and int8 the same class."""

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("onnx")

from tests.test_tflite_conv import _conv, _i64, _n  # noqa: E402
from tests.test_tflite_conv_fixes import make_model, round_trip  # noqa: E402

SHAPE = (4, 8, 8)


def _after_conv(*items):
    """A 3x3 convolution "c" of x, then ``items`` (nodes, or (node, constants)); the last writes "y"."""
    conv, constants = _conv("c", "x", "c", (8, 4, 3, 3))
    nodes = [conv]
    for item in items:
        node, more = item if isinstance(item, tuple) else (item, {})
        nodes.append(node)
        constants = {**constants, **more}
    return nodes, constants


def _resize(mode, transform, scales=(1, 1, 2, 2), **attrs):
    scale = {"scales": np.asarray(scales, np.float32)}
    node = _n("Resize", ["c", "", "scales"], "y", mode=mode, coordinate_transformation_mode=transform, **attrs)
    return lambda: _after_conv((node, scale))


def _transposed(weights, **attrs):
    node = _n("ConvTranspose", ["c", "t.w", "t.b"], "y", kernel_shape=list(weights[2:]), **attrs)
    return lambda: _after_conv((node, {"t.w": (weights, 0.3), "t.b": ((weights[1],), 0.1)}))


CASES = {
    "ReduceMean spatial keepdims": lambda: _after_conv(_n("ReduceMean", ["c"], "y", axes=[2, 3])),
    "ReduceMean spatial to a vector": lambda: _after_conv(_n("ReduceMean", ["c"], "y", axes=[2, 3], keepdims=0)),
    "ReduceMean over channels": lambda: _after_conv(_n("ReduceMean", ["c"], "y", axes=[1])),
    "ReduceMean over width": lambda: _after_conv(_n("ReduceMean", ["c"], "y", axes=[3], keepdims=0)),
    "HardSigmoid": lambda: _after_conv(_n("HardSigmoid", ["c"], "y", alpha=0.25, beta=0.4)),
    "Resize nearest asymmetric floor": _resize("nearest", "asymmetric", nearest_mode="floor"),
    "Resize nearest half_pixel": _resize("nearest", "half_pixel"),
    "Resize nearest align_corners": _resize(
        "nearest", "align_corners", (1, 1, 1.5, 1.5), nearest_mode="round_prefer_ceil"
    ),
    "Resize bilinear half_pixel": _resize("linear", "half_pixel"),
    "Resize bilinear align_corners": _resize("linear", "align_corners"),
    "Resize bilinear asymmetric": _resize("linear", "asymmetric", (1, 1, 1.5, 2)),
    "Pad reflect": lambda: _after_conv(
        (_n("Pad", ["c", "pads"], "y", mode="reflect"), {"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)})
    ),
    "MaxPool ceil_mode": lambda: _after_conv(
        _n("MaxPool", ["c"], "y", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    ),
    "AveragePool ceil_mode": lambda: _after_conv(
        _n("AveragePool", ["c"], "y", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    ),
    "ConvTranspose 2x2 stride 2": _transposed((8, 6, 2, 2), strides=[2, 2]),
    "ConvTranspose 3x3 stride 3": _transposed((8, 4, 3, 3), strides=[3, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_more_operator_round_trips_against_onnxruntime_in_float_and_int8(case):
    nodes, constants = CASES[case]()
    round_trip(make_model(nodes, constants, SHAPE), SHAPE)


REFUSED = {
    "Resize cubic": _resize("cubic", "half_pixel"),
    "AveragePool ceil_mode counting pads": lambda: _after_conv(
        _n("AveragePool", ["c"], "y", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, count_include_pad=1)
    ),
    "ConvTranspose dilated": _transposed((8, 6, 2, 2), strides=[2, 2], dilations=[2, 2]),
    "ConvTranspose overlapping": _transposed((8, 6, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_has_no_tflite_twin_is_refused_by_name(case):
    from edgekit.build.tflite.onnx_ops import graph_from_onnx
    from edgekit.errors import ConversionError

    nodes, constants = REFUSED[case]()
    with pytest.raises(ConversionError, match=case.split()[0]):
        graph_from_onnx(make_model(nodes, constants, SHAPE), ["probabilities"])
