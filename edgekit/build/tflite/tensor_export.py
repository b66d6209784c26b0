"""``edgekit convert --target tflite`` for tensor models (images, spectrograms, sensor windows).

The ONNX network becomes the NHWC graph (``onnx_ops``), written float32 and, with calibration
examples, full-integer int8 (``conv_writer``). A channels-first input the device is sent changes layout
(NCHW -> NHWC, NCW -> NWC), so the input schema written into the .tflite says so: its preprocessing then
makes NHWC tensors, and a data file of NCHW examples is transposed when read (``models.tensor_data``). A
channel-last input (a Keras graph's) stays as it is, and so does its schema.

Calibration runs the float .tflite itself with every intermediate tensor kept (LiteRT's
``experimental_preserve_all_tensors``, without the XNNPACK delegate, which would hide them): each
tensor's range is measured where it is computed, including the ones no ONNX value names (a
transpose, a padded input).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np

from edgekit.build.tflite.conv_writer import write_float, write_int8
from edgekit.build.tflite.graph import TO_NHWC, Graph
from edgekit.build.tflite.onnx_ops import graph_from_onnx
from edgekit.errors import require
from edgekit.models.loading import METADATA_INPUT, METADATA_QUANTIZATION

CALIBRATION_BATCH = 16


def nhwc_schema(schema: Any, graph: Graph) -> Any:
    """The input schema as the .tflite takes it: channel-last shape and layout, preprocessing unchanged. An input
    that was channel-last already (a Keras graph's) is recorded as it is."""
    spec = schema.tensor
    if not _transposed(graph):
        return schema
    shape = tuple(spec.shape[i] for i in TO_NHWC[len(spec.shape)])
    return replace(schema, tensor=replace(spec, shape=shape, layout=graph.input_layout))


def to_tflite_layout(X: np.ndarray, graph: Graph) -> np.ndarray:
    """Examples in the ONNX model's layout, in the .tflite's."""
    X = np.asarray(X, np.float32)
    return np.ascontiguousarray(X.transpose(TO_NHWC[X.ndim])) if _transposed(graph) else X


def _transposed(graph: Graph) -> bool:
    """Whether the .tflite takes its input channel-last where the ONNX model took it channels-first."""
    return bool(graph.input_layout) and graph.source_layout != graph.input_layout


def build_tensor(
    fp32_proto: Any,
    outputs: list[str],
    calibration: np.ndarray | None,
    labels: tuple[Any, ...] | None,
    metadata: dict[str, str],
    *,
    schema: Any,
    int8_quantization: dict[str, Any],
    source: str,
) -> tuple[bytes, bytes | None]:
    """The float32 .tflite and, with ``calibration`` examples (in the ONNX model's layout), the int8 one,
    computing ``outputs`` (the scores first; an embedding for drift may follow)."""
    graph = graph_from_onnx(fp32_proto, outputs, source=source, layout=schema.tensor.layout)
    metadata = {**metadata, METADATA_INPUT: json.dumps(nhwc_schema(schema, graph).to_dict())}
    float_data = write_float(graph, labels, {**metadata, METADATA_QUANTIZATION: json.dumps({"mode": "none"})})
    if calibration is None:
        return float_data, None
    ranges = calibrated_ranges(float_data, graph, to_tflite_layout(calibration, graph))
    int8_meta = {**metadata, METADATA_QUANTIZATION: json.dumps(int8_quantization)}
    return float_data, write_int8(graph, ranges, labels, int8_meta)


def calibrated_ranges(float_data: bytes, graph: Graph, X: np.ndarray) -> dict[str, tuple[float, float]]:
    """(min, max) of every tensor of the float model over the calibration examples ``X`` (its layout)."""
    interpreter_module = require("ai_edge_litert.interpreter", "tflite")
    resolver = interpreter_module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = interpreter_module.Interpreter(
        model_content=float_data, experimental_preserve_all_tensors=True, experimental_op_resolver_type=resolver
    )
    wanted = {d["name"]: d["index"] for d in interpreter.get_tensor_details() if d["name"] in graph.shapes}
    entry = interpreter.get_input_details()[0]["index"]
    ranges: dict[str, tuple[float, float]] = {}
    for start in range(0, len(X), CALIBRATION_BATCH):
        batch = X[start : start + CALIBRATION_BATCH]
        interpreter.resize_tensor_input(entry, list(batch.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(entry, batch)
        interpreter.invoke()
        for name, index in wanted.items():
            values = interpreter.get_tensor(index)
            low, high = float(values.min()), float(values.max())
            if name in ranges:
                low, high = min(low, ranges[name][0]), max(high, ranges[name][1])
            ranges[name] = (low, high)
    return ranges
