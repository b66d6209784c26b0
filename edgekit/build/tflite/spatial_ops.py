"""Convolution, pooling and the other windowed operators of ONNX as TFLite operators on channel-last values.

Padding is TFLite's SAME or VALID when ONNX's pads are those, else an explicit PAD before a VALID window
(``_window``). Imports: numpy, ``graph``, ``ops_base``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.build.tflite.graph import TO_NHWC, Builder, Value, same_padding
from edgekit.build.tflite.ops_base import _constant, _nhwc_shape, _onnx_shape, _out, _pair, converts

# -- convolution and pooling --------------------------------------------------------------------------------


def _window(b: Builder, node: Any, attrs: dict[str, Any], x: str, rank: int, kernel, stride, dilation) -> tuple:
    """(input tensor, TFLite padding) for a convolution or pooling window: SAME or VALID when ONNX's pads are
    those, else an explicit PAD (PADV2 at the lowest value for max pooling) and VALID. TFLite's SAME average
    leaves the padding out: an AveragePool that counts it (count_include_pad) is padded with zeros instead."""
    _, height, width, _ = b.shape_of(x)
    same = [
        same_padding(height, kernel[0], stride[0], dilation[0]),
        same_padding(width, kernel[1], stride[1], dilation[1]),
    ]
    pairs = _window_pads(attrs, rank, same)
    if attrs.get("ceil_mode", 0):
        pairs = _ceil_pads(b, node, attrs, pairs, (height, width), kernel, stride)
    counted = node.op_type == "AveragePool" and attrs.get("count_include_pad", 0)
    if all(p == (0, 0) for p in pairs):
        return x, "VALID"
    if pairs == same and not counted:
        return x, "SAME"
    if node.op_type == "AveragePool" and not counted:
        raise b.refuse(node, "average pooling that excludes padding other than SAME has no TFLite equivalent")
    paddings = b.constant(f"{x}/paddings", np.asarray([(0, 0), *pairs, (0, 0)], np.int32))
    n, h, w, c = b.shape_of(x)
    shape = (n, h + sum(pairs[0]), w + sum(pairs[1]), c)
    if node.op_type == "MaxPool":
        lowest = b.constant(f"{x}/lowest", np.asarray(np.finfo(np.float32).min, np.float32))
        return b.emit("PADV2", [x, paddings, lowest], f"{x}/padded", shape), "VALID"
    return b.emit("PAD", [x, paddings], f"{x}/padded", shape), "VALID"


def _window_pads(attrs: dict[str, Any], rank: int, same: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """ONNX's (before, after) padding of height and width; SAME_UPPER is TFLite's SAME, SAME_LOWER its mirror."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return [(0, 0), (0, 0)]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return same if auto == "SAME_UPPER" else [(after, before) for before, after in same]
    pads = [int(p) for p in attrs.get("pads", [0] * 2 * rank)]
    return [(0, 0), (pads[0], pads[1])] if rank == 1 else [(pads[0], pads[2]), (pads[1], pads[3])]


def _ceil_pads(b: Builder, node: Any, attrs: dict[str, Any], pairs: list, size: tuple, kernel, stride) -> list:
    """ceil_mode: the last, partial window kept, as extra padding at the end (ONNX drops a window that would
    start in the end padding). The extra is left out of an average, as TFLite's SAME does: so only then."""
    extended = []
    for (before, after), n, k, s in zip(pairs, size, kernel, stride, strict=True):
        padded = n + before + after
        out = -(-(padded - k) // s) + 1
        if (out - 1) * s >= n + before:
            out -= 1
        extended.append((before, after + max((out - 1) * s + k - padded, 0)))
    if extended != pairs and node.op_type == "AveragePool" and attrs.get("count_include_pad", 0):
        raise b.refuse(node, "ceil_mode average pooling that counts its padding has no TFLite equivalent")
    return extended


def _conv_weights(b: Builder, node: Any) -> tuple[np.ndarray, np.ndarray]:
    """The convolution's weights and bias, with a BatchNormalization that alone reads its output folded in."""
    weights = _constant(b, node, 1, "weights").astype(np.float64)
    bias = _constant(b, node, 2, "bias").astype(np.float64) if len(node.input) > 2 else np.zeros(len(weights))
    readers = b.uses.get(node.output[0], [])
    exposed = node.output[0] in b.graph.outputs  # an output itself (an embedding): the norm must not change it
    if len(readers) == 1 and readers[0].op_type == "BatchNormalization" and not exposed:
        bn = readers[0]
        gamma, beta, mean, var = (_constant(b, bn, i, "statistics").astype(np.float64) for i in range(1, 5))
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + eps)
        weights = weights * factor.reshape(-1, *([1] * (weights.ndim - 1)))
        bias = (bias - mean) * factor + beta
        bn.op_type, bn.input[0] = "Identity", node.output[0]  # the folded norm passes the value on
        del bn.input[1:]
    return weights, bias


@converts("Conv")
def conv(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    x = b.nhwc(node.input[0])
    weights, bias = _conv_weights(b, node)
    rank = weights.ndim - 2
    if rank not in (1, 2):
        raise b.refuse(node, f"{rank}-D convolution is not supported")
    if rank == 1:
        weights = weights[:, :, np.newaxis, :]
    out_channels, per_group, kh, kw = weights.shape
    groups, channels = int(attrs.get("group", 1)), b.shape_of(x)[3]
    stride, dilation = _pair(attrs.get("strides"), 1, rank), _pair(attrs.get("dilations"), 1, rank)
    x, padding = _window(b, node, attrs, x, rank, (kh, kw), stride, dilation)
    shape = _nhwc_shape(_onnx_shape(b, node.output[0]))
    options = {"padding": padding, "stride": stride, "dilation": dilation}
    bias_name = b.constant(f"{node.output[0]}/bias", bias.astype(np.float32))
    if groups == 1:
        kernel = b.constant(f"{node.output[0]}/weights", weights.transpose(0, 2, 3, 1).astype(np.float32))
        b.values[node.output[0]] = Value(
            b.emit("CONV_2D", [x, kernel, bias_name], node.output[0], shape, **options),
            "nhwc",
            _onnx_shape(b, node.output[0]),
        )
        return
    if groups == channels and per_group == 1:
        kernel = b.constant(f"{node.output[0]}/weights", weights.transpose(1, 2, 3, 0).astype(np.float32))
        out = b.emit(
            "DEPTHWISE_CONV_2D",
            [x, kernel, bias_name],
            node.output[0],
            shape,
            multiplier=out_channels // channels,
            **options,
        )
        b.values[node.output[0]] = Value(out, "nhwc", _onnx_shape(b, node.output[0]))
        return
    kernel = b.constant(f"{node.output[0]}/weights", weights.transpose(0, 2, 3, 1).astype(np.float32))
    out = b.emit("CONV_2D", [x, kernel, bias_name], node.output[0], shape, groups=groups, **options)
    b.values[node.output[0]] = Value(out, "nhwc", _onnx_shape(b, node.output[0]))


@converts("MaxPool", "AveragePool")
def pool(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    if any(d != 1 for d in attrs.get("dilations", [1])):
        raise b.refuse(node, "dilated pooling is not supported")
    if len(node.output) > 1 and node.output[1]:
        raise b.refuse(node, "the indices output of max pooling is not supported")
    x = b.nhwc(node.input[0])
    rank = len(attrs["kernel_shape"])
    kernel = _pair(attrs["kernel_shape"], 1, rank)
    stride = _pair(attrs.get("strides"), 1, rank)
    x, padding = _window(b, node, attrs, x, rank, kernel, stride, (1, 1))
    shape = _nhwc_shape(_onnx_shape(b, node.output[0]))
    kind = "MAX_POOL_2D" if node.op_type == "MaxPool" else "AVERAGE_POOL_2D"
    out = b.emit(kind, [x], node.output[0], shape, padding=padding, stride=stride, filter=kernel)
    _out(b, node, out, "nhwc")


@converts("GlobalAveragePool", "GlobalMaxPool")
def global_pool(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    x = b.nhwc(node.input[0])
    n, _, _, c = b.shape_of(x)
    axes = b.constant(f"{node.output[0]}/axes", np.asarray([1, 2], np.int32))
    kind = "MEAN" if node.op_type == "GlobalAveragePool" else "REDUCE_MAX"
    _out(b, node, b.emit(kind, [x, axes], node.output[0], (n, 1, 1, c), keep_dims=True), "nhwc")


@converts("ReduceMean", "ReduceMax")
def reduce(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """MEAN (REDUCE_MAX) over ONNX's axes, kept channel-last when the dimensions stay; over height and width of an
    image without them, the [N, C] vector as it is."""
    value = b.values[node.input[0]]
    rank = len(value.onnx_shape)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _constant(b, node, 1, "axes").reshape(-1).tolist()
    if axes is None and attrs.get("noop_with_empty_axes", 0):
        raise b.refuse(node, "an empty reduction (noop_with_empty_axes) is not supported")
    axes = sorted({int(a) % rank for a in (axes if axes is not None else range(rank))})
    if 0 in axes:
        raise b.refuse(node, "reducing over the batch is not supported")
    keep, kind = bool(attrs.get("keepdims", 1)), "MEAN" if node.op_type == "ReduceMean" else "REDUCE_MAX"
    spatial = {4: [2, 3], 3: [2]}.get(rank)
    nhwc = value.layout == "nhwc" and (keep or axes == spatial)
    if nhwc:
        x, held = value.tensor, [TO_NHWC[rank].index(a) for a in axes]
        held = [a + 1 if rank == 3 else a for a in held]  # NCW is held as [N, 1, W, C]
        held = [1, *held] if rank == 3 and not keep else held  # and its H of 1 goes with the W
    else:
        x, held = b.plain(node.input[0]), axes
    shape = [1 if i in held else d for i, d in enumerate(b.shape_of(x))]
    shape = shape if keep else [d for i, d in enumerate(shape) if i not in held]
    target = b.constant(f"{node.output[0]}/axes", np.asarray(held, np.int32))
    out = b.emit(kind, [x, target], node.output[0], tuple(shape), keep_dims=keep)
    _out(b, node, out, "nhwc" if nhwc and keep else "plain")


@converts("HardSigmoid")
def hard_sigmoid(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """max(0, min(1, alpha x + beta)): MUL and ADD (the RELU fused into it), then MINIMUM at 1."""
    value = b.values[node.input[0]]
    shape = b.shape_of(value.tensor)
    alpha = b.constant(f"{node.output[0]}/alpha", np.asarray(attrs.get("alpha", 0.2), np.float32))
    beta = b.constant(f"{node.output[0]}/beta", np.asarray(attrs.get("beta", 0.5), np.float32))
    one = b.constant(f"{node.output[0]}/one", np.asarray(1.0, np.float32))
    scaled = b.emit("MUL", [value.tensor, alpha], f"{node.output[0]}/scaled", shape)
    shifted = b.emit("ADD", [scaled, beta], f"{node.output[0]}/shifted", shape)
    low = b.emit("RELU", [shifted], f"{node.output[0]}/relu", shape)
    _out(b, node, b.emit("MINIMUM", [low, one], node.output[0], shape), value.layout, value.order)


@converts("Resize", "Upsample")
def resize(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """Nearest (RESIZE_NEAREST_NEIGHBOR) or linear (RESIZE_BILINEAR) resizing of height and width, when one of
    TFLite's (align_corners, half_pixel_centers) options samples where ONNX's coordinate mode does."""
    x = b.nhwc(node.input[0])
    shape = _nhwc_shape(_onnx_shape(b, node.output[0]))
    n, h, w, c = b.shape_of(x)
    if shape[0] != n or shape[3] != c:
        raise b.refuse(node, "resizing other than height and width is not supported")
    mode = _text(attrs.get("mode", b"nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", b"half_pixel" if node.op_type == "Resize" else ""))
    if mode == "linear" and not attrs.get("antialias", 0) and transform in LINEAR_OPTIONS:
        align, half = LINEAR_OPTIONS[transform]
        if transform == "pytorch_half_pixel" and min(shape[1:3]) == 1:
            raise b.refuse(node, "pytorch_half_pixel resizing to a size of 1 is not supported")
        kind = "RESIZE_BILINEAR"
    elif mode == "nearest":
        rounding = _text(attrs.get("nearest_mode", b"round_prefer_floor" if node.op_type == "Resize" else b"floor"))
        options = _nearest_options(transform, rounding, ((h, shape[1]), (w, shape[2])))
        if options is None:
            raise b.refuse(node, f"nearest resizing with {transform} coordinates and {rounding} has no TFLite twin")
        (align, half), kind = options, "RESIZE_NEAREST_NEIGHBOR"
    else:
        raise b.refuse(node, f"{mode} resizing with {transform} coordinates is not supported")
    size = b.constant(f"{node.output[0]}/size", np.asarray(shape[1:3], np.int32))
    out = b.emit(kind, [x, size], node.output[0], shape, align_corners=align, half_pixel_centers=half)
    _out(b, node, out, "nhwc")


LINEAR_OPTIONS = {"half_pixel": (False, True), "pytorch_half_pixel": (False, True)}
LINEAR_OPTIONS |= {"align_corners": (True, False), "asymmetric": (False, False)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _onnx_nearest(transform: str, rounding: str, size: int, out: int) -> list[int] | None:
    """The input index ONNX's nearest resizing reads for each output index of one axis (None: not computed here)."""
    scale, x = out / size, np.arange(out, dtype=np.float64)
    where = {
        "half_pixel": (x + 0.5) / scale - 0.5,
        "pytorch_half_pixel": (x + 0.5) / scale - 0.5 if out > 1 else np.zeros(out),
        "asymmetric": x / scale,
        "tf_half_pixel_for_nn": (x + 0.5) / scale,
        "align_corners": x * (size - 1) / (out - 1) if out > 1 else np.zeros(out),
        "": x / scale,  # Upsample
    }.get(transform)
    rounded = {
        "round_prefer_floor": np.ceil(where - 0.5) if where is not None else None,
        "round_prefer_ceil": np.floor(where + 0.5) if where is not None else None,
        "floor": np.floor(where) if where is not None else None,
        "ceil": np.ceil(where) if where is not None else None,
    }.get(rounding)
    return None if rounded is None else np.clip(rounded, 0, size - 1).astype(int).tolist()


def _nearest_options(transform: str, rounding: str, axes: tuple) -> tuple[bool, bool] | None:
    """LiteRT's (align_corners, half_pixel_centers) reading the input rows and columns ONNX's mode reads."""
    wanted = [_onnx_nearest(transform, rounding, size, out) for size, out in axes]
    for options in ((False, False), (False, True), (True, False)):
        if None not in wanted and [_tflite_nearest(*options, size, out) for size, out in axes] == wanted:
            return options
    return None


def _tflite_nearest(align: bool, half: bool, size: int, out: int) -> list[int]:
    """The input index LiteRT's RESIZE_NEAREST_NEIGHBOR reads for each output index of one axis."""
    scale = (size - 1) / (out - 1) if align and out > 1 else size / out
    x = np.arange(out, dtype=np.float64) + (0.5 if half else 0.0)
    index = np.round(x * scale) if align else np.floor(x * scale)
    return np.clip(index, 0, size - 1).astype(int).tolist()


@converts("ConvTranspose")
def conv_transpose(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """An upsampling transposed convolution (kernel = stride, square, unpadded: each input pixel writes its own
    block) as a 1x1 CONV_2D to every block position's channels and DEPTH_TO_SPACE. TFLite's TRANSPOSE_CONV
    would fix the batch size in its output-shape operand."""
    x = b.nhwc(node.input[0])
    weights = _constant(b, node, 1, "weights").astype(np.float64)  # [in, out, kh, kw]
    kernel, stride = list(weights.shape[2:]), list(attrs.get("strides", [1] * (weights.ndim - 2)))
    padded = any(attrs.get("pads", [0])) or any(attrs.get("output_padding", [0]))
    ungrouped = int(attrs.get("group", 1)) == 1 and all(d == 1 for d in attrs.get("dilations", [1]))
    if weights.ndim != 4 or not ungrouped or padded or kernel != stride or kernel[0] != kernel[1]:
        raise b.refuse(node, "only ungrouped, unpadded 2-D transposed convolution with kernel = stride is supported")
    block, out_channels = kernel[0], weights.shape[1]
    bias = _constant(b, node, 2, "bias") if len(node.input) > 2 and node.input[2] else np.zeros(out_channels)
    n, h, w, _ = b.shape_of(x)
    matrix = weights.transpose(2, 3, 1, 0).reshape(block * block * out_channels, -1)[:, np.newaxis, np.newaxis, :]
    inputs = [
        x,
        b.constant(f"{node.output[0]}/weights", matrix.astype(np.float32)),
        b.constant(f"{node.output[0]}/bias", np.tile(np.asarray(bias, np.float32), block * block)),
    ]
    blocks = b.emit(
        "CONV_2D",
        inputs,
        f"{node.output[0]}/blocks",
        (n, h, w, matrix.shape[0]),
        padding="VALID",
        stride=(1, 1),
        dilation=(1, 1),
    )
    shape = (n, h * block, w * block, out_channels)
    _out(b, node, b.emit("DEPTH_TO_SPACE", [blocks], node.output[0], shape, block_size=block), "nhwc")
