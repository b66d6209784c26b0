"""Exposing a network's penultimate activation as an extra output, for embedding drift.

The class scores of an image model move late: a camera that slowly fogs up keeps predicting the
same classes, with the same confidence, long after the features the network computes have left
their training range. The activation feeding the final classifier layer sees that first. Exposing
it costs the runtime nothing but one more output; the agent reduces it to a few dimensions with a
fixed random projection (``device_agent.tensor_signals``) and sketches them like features.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from edgekit.errors import ConversionError, require

EMBEDDING_OUTPUT = "edgekit_embedding"
CLASSIFIER_OPS = ("Gemm", "MatMul")


def default_embedding_tensor(proto: Any) -> str | None:
    """The input of the last Gemm or MatMul in the graph (the classifier head), or None without one."""
    heads = [n for n in proto.graph.node if n.op_type in CLASSIFIER_OPS and not n.domain]
    return heads[-1].input[0] if heads else None


def expose_embedding(proto: Any, spec: Any, tensor: str | None = None, *, source: str = "model") -> tuple[Any, Any]:
    """``proto`` with ``tensor`` (a node name or a tensor name; default: the classifier head's input)
    added as the output ``edgekit_embedding``, and ``spec`` naming it. A tensor whose width cannot be
    told (no shape information) is refused: the projection is fixed at package time."""
    onnx = require("onnx")
    if any(o.name == EMBEDDING_OUTPUT for o in proto.graph.output):  # converted before: exposed already
        return proto, replace(spec, embedding_output=EMBEDDING_OUTPUT)
    name = _tensor_named(proto, tensor, source) if tensor else default_embedding_tensor(proto)
    if name is None:
        raise ConversionError(
            "has no Gemm or MatMul whose input could be the embedding", "name one with --embedding NODE", path=source
        )
    width = _width(proto, name)
    if width is None:
        raise ConversionError(
            f"the width of tensor {name!r} cannot be inferred", "name a tensor of shape [N, width]", path=source
        )
    identity = onnx.helper.make_node("Identity", [name], [EMBEDDING_OUTPUT], name="edgekit_embedding_out")
    proto.graph.node.append(identity)
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(EMBEDDING_OUTPUT, onnx.TensorProto.FLOAT, [None, width])
    )
    return proto, replace(spec, embedding_output=EMBEDDING_OUTPUT)


def embedding_width(proto: Any) -> int | None:
    for output in proto.graph.output:
        if output.name == EMBEDDING_OUTPUT:
            dims = output.type.tensor_type.shape.dim
            return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    return None


def _tensor_named(proto: Any, name: str, source: str) -> str:
    """A tensor name, or the first output of the node so named."""
    for node in proto.graph.node:
        if name in node.output:
            return name
        if node.name == name:
            return node.output[0]
    known = [n.name for n in proto.graph.node if n.name][-5:]
    raise ConversionError(
        f"has no node or tensor named {name!r}",
        f"name one of the graph's nodes (the last ones: {', '.join(known) or 'unnamed'})",
        path=source,
    )


def _width(proto: Any, name: str) -> int | None:
    """The last dimension of ``name``, from shape inference; a 4-D [N, C, 1, 1] counts as C."""
    onnx = require("onnx")
    inferred = onnx.shape_inference.infer_shapes(proto)
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        if value.name == name:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            if len(dims) >= 2 and all(d == 1 for d in dims[2:]) and dims[1]:
                return dims[1]
            return dims[-1] if dims and dims[-1] else None
    return None
