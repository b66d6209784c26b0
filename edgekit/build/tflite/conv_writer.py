"""The NHWC graph of ``graph``/``onnx_ops`` as a .tflite flatbuffer: float32, or full-integer int8.

The flatbuffer is built with the Object API of the schema ai-edge-litert ships (``writer._Builder``,
shared with the dense writer). int8 follows what LiteRT's kernels require: weights symmetric per
output channel (axis 0 for CONV_2D and FULLY_CONNECTED, 3 for DEPTHWISE_CONV_2D), int32 biases at
input scale × weight scale, activations asymmetric from calibrated ranges, and the operators that
only move values (pooling, RESHAPE, TRANSPOSE, PAD) keeping their input's parameters, since their
kernels do not rescale; CONCATENATION's inputs are requantized to its output's parameters when they
differ; SOFTMAX and LOGISTIC end at 1/256, -128 and TANH at 1/128, 0. The float scaling a network
starts with (a normaliser's MUL and ADD) stays float before the QUANTIZE, as the dense writer does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.build.tflite.graph import Graph, Op
from edgekit.build.tflite.writer import _asymmetric, _Builder
from edgekit.errors import ConversionError

SAME_AS_INPUT = {"MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "TRANSPOSE", "PAD", "PADV2", "REDUCE_MAX", "MAXIMUM"}
SAME_AS_INPUT |= {"MINIMUM"}  # LiteRT's int8 MAXIMUM/MINIMUM compare the raw integers: one scale for all
SAME_AS_INPUT |= {"SLICE", "MIRROR_PAD", "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "DEPTH_TO_SPACE"}
FIXED = {"SOFTMAX": (1 / 256, -128), "LOGISTIC": (1 / 256, -128), "TANH": (1 / 128, 0)}
WEIGHTED = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}  # the per-channel axis of the weights
PREFIX = {"ADD", "MUL", "SUB", "DIV"}
INT8_VERSIONS = {
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "FULLY_CONNECTED": 4,
    "HARD_SWISH": 1,
    "RESHAPE": 1,
    "DIV": 1,
    "QUANTIZE": 2,
    "DEQUANTIZE": 2,
}


def _activation(s: Any, name: str | None) -> int:
    return getattr(s.ActivationFunctionType, name or "NONE")


def _options(s: Any, op: Op) -> tuple[str, Any] | None:
    """The builtin options of ``op`` in the schema's object form (None for operators that take none)."""
    o, kind = op.options, op.kind
    padding = getattr(s.Padding, o.get("padding", "VALID"))
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        options = s.Conv2DOptionsT() if kind == "CONV_2D" else s.DepthwiseConv2DOptionsT()
        options.padding, (options.strideH, options.strideW) = padding, o["stride"]
        options.dilationHFactor, options.dilationWFactor = o["dilation"]
        options.fusedActivationFunction = _activation(s, o.get("activation"))
        if kind == "DEPTHWISE_CONV_2D":
            options.depthMultiplier = o["multiplier"]
        return ("Conv2DOptions" if kind == "CONV_2D" else "DepthwiseConv2DOptions"), options
    if kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        options = s.Pool2DOptionsT()
        options.padding, (options.strideH, options.strideW) = padding, o["stride"]
        options.filterHeight, options.filterWidth = o["filter"]
        return "Pool2DOptions", options
    simple = {
        "FULLY_CONNECTED": "FullyConnected",
        "ADD": "Add",
        "MUL": "Mul",
        "SUB": "Sub",
        "DIV": "Div",
        "CONCATENATION": "Concatenation",
    }
    if kind in simple:
        options = getattr(s, f"{simple[kind]}OptionsT")()
        options.fusedActivationFunction = _activation(s, o.get("activation"))
        if kind == "CONCATENATION":
            options.axis = o["axis"]
        return f"{simple[kind]}Options", options
    return _plain_options(s, op)


def _plain_options(s: Any, op: Op) -> tuple[str, Any] | None:
    o, kind = op.options, op.kind
    if kind in ("MEAN", "REDUCE_MAX"):
        options = s.ReducerOptionsT()
        options.keepDims = bool(o.get("keep_dims"))
        return "ReducerOptions", options
    if kind == "RESHAPE":
        options = s.ReshapeOptionsT()
        options.newShape = list(o["new_shape"])
        return "ReshapeOptions", options
    if kind == "SOFTMAX":
        options = s.SoftmaxOptionsT()
        options.beta = o.get("beta", 1.0)
        return "SoftmaxOptions", options
    if kind in ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"):
        name = "ResizeNearestNeighborOptions" if kind == "RESIZE_NEAREST_NEIGHBOR" else "ResizeBilinearOptions"
        options = getattr(s, f"{name}T")()
        options.alignCorners, options.halfPixelCenters = o["align_corners"], o["half_pixel_centers"]
        return name, options
    if kind == "DEPTH_TO_SPACE":
        options = s.DepthToSpaceOptionsT()
        options.blockSize = o["block_size"]
        return "DepthToSpaceOptions", options
    if kind == "MIRROR_PAD":
        options = s.MirrorPadOptionsT()
        options.mode = getattr(s.MirrorPadMode, o["mode"])
        return "MirrorPadOptions", options
    if kind == "LEAKY_RELU":
        options = s.LeakyReluOptionsT()
        options.alpha = o["alpha"]
        return "LeakyReluOptions", options
    named = {
        "TRANSPOSE": "Transpose",
        "PAD": "Pad",
        "PADV2": "PadV2",
        "MAXIMUM": "MaximumMinimum",
        "MINIMUM": "MaximumMinimum",
        "HARD_SWISH": "HardSwish",
        "SLICE": "Slice",
    }
    if kind in named:
        return f"{named[kind]}Options", getattr(s, f"{named[kind]}OptionsT")()
    return None


def _dtype(array: np.ndarray) -> str:
    return {"f": "float32", "i": "int32"}[array.dtype.kind] if array.dtype != np.int64 else "int64"


def write_float(graph: Graph, labels: tuple[Any, ...] | None, metadata: dict[str, str]) -> bytes:
    """The float32 .tflite of ``graph``; with integer class labels, a ``label`` output (ARG_MAX of the logits)."""
    b = _Builder()
    b.metadata = dict(metadata)
    index: dict[str, int] = {}

    def tensor(name: str) -> int:
        if name not in index:
            if name in graph.constants:
                array = graph.constants[name]
                array = array.astype(np.int32) if array.dtype.kind in "iu" else array.astype(np.float32)
                index[name] = b.tensor(name, list(array.shape), _dtype(array), array)
            else:
                index[name] = b.tensor(name, list(graph.shapes[name]), "float32")
        return index[name]

    first = tensor(graph.input)
    for op in graph.ops:
        inputs = [tensor(name) for name in op.inputs]
        b.op(op.kind, inputs, [tensor(op.output)], 1, _options(b.schema, op))
    outputs = [tensor(name) for name in graph.outputs]
    label = _label(b, graph, labels, index)
    return b.finish([first], outputs + ([label] if label is not None else []), "edgekit float32 (NHWC)")


def _label(b: _Builder, graph: Graph, labels: tuple[Any, ...] | None, index: dict[str, int]) -> int | None:
    producer = graph.producer(graph.outputs[0])
    if producer is None or producer.kind != "SOFTMAX" or len(graph.shapes[producer.inputs[0]]) != 2:
        return None
    return b.label_output(index[producer.inputs[0]], labels)


# -- int8 -----------------------------------------------------------------------------------------------------


def float_prefix(graph: Graph) -> list[Op]:
    """The element-wise scaling by constants the network starts with: kept float, before the QUANTIZE."""
    prefix, current = [], graph.input
    for op in graph.ops:
        dynamic = [n for n in op.inputs if n not in graph.constants]
        if op.kind not in PREFIX or dynamic != [current] or op.options.get("activation"):
            break
        if len(graph.consumers(current)) != 1:
            break
        prefix.append(op)
        current = op.output
    return prefix


def plan_quantization(graph: Graph, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every int8 tensor: calibrated, fixed by the operator, or its input's."""
    prefix = float_prefix(graph)
    start = prefix[-1].output if prefix else graph.input
    params = {start: _asymmetric(*ranges[start])}
    for op in graph.ops[len(prefix) :]:
        if op.kind in SAME_AS_INPUT:
            params[op.output] = params[op.inputs[0]]
        elif op.kind in FIXED:
            params[op.output] = FIXED[op.kind]
        elif op.kind == "CONCATENATION":
            low = min(ranges[n][0] for n in op.inputs if n in ranges)
            high = max(ranges[n][1] for n in op.inputs if n in ranges)
            params[op.output] = _asymmetric(low, high)
        else:
            params[op.output] = _asymmetric(*ranges[op.output])
    return params


def _symmetric(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    other = tuple(i for i in range(weights.ndim) if i != axis)
    peak = np.abs(weights).max(axis=other)
    scales = np.where(peak > 0, peak / 127.0, 1.0)
    shape = [-1 if i == axis else 1 for i in range(weights.ndim)]
    return np.clip(np.round(weights / scales.reshape(shape)), -127, 127).astype(np.int8), scales


class _Int8:
    """One int8 flatbuffer being written: tensors by graph name, with their quantization."""

    def __init__(self, graph: Graph, params: dict[str, tuple[float, int]], metadata: dict[str, str]) -> None:
        self.b, self.graph, self.params = _Builder(), graph, params
        self.b.metadata = dict(metadata)
        self.index: dict[str, int] = {}
        self.floats: dict[str, int] = {}
        prefix = float_prefix(graph)
        self.start = prefix[-1].output if prefix else graph.input  # where the QUANTIZE is

    def float_tensor(self, name: str) -> int:
        """A float tensor (the input, the float scaling before the QUANTIZE) or an int32 constant."""
        if name not in self.floats:
            if name in self.graph.constants:
                array = self.graph.constants[name]
                array = array.astype(np.int32) if array.dtype.kind in "iu" else array.astype(np.float32)
                self.floats[name] = self.b.tensor(name, list(array.shape), _dtype(array), array)
            else:
                self.floats[name] = self.b.tensor(name, list(self.graph.shapes[name]), "float32")
        return self.floats[name]

    def tensor(self, name: str) -> int:
        """The int8 tensor of activation ``name`` (an output's int8 side is called ``<name>/int8``)."""
        if name not in self.index:
            label = f"{name}/int8" if name in self.graph.outputs or name == self.start else name
            shape = list(self.graph.shapes[name])
            self.index[name] = self.b.tensor(label, shape, "int8", quant=self.params[name])
        return self.index[name]

    def constant(self, name: str, quant: tuple | None = None) -> int:
        """A constant operand: int32 shapes and axes as they are, float values quantized to int8."""
        array = self.graph.constants[name]
        if array.dtype.kind in "iu":
            return self.float_tensor(name)
        if quant is None:
            quant = _asymmetric(float(array.min()), float(array.max()))
        scale, zero = quant
        values = np.clip(np.round(array / scale + zero), -128, 127).astype(np.int8)
        return self.b.tensor(name, list(array.shape), "int8", values, quant=quant)

    def weighted(self, op: Op) -> list[int]:
        """The input, int8 weights per output channel and int32 bias of a convolution or dense layer."""
        x, weights, bias = op.inputs
        axis = WEIGHTED[op.kind]
        q_weights, scales = _symmetric(self.graph.constants[weights].astype(np.float64), axis)
        bias_scales = self.params[x][0] * scales
        q_bias = np.round(self.graph.constants[bias].astype(np.float64) / bias_scales)
        if np.abs(q_bias).max(initial=0) >= 2**31:
            raise ConversionError(
                f"the bias of {op.output} does not fit int32", "use --target tflite without --quantize"
            )
        zeros = np.zeros(len(scales), np.int64)
        w = self.b.tensor(f"{weights}", list(q_weights.shape), "int8", q_weights, quant=(scales, zeros))
        self.b.tensors[w].quantization.quantizedDimension = axis
        bias_index = self.b.tensor(bias, [len(q_bias)], "int32", q_bias.astype(np.int32), quant=(bias_scales, zeros))
        return [self.tensor(x), w, bias_index]

    def inputs(self, op: Op) -> list[int]:
        if op.kind in WEIGHTED:
            return self.weighted(op)
        if op.kind == "PADV2" and op.inputs[2] in self.graph.constants:
            scale, zero = self.params[op.inputs[0]]
            fill = max(-128, min(127, round(float(self.graph.constants[op.inputs[2]]) / scale + zero)))
            low = self.b.tensor(f"{op.output}/fill", [], "int8", np.asarray(fill, np.int8), quant=(scale, zero))
            return [self.tensor(op.inputs[0]), self.float_tensor(op.inputs[1]), low]
        if op.kind in ("MAXIMUM", "MINIMUM"):
            return [self.tensor(op.inputs[0]), self.constant(op.inputs[1], self.params[op.inputs[0]])]
        if op.kind == "CONCATENATION":
            return [self.requantized(name, self.params[op.output]) for name in op.inputs]
        return [self.constant(n) if n in self.graph.constants else self.tensor(n) for n in op.inputs]

    def requantized(self, name: str, quant: tuple[float, int]) -> int:
        if self.params[name] == quant:
            return self.tensor(name)
        out = self.b.tensor(f"{name}/requantized", list(self.graph.shapes[name]), "int8", quant=quant)
        self.b.op("QUANTIZE", [self.tensor(name)], [out], 2)
        return out


def write_int8(
    graph: Graph, ranges: dict[str, tuple[float, float]], labels: tuple[Any, ...] | None, metadata: dict[str, str]
) -> bytes:
    """Full-integer int8 (float in and out): ``ranges`` are each tensor's calibrated (min, max)."""
    params = plan_quantization(graph, ranges)
    w = _Int8(graph, params, metadata)
    first = w.float_tensor(graph.input)
    prefix = float_prefix(graph)
    for op in prefix:
        w.b.op(
            op.kind, [w.float_tensor(n) for n in op.inputs], [w.float_tensor(op.output)], 1, _options(w.b.schema, op)
        )
    w.b.op("QUANTIZE", [w.float_tensor(w.start)], [w.tensor(w.start)], 2)
    for op in graph.ops[len(prefix) :]:
        inputs = w.inputs(op)
        w.b.op(op.kind, inputs, [w.tensor(op.output)], INT8_VERSIONS.get(op.kind, 2), _options(w.b.schema, op))
    outputs = []
    for name in graph.outputs:
        out = w.b.tensor(name, list(graph.shapes[name]), "float32")
        w.b.op("DEQUANTIZE", [w.tensor(name)], [out], 2)
        outputs.append(out)
    label = _label(w.b, graph, labels, w.index)
    return w.b.finish([first], outputs + ([label] if label is not None else []), "edgekit int8 (NHWC)")
