"""Graph rewrites that make skl2onnx output quantizable, without changing what it computes.

onnxruntime's quantizer cannot see through ``ai.onnx.ml`` operators: shape inference stops at a
``Scaler``, so every tensor after it has no type and the quantizer fails. ``lower_for_quantization``
rewrites ``Scaler`` as standard ``Sub`` and ``Mul`` (named with ``PREPROCESSING_PREFIX`` so the
quantizer keeps them in float: folding a per-feature scale into int8 wrecks per-tensor ranges), and
fuses ``MatMul`` + ``Add`` with a constant bias into ``Gemm`` with a 1-D bias, which onnxruntime
runs as one QGemm with an int32 bias.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PREPROCESSING_PREFIX = "edgekit_preprocessing/"


def lower_for_quantization(proto: Any) -> Any:
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    _lower_scalers(model)
    _fuse_matmul_add(model)
    return model


def preprocessing_nodes(proto: Any) -> list[str]:
    return [n.name for n in proto.graph.node if n.name.startswith(PREPROCESSING_PREFIX)]


def _lower_scalers(model: Any) -> None:
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Scaler" or node.domain != "ai.onnx.ml":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        stem = f"{PREPROCESSING_PREFIX}scaler{index}"
        offset = numpy_helper.from_array(np.asarray(attrs.get("offset", [0.0]), dtype=np.float32), f"{stem}/offset")
        scale = numpy_helper.from_array(np.asarray(attrs.get("scale", [1.0]), dtype=np.float32), f"{stem}/scale")
        graph.initializer.extend([offset, scale])
        source = node.input[0]
        if _elem_type(model, source) not in (None, 1):
            cast = f"{stem}/as_float"
            nodes.append(helper.make_node("Cast", [source], [cast], name=f"{stem}/cast", to=1))
            source = cast
        nodes.append(helper.make_node("Sub", [source, offset.name], [f"{stem}/centered"], name=f"{stem}/sub"))
        nodes.append(helper.make_node("Mul", [f"{stem}/centered", scale.name], [node.output[0]], name=f"{stem}/mul"))
    del graph.node[:]
    graph.node.extend(nodes)


def _elem_type(model: Any, tensor: str) -> int | None:
    for value in list(model.graph.input) + list(model.graph.value_info):
        if value.name == tensor:
            return value.type.tensor_type.elem_type
    return None


def _fuse_matmul_add(model: Any) -> None:
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    ranks = _ranks(shape_inference.infer_shapes(model))
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    fused: set[int] = set()
    nodes = []
    for node in graph.node:
        if id(node) in fused:
            continue
        gemm = _as_gemm(node, initializers, consumers, graph_outputs, ranks, numpy_helper, helper)
        if gemm is None:
            nodes.append(node)
            continue
        gemm_node, add_node, bias = gemm
        graph.initializer.append(bias)
        nodes.append(gemm_node)
        fused.add(id(add_node))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _as_gemm(node, initializers, consumers, graph_outputs, ranks, numpy_helper, helper):
    if node.op_type != "MatMul" or node.domain or node.input[1] not in initializers or ranks.get(node.input[0]) != 2:
        return None
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or node.output[0] in graph_outputs or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    weight = numpy_helper.to_array(initializers[node.input[1]])
    if other not in initializers or weight.ndim != 2:
        return None
    bias = numpy_helper.to_array(initializers[other])
    if bias.size != weight.shape[1] or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
        return None
    bias_tensor = numpy_helper.from_array(bias.reshape(-1).astype(np.float32), f"{other}/bias_1d")
    gemm = helper.make_node(
        "Gemm",
        [node.input[0], node.input[1], bias_tensor.name],
        [add.output[0]],
        name=(node.name or node.output[0]) + "/gemm",
    )
    return gemm, add, bias_tensor


def _ranks(inferred: Any) -> dict[str, int]:
    ranks = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            ranks[value.name] = len(tensor.shape.dim)
    return ranks
