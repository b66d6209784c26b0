"""Writing the tensor fixtures' networks as ONNX with ``onnx.helper``, and measuring them with onnxruntime.

``GraphBuilder`` collects nodes and float32 initializers and makes a checked model: opset 17, IR
version 8 (what onnxruntime 1.16 and later read), one input whose batch dimension is the
``dim_param`` "N". ``sequential_to_onnx`` writes a trained ``numpy_cnn.Sequential`` one layer at a
time through ``EXPORTERS`` (layer class -> function); the input of the last Gemm is the tensor
"embedding" and the output is "probabilities", a Softmax over the classes. ``count_macs`` reads
the multiply-accumulates of Conv and Gemm nodes off the inferred shapes; ``run`` and
``latency_ms`` use one onnxruntime thread.

Imports: numpy, onnx and onnxruntime (the host extra), ``numpy_cnn``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import require
from edgekit.local import numpy_cnn as nn

OPSET = 17
IR_VERSION = 8
BATCH = "N"


class GraphBuilder:
    """Nodes in the order added; names are made unique by a counter."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        output = output or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{op}_{len(self.nodes)}", **attrs))
        return output

    def model(self, input_name: str, input_shape: tuple, outputs: dict[str, tuple], doc: str = "") -> Any:
        """The checked ``ModelProto``; ``None`` in a shape is the batch dimension."""
        onnx = require("onnx")
        from onnx import TensorProto, helper

        def info(name: str, shape: tuple) -> Any:
            dims = [BATCH if d is None else int(d) for d in shape]
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

        graph = helper.make_graph(
            self.nodes,
            self.name,
            [info(input_name, input_shape)],
            [info(name, shape) for name, shape in outputs.items()],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="edgekit-fixtures",
            ir_version=IR_VERSION,
            doc_string=doc,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def _conv2d(builder: GraphBuilder, layer: nn.Conv2d, x: str, out: str) -> str:
    w = builder.constant(f"{out}.weight", layer.params["W"])
    b = builder.constant(f"{out}.bias", layer.params["b"])
    ph, pw = layer.pad
    return builder.node("Conv", [x, w, b], out, kernel_shape=list(layer.kernel), pads=[ph, pw, ph, pw])


def _conv1d(builder: GraphBuilder, layer: nn.Conv1d, x: str, out: str) -> str:
    w = builder.constant(f"{out}.weight", layer.params["W"][:, :, 0, :])
    b = builder.constant(f"{out}.bias", layer.params["b"])
    pad = layer.pad[1]
    return builder.node("Conv", [x, w, b], out, kernel_shape=[layer.kernel[1]], pads=[pad, pad])


def _dense(builder: GraphBuilder, layer: nn.Dense, x: str, out: str) -> str:
    w = builder.constant(f"{out}.weight", layer.params["W"])
    b = builder.constant(f"{out}.bias", layer.params["b"])
    return builder.node("Gemm", [x, w, b], out)


def _global_avg_pool(builder: GraphBuilder, layer: nn.GlobalAvgPool, x: str, out: str) -> str:
    return builder.node("Flatten", [builder.node("GlobalAveragePool", [x])], out, axis=1)


def _affine(builder: GraphBuilder, layer: nn.Affine, x: str, out: str) -> str:
    scale = builder.constant(f"{out}.scale", np.asarray(layer.scale, np.float32))
    shift = builder.constant(f"{out}.shift", np.asarray(layer.shift, np.float32))
    return builder.node("Add", [builder.node("Mul", [x, scale]), shift], out)


EXPORTERS: dict[type, Callable[[GraphBuilder, Any, str, str], str]] = {
    nn.Conv1d: _conv1d,
    nn.Conv2d: _conv2d,
    nn.Dense: _dense,
    nn.Affine: _affine,
    nn.ReLU: lambda builder, layer, x, out: builder.node("Relu", [x], out),
    nn.MaxPool2: lambda builder, layer, x, out: builder.node("MaxPool", [x], out, kernel_shape=[2, 2], strides=[2, 2]),
    nn.GlobalAvgPool: _global_avg_pool,
    nn.Flatten: lambda builder, layer, x, out: builder.node("Flatten", [x], out, axis=1),
}


def sequential_to_onnx(net: nn.Sequential, input_shape: tuple, *, name: str, doc: str = "") -> Any:
    """``net`` as a model from "x" (``input_shape`` with ``None`` for the batch) to "probabilities"."""
    builder = GraphBuilder(name)
    last_dense = max(i for i, layer in enumerate(net.layers) if isinstance(layer, nn.Dense))
    x = "x"
    for i, layer in enumerate(net.layers):
        x = EXPORTERS[type(layer)](builder, layer, x, _output_name(layer, i, last_dense))
    classes = net.layers[last_dense].params["b"].size
    builder.node("Softmax", [x], "probabilities", axis=1)
    return builder.model("x", input_shape, {"probabilities": (None, classes)}, doc)


def _output_name(layer: nn.Layer, index: int, last_dense: int) -> str:
    if index == last_dense - 1:
        return "embedding"  # the input of the classifier: what a drift sketch projects
    return "logits" if index == last_dense else f"{type(layer).__name__.lower()}{index}"


def save(model: Any, path: Path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def session(model: str | Path | bytes) -> Any:
    """An onnxruntime session on one thread (the device's setting, and a fair latency) for a model
    file or its bytes."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: str | Path | bytes, X: np.ndarray, output: str = "probabilities", batch: int = 8) -> np.ndarray:
    """``output`` for ``X``, in small batches (faster on one thread than large ones: they stay in cache)."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    parts = [sess.run([output], {name: X[i : i + batch]})[0] for i in range(0, len(X), batch)]
    return np.concatenate(parts)


def latency_ms(path: str | Path, example: np.ndarray, *, runs: int = 200, warmup: int = 20) -> float:
    """The median batch-1 latency in milliseconds on one thread."""
    sess = session(path)
    feed = {sess.get_inputs()[0].name: example[np.newaxis]}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def count_macs(model: Any) -> int:
    """Multiply-accumulates of one example through the Conv and Gemm nodes (shapes inferred at batch 1)."""
    onnx = require("onnx")
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    }
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = shapes[node.input[1]]  # [out, in / group, *kernel]
            total += int(np.prod(shapes[node.output[0]])) * int(np.prod(weight[1:]))
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            weight = shapes[node.input[1]]
            total += int(np.prod(weight)) * (shapes[node.input[0]][0] if not attrs.get("transA") else 1)
    return total


def parameter_count(model: Any) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))
