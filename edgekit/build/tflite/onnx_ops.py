"""ONNX operators -> the NHWC graph of ``graph``: one small function per operator, in ``CONVERTERS``.

``graph_from_onnx`` walks the nodes an output needs (shape computations feeding a Reshape are
not needed: the inferred output shape is), folds constants and batch normalization, and calls the
operator's translation; an operator without one is refused by name. The layout rules are in
``graph``; this module says what each ONNX operator is in TFLite's terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgekit.build.tflite.graph import TO_NCHW, TO_NHWC, Builder, Graph, Value, fuse_activations, same_padding
from edgekit.errors import ConversionError

SHAPE_ONLY = {"Reshape": 1, "Squeeze": 1, "Unsqueeze": 1, "Pad": 1, "Clip": 1}  # inputs read as data
ELEMENTWISE = {"Add": "ADD", "Mul": "MUL", "Sub": "SUB", "Div": "DIV"}
UNARY = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH", "HardSwish": "HARD_SWISH"}
CONVERTERS: dict[str, Callable[[Builder, Any, dict[str, Any]], None]] = {}


def converts(*op_types: str) -> Callable:
    def register(function: Callable) -> Callable:
        for op_type in op_types:
            CONVERTERS[op_type] = function
        return function

    return register


def graph_from_onnx(proto: Any, outputs: list[str], *, source: str = "model") -> Graph:
    """The graph of ``proto`` (one tensor input, channels-first when rank 3 or 4) computing ``outputs``."""
    import onnx
    from onnx import helper, numpy_helper

    proto, original = onnx.ModelProto(), proto
    proto.CopyFrom(original)  # folding rewrites nodes (a batch norm into its convolution): not the caller's
    shapes = _inferred_shapes(proto)
    onnx_graph = proto.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx_graph.initializer}
    first = next(i for i in onnx_graph.input if i.name not in initializers)
    graph = Graph(first.name, "", list(outputs))
    b = Builder(graph, shapes, source)
    b.constants.update(initializers)
    nodes = _needed(onnx_graph.node, outputs, b)
    for node in nodes:
        for name in node.input:
            b.uses.setdefault(name, []).append(node)
    _take_input(b, first.name, shapes[first.name])
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in ("", "ai.onnx"):
            raise b.refuse(node, f"operators of domain {node.domain!r} have no TFLite equivalent here")
        if _fold_constant(b, node):
            continue
        convert = CONVERTERS.get(node.op_type)
        if convert is None:
            raise b.refuse(node, f"operator {node.op_type} is not supported by the TFLite target")
        convert(b, node, attrs)
    graph.outputs = [_named(graph, b.plain(name), name) for name in outputs]
    fuse_activations(graph)
    return graph


def _named(graph: Graph, tensor: str, name: str) -> str:
    """An output tensor called by its ONNX name (the runtime's outputs are keyed by it), whatever aliased it."""
    if tensor == name or name in graph.shapes or tensor == graph.input:
        return tensor
    graph.shapes[name] = graph.shapes.pop(tensor)
    for op in graph.ops:
        op.inputs = [name if n == tensor else n for n in op.inputs]
        op.output = name if op.output == tensor else op.output
    return name


def _inferred_shapes(proto: Any) -> dict[str, tuple[int, ...]]:
    """Every value's shape with the batch fixed at 1 (onnx's shape inference on a copy)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in copy.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(copy)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if all(d.dim_value > 0 for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _needed(nodes: Any, outputs: list[str], b: Builder) -> list[Any]:
    """The nodes the outputs need, in order; Constant nodes are folded into ``b.constants`` first."""
    from onnx import numpy_helper

    producers = {}
    for node in nodes:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            b.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        else:
            producers.update((out, node) for out in node.output)
    needed, stack = set(), list(outputs)
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        data = node.input[: SHAPE_ONLY.get(node.op_type, len(node.input))]
        stack.extend(name for name in data if name)
    return [node for node in nodes if id(node) in needed]


def _take_input(b: Builder, name: str, shape: tuple[int, ...]) -> None:
    """A channels-first input is taken channel-last: the device is sent NHWC (NWC), the layout LiteRT wants."""
    layout = {4: "NHWC", 3: "NWC"}.get(len(shape))
    if layout is None:
        b.graph.input_layout = ""
        b.values[name] = Value(b.tensor(name, shape), "plain", shape)
        return
    b.graph.input_layout = layout
    taken = tuple(shape[i] for i in TO_NHWC[len(shape)])
    tensor = b.tensor(name, taken)
    if len(shape) == 3:
        tensor = b.reshape(tensor, (1, 1, *taken[1:]))
    b.values[name] = Value(tensor, "nhwc", shape)


def _fold_constant(b: Builder, node: Any) -> bool:
    """A node whose inputs are all constants becomes a constant (onnx's reference evaluator computes it)."""
    if not all(name in b.constants for name in node.input if name):
        return False
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    inputs = [name for name in node.input if name]
    graph = helper.make_graph(
        [node],
        "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(b.constants[n].dtype), None) for n in inputs],
        [helper.make_tensor_value_info(n, 0, None) for n in node.output],
    )
    results = ReferenceEvaluator(helper.make_model(graph)).run(None, {n: b.constants[n] for n in inputs})
    b.constants.update(zip(node.output, (np.asarray(r) for r in results), strict=True))
    return True


def _out(b: Builder, node: Any, tensor: str, layout: str, order: np.ndarray | None = None) -> None:
    b.values[node.output[0]] = Value(tensor, layout, _onnx_shape(b, node.output[0]), order)


def _onnx_shape(b: Builder, name: str) -> tuple[int, ...]:
    shape = b.onnx_shapes.get(name)
    if shape is None:
        raise ConversionError(
            f"the shape of {name!r} is not known", "export the model with fixed shapes", path=b.source
        )
    return shape


def _nhwc_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    full = tuple(shape[i] for i in TO_NHWC[len(shape)])
    return (full[0], 1, *full[1:]) if len(shape) == 3 else full


def _constant(b: Builder, node: Any, index: int, what: str) -> np.ndarray:
    name = node.input[index] if len(node.input) > index else ""
    if name not in b.constants:
        raise b.refuse(node, f"its {what} must be a constant")
    return b.constants[name]


# -- convolution and pooling --------------------------------------------------------------------------------


def _window(b: Builder, node: Any, attrs: dict[str, Any], x: str, rank: int, kernel, stride, dilation) -> tuple:
    """(input tensor, TFLite padding) for a convolution or pooling window: SAME or VALID when ONNX's pads are
    those, else an explicit PAD (PADV2 at the lowest value for max pooling) and VALID."""
    _, height, width, _ = b.shape_of(x)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return x, "VALID"
    same = [
        same_padding(height, kernel[0], stride[0], dilation[0]),
        same_padding(width, kernel[1], stride[1], dilation[1]),
    ]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if auto == "SAME_LOWER" and any(a != c for a, c in same):
            raise b.refuse(node, "SAME_LOWER padding with an odd total has no TFLite equivalent")
        return x, "SAME"
    pads = list(attrs.get("pads", [0] * 2 * rank))
    pairs = [(pads[0], pads[1])] if rank == 1 else [(pads[0], pads[2]), (pads[1], pads[3])]
    if rank == 1:
        pairs = [(0, 0), pairs[0]]
    if all(p == (0, 0) for p in pairs):
        return x, "VALID"
    if [tuple(p) for p in pairs] == [tuple(s) for s in same]:
        return x, "SAME"
    if node.op_type == "AveragePool" and not attrs.get("count_include_pad", 0):
        raise b.refuse(node, "average pooling that excludes padding other than SAME has no TFLite equivalent")
    paddings = b.constant(f"{x}/paddings", np.asarray([(0, 0), *pairs, (0, 0)], np.int32))
    n, h, w, c = b.shape_of(x)
    shape = (n, h + sum(pairs[0]), w + sum(pairs[1]), c)
    if node.op_type == "MaxPool":
        lowest = b.constant(f"{x}/lowest", np.asarray(np.finfo(np.float32).min, np.float32))
        return b.emit("PADV2", [x, paddings, lowest], f"{x}/padded", shape), "VALID"
    return b.emit("PAD", [x, paddings], f"{x}/padded", shape), "VALID"


def _pair(values: Any, default: int, rank: int) -> tuple[int, int]:
    values = list(values) if values is not None else [default] * rank
    return (1, values[0]) if rank == 1 else (values[0], values[1])


def _conv_weights(b: Builder, node: Any) -> tuple[np.ndarray, np.ndarray]:
    """The convolution's weights and bias, with a BatchNormalization that alone reads its output folded in."""
    weights = _constant(b, node, 1, "weights").astype(np.float64)
    bias = _constant(b, node, 2, "bias").astype(np.float64) if len(node.input) > 2 else np.zeros(len(weights))
    readers = b.uses.get(node.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "BatchNormalization":
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
    if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1])):
        raise b.refuse(node, "ceil_mode and dilated pooling are not supported")
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


# -- dense layers -------------------------------------------------------------------------------------------


def _dense_input(b: Builder, node: Any) -> tuple[str, np.ndarray | None]:
    value = b.values[node.input[0]]
    if value.layout == "rows":
        return value.tensor, value.order
    tensor = b.plain(node.input[0])
    if len(b.shape_of(tensor)) != 2:
        raise b.refuse(node, "a dense layer here takes a 2-D input")
    return tensor, None


@converts("Gemm", "MatMul")
def dense(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    if attrs.get("transA", 0):
        raise b.refuse(node, "transA is not supported")
    x, order = _dense_input(b, node)
    matrix = _constant(b, node, 1, "weight matrix").astype(np.float64)
    weights = matrix if attrs.get("transB", 0) else matrix.T  # [out, in]
    weights = weights * attrs.get("alpha", 1.0)
    bias = np.zeros(weights.shape[0])
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = np.broadcast_to(_constant(b, node, 2, "bias") * attrs.get("beta", 1.0), (weights.shape[0],))
    readers = b.uses.get(node.output[0], [])
    if node.op_type == "MatMul" and len(readers) == 1 and readers[0].op_type == "Add":
        add = readers[0]
        other = next((n for n in add.input if n != node.output[0]), None)
        if other in b.constants and b.constants[other].size == weights.shape[0]:
            bias = b.constants[other].reshape(-1).astype(np.float64)
            add.op_type = "Identity"  # the bias is the dense layer's now
            del add.input[:]
            add.input.append(node.output[0])
    if order is not None:
        weights = weights[:, order]
    kernel = b.constant(f"{node.output[0]}/weights", weights.astype(np.float32))
    bias_name = b.constant(f"{node.output[0]}/bias", np.asarray(bias, np.float32))
    shape = (b.shape_of(x)[0], weights.shape[0])
    _out(b, node, b.emit("FULLY_CONNECTED", [x, kernel, bias_name], node.output[0], shape), "plain")


# -- element-wise ---------------------------------------------------------------------------------------------


@converts("Add", "Mul", "Sub", "Div")
def elementwise(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    names = list(node.input)
    dynamic = [n for n in names if n not in b.constants]
    kind = ELEMENTWISE[node.op_type]
    out_shape = _onnx_shape(b, node.output[0])
    if len(dynamic) == 1:
        value = b.values[dynamic[0]]
        if value.layout == "nhwc" and len(out_shape) != len(value.onnx_shape):
            value = Value(b.plain(dynamic[0]), "plain", value.onnx_shape)
        index = names.index(dynamic[0])
        constant = b.layout_constant(b.constants[names[1 - index]], value)
        if kind in ("SUB", "DIV") and index == 0:  # x - c = x + (-c), x / c = x * (1 / c): int8 has ADD and MUL
            kind, constant = ("ADD", -constant) if kind == "SUB" else ("MUL", 1 / constant)
        inputs = [value.tensor, b.constant(f"{node.output[0]}/constant", constant.astype(np.float32))]
        inputs = inputs if index == 0 else inputs[::-1]
        shape = np.broadcast_shapes(b.shape_of(value.tensor), constant.shape)
        _out(b, node, b.emit(kind, inputs, node.output[0], tuple(shape)), value.layout, value.order)
        return
    layouts = {b.values[n].layout for n in names}
    nhwc = layouts == {"nhwc"} and all(len(b.values[n].onnx_shape) == len(out_shape) for n in names)
    tensors = [b.nhwc(n) if nhwc else b.plain(n) for n in names]
    shape = np.broadcast_shapes(*(b.shape_of(t) for t in tensors))
    _out(b, node, b.emit(kind, tensors, node.output[0], tuple(shape)), "nhwc" if nhwc else "plain")


@converts("Relu", "Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "Clip")
def activation(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    value = b.values[node.input[0]]
    shape = b.shape_of(value.tensor)
    kind, options = UNARY.get(node.op_type), {}
    if node.op_type == "LeakyRelu":
        kind, options = "LEAKY_RELU", {"alpha": float(attrs.get("alpha", 0.01))}
    elif node.op_type == "Clip":
        kind = _clip_kind(b, node, attrs)
        if kind is None:
            low, high = _clip_bounds(b, node, attrs)
            tensor = value.tensor
            if low is not None:
                bound = b.constant(f"{node.output[0]}/low", np.asarray(low, np.float32))
                tensor = b.emit("MAXIMUM", [tensor, bound], f"{node.output[0]}/max", shape)
            if high is not None:
                bound = b.constant(f"{node.output[0]}/high", np.asarray(high, np.float32))
                tensor = b.emit("MINIMUM", [tensor, bound], node.output[0], shape)
            _out(b, node, tensor, value.layout, value.order)
            return
    _out(b, node, b.emit(kind, [value.tensor], node.output[0], shape, **options), value.layout, value.order)


def _clip_bounds(b: Builder, node: Any, attrs: dict[str, Any]) -> tuple[float | None, float | None]:
    low, high = attrs.get("min"), attrs.get("max")
    if len(node.input) > 1 and node.input[1]:
        low = float(_constant(b, node, 1, "minimum").reshape(-1)[0])
    if len(node.input) > 2 and node.input[2]:
        high = float(_constant(b, node, 2, "maximum").reshape(-1)[0])
    return low, high


def _clip_kind(b: Builder, node: Any, attrs: dict[str, Any]) -> str | None:
    return {(0.0, 6.0): "RELU6", (0.0, None): "RELU", (-1.0, 1.0): "RELU_N1_TO_1"}.get(_clip_bounds(b, node, attrs))


@converts("Softmax")
def softmax(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    value = b.values[node.input[0]]
    rank = len(value.onnx_shape)
    axis = attrs.get("axis", -1) % rank
    if value.layout == "nhwc" and axis == 1:
        tensor = value.tensor  # channels, last when held channel-last
    elif axis == rank - 1:
        tensor = b.plain(node.input[0])
    else:
        raise b.refuse(node, "softmax over an axis other than the last (or the channels) is not supported")
    out = b.emit("SOFTMAX", [tensor], node.output[0], b.shape_of(tensor), beta=1.0)
    _out(b, node, out, "nhwc" if tensor == value.tensor and value.layout == "nhwc" else "plain")


@converts("BatchNormalization")
def batch_norm(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """A batch norm with no convolution before it: a per-channel MUL and ADD."""
    gamma, beta, mean, var = (_constant(b, node, i, "statistics").astype(np.float64) for i in range(1, 5))
    factor = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
    value = b.values[node.input[0]]
    x = b.nhwc(node.input[0]) if len(value.onnx_shape) in TO_NHWC else b.plain(node.input[0])
    shape = b.shape_of(x)
    scale = b.constant(f"{node.output[0]}/scale", factor.astype(np.float32))
    shift = b.constant(f"{node.output[0]}/shift", (beta - mean * factor).astype(np.float32))
    scaled = b.emit("MUL", [x, scale], f"{node.output[0]}/scaled", shape)
    _out(b, node, b.emit("ADD", [scaled, shift], node.output[0], shape), "nhwc" if len(shape) == 4 else "plain")


# -- shapes ---------------------------------------------------------------------------------------------------


@converts("Identity", "Dropout", "Cast")
def identity(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    if node.op_type == "Cast" and attrs.get("to") != 1:
        raise b.refuse(node, "only casts to float are supported")
    b.values[node.output[0]] = b.values[node.input[0]]


@converts("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """A reshape of a channel-last value: free when its spatial size is 1 (both orders agree), a dense layer's
    weight columns permuted when only dense layers read it, else after a TRANSPOSE back to ONNX's order."""
    value, target = b.values[node.input[0]], _onnx_shape(b, node.output[0])
    if value.layout == "nhwc" and _one_row_image(value.onnx_shape, target):
        _out(b, node, value.tensor, "nhwc")  # NCW [N, C, W] <-> NCHW [N, C, 1, W]: both held as [N, 1, W, C]
        return
    if value.layout == "nhwc":
        spatial = int(np.prod(b.shape_of(value.tensor)[1:3]))
        readers = b.uses.get(node.output[0], [])
        dense_only = readers and all(r.op_type in ("Gemm", "MatMul") and r.input[0] == node.output[0] for r in readers)
        if spatial == 1:
            _out(b, node, b.reshape(value.tensor, target), "plain")
            return
        if len(target) == 2 and dense_only:
            n, h, w, c = b.shape_of(value.tensor)
            order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()
            _out(b, node, b.reshape(value.tensor, target), "rows", order)
            return
    if value.layout == "rows":
        raise b.refuse(node, "a reshape of a flattened channel-last value is not supported")
    _out(b, node, b.reshape(b.plain(node.input[0]), target), "plain")


def _one_row_image(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    ranks = (len(source), len(target))
    if ranks == (3, 4):
        return target == (source[0], source[1], 1, source[2])
    return ranks == (4, 3) and source == (target[0], target[1], 1, target[2])


@converts("Transpose")
def transpose(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """NHWC -> NCHW of a plain value is a channel-last value as it is (and back): the transposes cancel."""
    value = b.values[node.input[0]]
    rank = len(value.onnx_shape)
    perm = tuple(attrs.get("perm", reversed(range(rank))))
    if rank == 4 and value.layout == "plain" and perm == TO_NCHW[4]:
        _out(b, node, value.tensor, "nhwc")
        return
    if rank == 4 and value.layout == "nhwc" and perm == TO_NHWC[4]:
        _out(b, node, value.tensor, "plain")
        return
    x = b.plain(node.input[0])
    permutation = b.constant(f"{node.output[0]}/perm", np.asarray(perm, np.int32))
    _out(b, node, b.emit("TRANSPOSE", [x, permutation], node.output[0], _onnx_shape(b, node.output[0])), "plain")


@converts("Concat")
def concat(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    values = [b.values[n] for n in node.input]
    rank = len(values[0].onnx_shape)
    axis = attrs["axis"] % rank
    nhwc = rank in TO_NHWC and any(v.layout == "nhwc" for v in values)
    tensors = [b.nhwc(n) if nhwc else b.plain(n) for n in node.input]
    if nhwc:
        axis = {4: (0, 3, 1, 2), 3: (0, 3, 2)}[rank][axis]
    shape = list(b.shape_of(tensors[0]))
    shape[axis] = sum(b.shape_of(t)[axis] for t in tensors)
    out = b.emit("CONCATENATION", tensors, node.output[0], tuple(shape), axis=axis)
    _out(b, node, out, "nhwc" if nhwc else "plain")


@converts("Pad")
def pad(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        raise b.refuse(node, "only constant padding is supported")
    pads = attrs.get("pads") if "pads" in attrs else _constant(b, node, 1, "pads").tolist()
    fill = float(_constant(b, node, 2, "value").reshape(-1)[0]) if len(node.input) > 2 and node.input[2] else 0.0
    value = b.values[node.input[0]]
    rank = len(value.onnx_shape)
    pairs = [(int(pads[i]), int(pads[i + rank])) for i in range(rank)]
    if value.layout == "nhwc":
        tensor = value.tensor
        pairs = [pairs[i] for i in TO_NHWC[rank]]
        pairs = [pairs[0], (0, 0), *pairs[1:]] if rank == 3 else pairs
    else:
        tensor = b.plain(node.input[0])
    shape = tuple(d + sum(p) for d, p in zip(b.shape_of(tensor), pairs, strict=True))
    paddings = b.constant(f"{node.output[0]}/paddings", np.asarray(pairs, np.int32))
    inputs = [tensor, paddings]
    if fill:
        inputs.append(b.constant(f"{node.output[0]}/fill", np.asarray(fill, np.float32)))
    out = b.emit("PADV2" if fill else "PAD", inputs, node.output[0], shape)
    _out(b, node, out, "nhwc" if value.layout == "nhwc" else "plain")
