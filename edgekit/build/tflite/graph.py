"""A tensor network (ONNX, NCHW) as a small graph of TFLite operators in NHWC, for ``conv_writer``.

Why a graph of its own: ONNX computes images as NCHW, LiteRT's kernels and XNNPACK want NHWC, and a
converter that wrapped every operator in transposes would spend more time moving data than computing.
So each value remembers how it is held (``Value.layout``):

- ``plain``: as ONNX holds it;
- ``nhwc``: an NCHW (or NCW) value held channel-last as ``[N, H, W, C]`` (NCW as ``[N, 1, W, C]``,
  so a 1-D convolution is a CONV_2D with H = 1);
- ``rows``: a flattened ``nhwc`` value, ``[N, H*W*C]`` in channel-last order; the dense layer that
  reads it takes its weight columns in that order (``Value.order``) instead of a TRANSPOSE.

Operators ask for the layout they need (``Builder.nhwc``, ``Builder.plain``) and a TRANSPOSE is
emitted only where the layouts really differ, so the transposes end up at the edges: the input is
taken NHWC (recorded in the bundle's input schema) and a classifier's output is plain anyway.
Constants are folded here (batch normalization into the convolution before it, Clip(0, 6) into
RELU6, an activation into the operator before it by ``fuse_activations``). The ONNX operators
themselves are translated in ``onnx_ops``; imports: numpy, onnx, edgekit.errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import ConversionError

FUSABLE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "SUB"}
ACTIVATIONS = {"RELU", "RELU6", "RELU_N1_TO_1"}  # FULLY_CONNECTED refuses a fused TANH in LiteRT 2.x
TO_NHWC = {4: (0, 2, 3, 1), 3: (0, 2, 1)}
TO_NCHW = {4: (0, 3, 1, 2), 3: (0, 2, 1)}


@dataclass
class Op:
    """One TFLite operator: ``kind`` is its builtin name; inputs name tensors or constants."""

    kind: str
    inputs: list[str]
    output: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Value:
    """An ONNX value as the graph holds it: which tensor, in which layout (see the module docstring)."""

    tensor: str
    layout: str  # plain | nhwc | rows
    onnx_shape: tuple[int, ...]  # batch as 1
    order: np.ndarray | None = None  # rows: tensor[:, j] = onnx[:, order[j]]


@dataclass
class Graph:
    """The converted network: ``shapes`` of every tensor (batch as 1), constants, ops in order."""

    input: str
    input_layout: str  # the layout the device is sent: NHWC, NWC, or the ONNX input's own when not channels-first
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    source_layout: str = ""  # the ONNX input's layout (NCHW, NCW, NHWC, NWC, or "" for other ranks)

    def consumers(self, tensor: str) -> list[Op]:
        return [op for op in self.ops if tensor in op.inputs]

    def producer(self, tensor: str) -> Op | None:
        return next((op for op in self.ops if op.output == tensor), None)


class Builder:
    """What the ONNX operator translations (``onnx_ops``) write into: values by ONNX name, the graph,
    and the layout conversions they ask for, each emitted once."""

    def __init__(self, graph: Graph, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        self.graph = graph
        self.onnx_shapes = shapes
        self.values: dict[str, Value] = {}
        self.constants: dict[str, np.ndarray] = {}  # ONNX constants, as ONNX holds them
        self.uses: dict[str, list[Any]] = {}  # ONNX value -> the ONNX nodes that read it
        self.source = source
        self.opset = 13  # the model's ai.onnx opset (graph_from_onnx reads it): Softmax changed meaning at 13
        self._converted: dict[tuple[str, str], str] = {}

    # -- tensors and ops ---------------------------------------------------------------------------------

    def tensor(self, name: str, shape: tuple[int, ...]) -> str:
        base, index = name, 1
        while name in self.graph.shapes or name in self.graph.constants:
            name, index = f"{base}_{index}", index + 1
        self.graph.shapes[name] = tuple(int(d) for d in shape)
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        base, index = name, 1
        while name in self.graph.shapes or name in self.graph.constants:
            name, index = f"{base}_{index}", index + 1
        self.graph.constants[name] = np.asarray(array)
        return name

    def emit(self, kind: str, inputs: list[str], name: str, shape: tuple[int, ...], **options: Any) -> str:
        out = self.tensor(name, shape)
        self.graph.ops.append(Op(kind, inputs, out, options))
        return out

    def refuse(self, node: Any, why: str) -> ConversionError:
        name = node.name or next((o for o in node.output if o), "")  # an optional first output (LSTM's Y) is ""
        return ConversionError(
            f"{node.op_type} node {name!r}: {why}",
            "use --target onnx (the TFLite target converts MobileNet/ResNet-style image, audio and sensor networks)",
            path=self.source,
        )

    # -- layouts -----------------------------------------------------------------------------------------

    def shape_of(self, tensor: str) -> tuple[int, ...]:
        return self.graph.shapes[tensor]

    def nhwc(self, name: str) -> str:
        """The tensor holding ONNX value ``name`` channel-last (``[N, H, W, C]``; NCW as ``[N, 1, W, C]``)."""
        value = self.values[name]
        if value.layout == "nhwc":
            return value.tensor
        if value.layout != "plain" or len(value.onnx_shape) not in TO_NHWC:
            raise ConversionError(f"{name!r} cannot be held channel-last", "use --target onnx", path=self.source)
        key = (value.tensor, "nhwc")
        if key not in self._converted:
            rank = len(value.onnx_shape)
            shape = tuple(value.onnx_shape[i] for i in TO_NHWC[rank])
            out = self._transpose(value.tensor, TO_NHWC[rank], shape)
            if rank == 3:
                out = self._reshape(out, (1, 1, *shape[1:]))
            self._converted[key] = out
        return self._converted[key]

    def plain(self, name: str) -> str:
        """The tensor holding ONNX value ``name`` as ONNX holds it."""
        value = self.values[name]
        if value.layout == "plain":
            return value.tensor
        if value.layout == "rows":
            raise ConversionError(f"{name!r} is held in another order here", "use --target onnx", path=self.source)
        key = (value.tensor, "plain")
        if key not in self._converted:
            rank, tensor = len(value.onnx_shape), value.tensor
            if rank == 3:
                n, _, w, c = self.shape_of(tensor)
                tensor = self._reshape(tensor, (n, w, c))
            self._converted[key] = self._transpose(tensor, TO_NCHW[rank], value.onnx_shape)
        return self._converted[key]

    def _transpose(self, tensor: str, perm: tuple[int, ...], shape: tuple[int, ...]) -> str:
        perm_name = self.constant(f"{tensor}/perm", np.asarray(perm, np.int32))
        return self.emit("TRANSPOSE", [tensor, perm_name], f"{tensor}/transposed", shape)

    def _reshape(self, tensor: str, shape: tuple[int, ...]) -> str:
        target = self.constant(f"{tensor}/shape", np.asarray([-1, *shape[1:]], np.int32))
        return self.emit("RESHAPE", [tensor, target], f"{tensor}/reshaped", shape, new_shape=[-1, *shape[1:]])

    def reshape(self, tensor: str, shape: tuple[int, ...]) -> str:
        return self._reshape(tensor, shape)

    def layout_constant(self, array: np.ndarray, value: Value) -> np.ndarray:
        """A constant that broadcasts against ONNX value ``value``, made to broadcast against its tensor."""
        array = np.asarray(array, np.float32)
        if value.layout == "plain" or array.ndim == 0 or array.size == 1:
            return array.reshape(()) if array.size == 1 and value.layout != "plain" else array
        if value.layout == "rows":
            return np.broadcast_to(array, (1, len(value.order)))[:, value.order] if array.ndim == 2 else array
        rank = len(value.onnx_shape)
        full = array.reshape((1,) * (rank - array.ndim) + array.shape).transpose(TO_NHWC[rank])
        return full[:, np.newaxis] if rank == 3 else full


def fuse_activations(graph: Graph) -> None:
    """RELU, RELU6 and RELU_N1_TO_1 into the convolution, dense layer or ADD/MUL/SUB before them, when
    nothing else reads that operator's output: LiteRT then clamps in the same pass (and int8 keeps one
    rounding instead of two)."""
    for op in list(graph.ops):
        if op.kind not in ACTIVATIONS or op not in graph.ops:
            continue
        producer = graph.producer(op.inputs[0])
        if (
            producer is None
            or producer.kind not in FUSABLE
            or producer.options.get("activation")
            or producer.output in graph.outputs
            or len(graph.consumers(producer.output)) != 1
        ):
            continue
        del graph.shapes[producer.output]
        producer.output = op.output
        producer.options["activation"] = op.kind
        graph.ops.remove(op)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """The (before, after) padding TFLite's SAME uses on one axis."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2
