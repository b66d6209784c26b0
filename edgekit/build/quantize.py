"""float32 -> int8 with ``onnxruntime.quantization`` (which replaced the dead onnxruntime-tools).

Dynamic quantization needs no data: weights are int8 and activations are quantized per batch at run
time. Static quantization (QDQ format) fixes activation ranges from calibration data (MinMax,
Entropy or Percentile), optionally per output channel. Both start from ``lower_for_quantization``,
which makes skl2onnx graphs visible to the quantizer and keeps their preprocessing in float.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.build.graph_passes import lower_for_quantization, preprocessing_nodes
from edgekit.build.onnx_export import copy_metadata
from edgekit.errors import NotQuantizableError, QuantizationError, require
from edgekit.models.targets import RuntimeTarget, pin

Progress = Callable[[int], None]  # called with the number of steps just finished

# Operators whose weights or arithmetic int8 changes; a graph without any has nothing to gain.
QUANTIZABLE_OPS = {
    "MatMul",
    "Gemm",
    "Conv",
    "ConvTranspose",
    "Attention",
    "LSTM",
    "GRU",
    "EmbedLayerNormalization",
    "Gather",
}
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "QGemm",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}
TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
CALIBRATION_BATCH = 64
MAX_CALIBRATION_ROWS = 2000


@dataclass(frozen=True)
class QuantConfig:
    """One way to quantize. ``exclude`` names nodes kept in float (besides the preprocessing)."""

    mode: str = "dynamic"  # dynamic | static
    per_channel: bool = False
    activation_type: str = "uint8"
    weight_type: str = "int8"
    calibration: str = "minmax"
    exclude: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise QuantizationError(f"unknown quantization mode {self.mode!r}", "use dynamic or static")
        if self.activation_type not in TYPES or self.weight_type not in TYPES:
            raise QuantizationError("activation and weight types must be int8 or uint8")
        if self.calibration not in CALIBRATION_METHODS:
            raise QuantizationError(
                f"unknown calibration method {self.calibration!r}", f"use one of {', '.join(CALIBRATION_METHODS)}"
            )

    @property
    def label(self) -> str:
        types = f"{'U' if self.activation_type == 'uint8' else 'S'}8/{'U' if self.weight_type == 'uint8' else 'S'}8"
        parts = [
            "dynamic" if self.mode == "dynamic" else "static QDQ",
            "per-channel" if self.per_channel else "per-tensor",
        ]
        if self.mode == "static":
            parts += [types, self.calibration]
        else:
            parts.append("S8 weights" if self.weight_type == "int8" else "U8 weights")
        if self.exclude:
            parts.append(f"{len(self.exclude)} node(s) in float")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        doc = {"mode": self.mode, "per_channel": self.per_channel, "weight_type": self.weight_type, "label": self.label}
        if self.mode == "static":
            doc.update(activation_type=self.activation_type, calibration=self.calibration, format="QDQ")
        if self.exclude:
            doc["float_nodes"] = list(self.exclude)
        return doc

    def excluding(self, nodes: tuple[str, ...]) -> QuantConfig:
        return replace(self, exclude=tuple(dict.fromkeys(self.exclude + nodes)))


def quantizable_ops(proto: Any) -> list[str]:
    return sorted({n.op_type for n in proto.graph.node if n.op_type in QUANTIZABLE_OPS and not n.domain})


def ensure_quantizable(proto: Any, *, source: str = "model") -> None:
    """Raise ``NotQuantizableError`` when the lowered graph has no operator int8 would change."""
    already = sorted({n.op_type for n in proto.graph.node} & QUANTIZED_OPS)
    if already:
        raise NotQuantizableError(
            f"is already quantized (it has {', '.join(already)})",
            "quantize the float32 model instead",
            path=source,
            operators=tuple(already),
        )
    lowered = lower_for_quantization(proto)
    ml_ops = sorted({n.op_type for n in lowered.graph.node if n.domain == "ai.onnx.ml"})
    trees = [op for op in ml_ops if op.startswith("TreeEnsemble")]
    # a forest behind a scaler has quantizable arithmetic, but int8 there would only blur the inputs
    # its thresholds compare: the trees decide whether int8 can help
    if quantizable_ops(lowered) and not trees:
        return
    reason = (
        f"its work is done by {', '.join(ml_ops)} (ai.onnx.ml operators), "
        "which onnxruntime.quantization does not quantize"
        if ml_ops
        else f"it has no operator onnxruntime.quantization quantizes ({', '.join(sorted(QUANTIZABLE_OPS)[:4])}, …)"
    )
    if trees:  # XGBoost, LightGBM, scikit-learn forests: say why int8 cannot help rather than that it is not done
        reason = (
            f"it is a tree ensemble ({', '.join(trees)}): it has no MatMul or Conv weights for int8 to shrink "
            "or speed up, and thresholds compared in int8 would send rows down other branches"
        )
    raise NotQuantizableError(
        f"cannot quantize to int8: {reason}",
        "keep it float32 (drop --quantize); tree ensembles and linear models are small and fast in float already",
        path=source,
        operators=tuple(ml_ops),
    )


def quantize(
    proto: Any,
    config: QuantConfig,
    *,
    calibration: np.ndarray | None = None,
    target: RuntimeTarget = RuntimeTarget(),
    progress: Progress | None = None,
    source: str = "model",
) -> Any:
    """The int8 version of ``proto`` under ``config``; static mode needs ``calibration`` rows."""
    ensure_quantizable(proto, source=source)
    if config.mode == "static" and calibration is None:
        raise QuantizationError(
            "static quantization needs calibration data",
            "pass --calibration with representative rows, or use dynamic quantization",
        )
    quantization = require("onnxruntime.quantization")
    onnx = require("onnx")
    lowered = lower_for_quantization(proto)
    exclude = preprocessing_nodes(lowered) + list(config.exclude)
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    with tempfile.TemporaryDirectory(prefix="edgekit-quant-") as tmp, _quiet_quantizer():
        source_path, output_path = Path(tmp, "float.onnx"), Path(tmp, "int8.onnx")
        onnx.save(lowered, source_path)
        try:
            _run_quantizer(
                quantization, config, lowered, source_path, output_path, exclude, extra, calibration, progress
            )
        except Exception as exc:  # the quantizer raises bare RuntimeError/AssertionError/ValueError
            raise QuantizationError(
                f"onnxruntime.quantization failed ({config.label}): {_first_line(exc)}",
                "try another configuration (--mode dynamic, --per-channel)",
                path=source,
            ) from exc
        result = onnx.load(output_path)
    if not any(n.op_type in QUANTIZED_OPS for n in result.graph.node):
        raise NotQuantizableError(
            f"onnxruntime.quantization left no operator quantized ({config.label})",
            "keep the model float32",
            path=source,
        )
    pin(result, target, source=source)
    copy_metadata(proto, result)
    return result


def _run_quantizer(
    quantization: Any,
    config: QuantConfig,
    lowered: Any,
    source_path: Path,
    output_path: Path,
    exclude: list[str],
    extra: dict[str, Any],
    calibration: np.ndarray | None,
    progress: Progress | None,
) -> None:
    """One call of onnxruntime.quantization for ``config``: dynamic, or static QDQ on the calibration rows."""
    if config.mode == "dynamic":
        quantization.quantize_dynamic(
            source_path,
            output_path,
            per_channel=config.per_channel,
            weight_type=getattr(quantization.QuantType, TYPES[config.weight_type]),
            nodes_to_exclude=exclude,
            extra_options=extra,
        )
        return
    reader = _CalibrationReader(lowered, calibration, progress)
    quantization.quantize_static(
        source_path,
        output_path,
        reader,
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=config.per_channel,
        activation_type=getattr(quantization.QuantType, TYPES[config.activation_type]),
        weight_type=getattr(quantization.QuantType, TYPES[config.weight_type]),
        calibrate_method=getattr(quantization.CalibrationMethod, CALIBRATION_METHODS[config.calibration]),
        nodes_to_exclude=exclude,
        extra_options=extra,
    )


class _CalibrationReader:
    """Feeds calibration rows to the quantizer in batches, reporting progress per batch."""

    def __init__(self, proto: Any, rows: np.ndarray, progress: Progress | None) -> None:
        rows = rows[:MAX_CALIBRATION_ROWS]
        # Equal batches: the histogram calibrators (entropy, percentile) stack per-batch outputs
        # and fail on a shorter last batch, so the remainder is dropped.
        if len(rows) > CALIBRATION_BATCH:
            rows = rows[: len(rows) // CALIBRATION_BATCH * CALIBRATION_BATCH]
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            model_feed(proto, rows[i : i + CALIBRATION_BATCH]) for i in range(0, len(rows), CALIBRATION_BATCH)
        )
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is not None and self._progress:
            self._progress(1)
        return batch

    def rewind(self) -> None:  # part of onnxruntime's CalibrationDataReader protocol; one pass is enough here
        pass


def model_feed(proto: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``rows`` as the model's inputs: its float32 matrix, or one array per typed column."""
    from edgekit.models.loading import describe_onnx

    schema = describe_onnx(proto)[0]
    if schema.columns is not None:
        return schema.feed(rows)
    return {proto.graph.input[0].name: np.ascontiguousarray(rows, dtype=np.float32)}


def calibration_steps(rows: int) -> int:
    return max(1, min(rows, MAX_CALIBRATION_ROWS) // CALIBRATION_BATCH)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs advice ('consider pre-processing') at WARNING on every call,
    and its histogram calibrators print() progress, which would corrupt ``--json`` on stdout."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
