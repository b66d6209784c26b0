"""Where int8 hurts: per-tensor error between a float model and its QDQ-quantized version.

Runs both models with every intermediate tensor exposed (onnxruntime's ``qdq_loss_debug``) and
reports, for each activation the QDQ model quantizes, the signal-to-quantization-noise ratio in dB
against the float model's own tensor. Low SQNR marks the layers to keep in float.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.build.graph_passes import lower_for_quantization
from edgekit.build.quantize import _quiet_quantizer, model_feed
from edgekit.errors import require

MAX_ROWS = 256


def is_qdq(proto: Any) -> bool:
    ops = {n.op_type for n in proto.graph.node}
    return "QuantizeLinear" in ops and "DequantizeLinear" in ops


def layer_errors(float_proto: Any, qdq_proto: Any, rows: np.ndarray) -> list[dict[str, Any]]:
    """Activations of ``qdq_proto`` sorted worst first: tensor, producing node, op type, SQNR (dB)."""
    debug = require("onnxruntime.quantization.qdq_loss_debug")
    onnx = require("onnx")
    float_proto = lower_for_quantization(float_proto)  # the QDQ model was built from the lowered graph
    feed = model_feed(float_proto, rows[:MAX_ROWS])
    with tempfile.TemporaryDirectory(prefix="edgekit-layers-") as tmp, _quiet_quantizer():
        activations = {}
        for label, proto in (("float", float_proto), ("qdq", qdq_proto)):
            source, augmented = Path(tmp, f"{label}.onnx"), Path(tmp, f"{label}.aug.onnx")
            onnx.save(proto, source)
            debug.modify_model_output_intermediate_tensors(source, augmented)
            activations[label] = debug.collect_activations(str(augmented), _OneBatch(feed))
        matched = debug.create_activation_matching(activations["qdq"], activations["float"])
        errors = debug.compute_activation_error(matched)
    producers = {out: node for node in float_proto.graph.node for out in node.output}
    report = []
    for tensor, error in errors.items():
        if "xmodel_err" not in error or tensor not in producers:
            continue
        node = producers[tensor]
        source = _quantized_source(node, producers)
        report.append(
            {
                "tensor": tensor,
                "node": node.name,
                "op": node.op_type,
                "sqnr_db": _finite(error["xmodel_err"]),
                "source_node": source.name if source is not None else None,
            }
        )
    return sorted(report, key=lambda r: r["sqnr_db"])


def _quantized_source(node: Any, producers: dict[str, Any], hops: int = 4) -> Any:
    """The nearest node upstream (or this one) whose arithmetic int8 changes.

    QDQ fuses Gemm + Relu, so a Gemm's error is observed at the Relu after it; keeping the Relu in
    float would change nothing, keeping the Gemm does.
    """
    from edgekit.build.quantize import QUANTIZABLE_OPS

    for _ in range(hops):
        if node.op_type in QUANTIZABLE_OPS:
            return node
        if not node.input or node.input[0] not in producers:
            return None
        node = producers[node.input[0]]
    return None


def worst_nodes(report: list[dict[str, Any]], count: int) -> tuple[str, ...]:
    """The ``count`` quantized nodes whose outputs show the lowest SQNR."""
    names = [r["source_node"] for r in report if r.get("source_node")]
    return tuple(dict.fromkeys(names))[:count]


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 999.0


class _OneBatch:
    """The calibration-reader protocol collect_activations iterates over: here, a single batch."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self._batches = iter([feed])

    def get_next(self):
        return next(self._batches, None)

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch
