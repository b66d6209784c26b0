"""ONNX operators -> the NHWC graph of ``graph``: one small function per operator, in ``CONVERTERS``
(``ops_base``): dense layers, element-wise operators and activations here, the windowed ones in
``spatial_ops``, the ones that only move values in ``shape_ops``.

``graph_from_onnx`` walks the nodes an output needs (shape computations feeding a Reshape are
not needed: the inferred output shape is), folds constants and batch normalization, and calls the
operator's translation; an operator without one is refused by name. The layout rules are in
``graph``; this module says what each ONNX operator is in TFLite's terms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.build.tflite import shape_ops, spatial_ops
from edgekit.build.tflite.graph import TO_NHWC, Builder, Graph, Value, fuse_activations
from edgekit.build.tflite.ops_base import CONVERTERS, _constant, _onnx_shape, _out, converts
from edgekit.errors import EdgekitError

CHANNELS_LAST = {"NCHW": "NHWC", "NCW": "NWC"}
REGISTERED = (shape_ops, spatial_ops)  # their operators are in CONVERTERS once imported

SHAPE_ONLY = {"Reshape": 1, "Squeeze": 1, "Unsqueeze": 1, "Pad": 1, "Clip": 1, "Resize": 1, "Upsample": 1}
SHAPE_ONLY |= {"ReduceMean": 1, "ReduceMax": 1}  # how many inputs are read as data (the rest: constants)
ELEMENTWISE = {"Add": "ADD", "Mul": "MUL", "Sub": "SUB", "Div": "DIV"}
UNARY = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH", "HardSwish": "HARD_SWISH"}


def graph_from_onnx(proto: Any, outputs: list[str], *, source: str = "model", layout: str = "") -> Graph:
    """The graph of ``proto`` (one tensor input) computing ``outputs``. ``layout`` is the input's (its TensorSpec's,
    guessed from the shape when not given): channels-first inputs are taken channel-last, channel-last ones as they
    are."""
    import onnx
    from onnx import numpy_helper

    proto, original = onnx.ModelProto(), proto
    proto.CopyFrom(original)  # folding rewrites nodes (a batch norm into its convolution): not the caller's
    shapes = _inferred_shapes(proto)
    onnx_graph = proto.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx_graph.initializer}
    first = next(i for i in onnx_graph.input if i.name not in initializers)
    graph = Graph(first.name, "", list(outputs))
    b = Builder(graph, shapes, source)
    b.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), b.opset)
    b.constants.update(initializers)
    nodes = _needed(onnx_graph.node, outputs, b)
    for node in nodes:
        for name in node.input:
            b.uses.setdefault(name, []).append(node)
    _take_input(b, first.name, shapes[first.name], layout)
    for node in nodes:
        _translate(b, node)
    graph.outputs = _outputs(b, outputs)
    fuse_activations(graph)
    return graph


def _translate(b: Builder, node: Any) -> None:
    """One ONNX node into the graph; whatever goes wrong is refused by the node's name and operator."""
    from onnx import helper

    if node.domain not in ("", "ai.onnx"):
        raise b.refuse(node, f"operators of domain {node.domain!r} have no TFLite equivalent here")
    try:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if _fold_constant(b, node):
            return
        convert = CONVERTERS.get(node.op_type)
        if convert is None:
            raise b.refuse(node, f"operator {node.op_type} is not supported by the TFLite target")
        convert(b, node, attrs)
    except EdgekitError:
        raise
    except Exception as exc:  # a case the translation did not foresee: one line naming the node, not a traceback
        detail = " ".join(str(exc).split())[:200]
        raise b.refuse(node, f"could not be translated ({type(exc).__name__}: {detail})") from exc


def _outputs(b: Builder, outputs: list[str]) -> list[str]:
    """The output tensors, each called by its ONNX name (the runtime's outputs are keyed by it), whatever aliased
    it: a tensor already an output (or the input) is copied by a RESHAPE, and one that holds the name (a
    channel-last value whose ONNX-order copy is the output) gives the name up."""
    graph, named, renamed = b.graph, [], {}
    for name in outputs:
        tensor = b.plain(name)
        tensor = renamed.get(tensor, tensor)
        if tensor in named or tensor == graph.input:
            tensor = b.reshape(tensor, b.shape_of(tensor))
        if tensor != name:
            if name in graph.shapes:
                renamed[name] = _rename(graph, name, b.tensor(f"{name}/held", graph.shapes[name]))
            renamed[tensor] = _rename(graph, tensor, name)
        named.append(name)
    return named


def _rename(graph: Graph, tensor: str, name: str) -> str:
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


def _take_input(b: Builder, name: str, shape: tuple[int, ...], layout: str) -> None:
    """A channels-first input is taken channel-last: the device is sent NHWC (NWC), the layout LiteRT wants. A
    channel-last one (a Keras graph's, read through a Transpose to NCHW) is taken as it is: the transposes cancel."""
    from device_agent.tensors import guess_layout

    b.graph.source_layout = layout or guess_layout(shape)
    if len(shape) not in TO_NHWC or b.graph.source_layout not in CHANNELS_LAST:
        b.graph.input_layout = b.graph.source_layout if len(shape) in TO_NHWC else ""
        b.values[name] = Value(b.tensor(name, shape), "plain", shape)
        return
    b.graph.input_layout = CHANNELS_LAST[b.graph.source_layout]
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
        c = _constant(b, node, 2, "bias") * attrs.get("beta", 1.0)
        if c.size not in (1, weights.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
            raise b.refuse(node, f"a bias C of shape {list(c.shape)} (one per row) is not supported")
        bias = np.broadcast_to(c.reshape(-1), (weights.shape[0],))
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
    axis = attrs.get("axis", -1 if b.opset >= 13 else 1) % rank
    if b.opset < 13 and axis != rank - 1:
        _flattened_softmax(b, node, value, axis)
        return
    if value.layout == "nhwc" and axis == 1:
        tensor = value.tensor  # channels, last when held channel-last
    elif axis == rank - 1:
        tensor = b.plain(node.input[0])
    else:
        raise b.refuse(node, "softmax over an axis other than the last (or the channels) is not supported")
    out = b.emit("SOFTMAX", [tensor], node.output[0], b.shape_of(tensor), beta=1.0)
    _out(b, node, out, "nhwc" if tensor == value.tensor and value.layout == "nhwc" else "plain")


def _flattened_softmax(b: Builder, node: Any, value: Value, axis: int) -> None:
    """Softmax before opset 13: over everything from ``axis`` on, as one row. From the channels of a channel-last
    value that is all of it, in whichever order it is held; else the ONNX order, reshaped to rows and back."""
    if axis == 0:
        raise b.refuse(node, "softmax over the batch (axis 0 before opset 13) is not supported")
    nhwc = value.layout == "nhwc" and axis == 1
    tensor = value.tensor if nhwc else b.plain(node.input[0])
    shape = b.shape_of(tensor)
    start = 1 if nhwc else axis
    rows = b.reshape(tensor, (int(np.prod(shape[:start])), int(np.prod(shape[start:]))))
    out = b.emit("SOFTMAX", [rows], f"{node.output[0]}/rows", b.shape_of(rows), beta=1.0)
    _out(b, node, b.reshape(out, shape), "nhwc" if nhwc else "plain")


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
