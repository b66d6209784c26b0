"""``edgekit convert --target tflite``: float32 or full int8 .tflite from a model, and the choice between them.

The float .tflite is the reference choice; the int8 one (with calibration data) is kept only when
it meets the accuracy/agreement limits and is not slower than the float one at batch 1 or 256,
through the same ``_choose`` as the ONNX search. Speeds are also reported against float32
onnxruntime on the same model, timed interleaved in this process.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edgekit.build.onnx_export import serialize
from edgekit.build.quant_search import Limits, SearchOutcome, Trial, _choose
from edgekit.build.quantize import QuantConfig
from edgekit.build.tflite.plan import Plan, equalize_first_layer, plan_from_onnx
from edgekit.build.tflite.writer import write_float, write_int8
from edgekit.models import compare
from edgekit.models.latency import batches_from, measure
from edgekit.models.loading import (
    METADATA_INPUT,
    METADATA_OUTPUT,
    METADATA_QUANTIZATION,
    METADATA_SOURCE,
    OnnxModel,
    TfliteModel,
)
from edgekit.models.tensor_data import in_layout
from edgekit.progress import NoProgress, Progress

FLOAT = "tflite float32"
INT8 = "tflite int8 (full integer, per-channel weights)"


class TfliteFullInteger(QuantConfig):
    """How the int8 .tflite is quantized, in the search's terms (its table and --json), not ONNX's QDQ."""

    @property
    def label(self) -> str:
        return INT8

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "static",
            "format": "tflite full integer",
            "per_channel": True,
            "activation_type": "int8",
            "weight_type": "int8",
            "label": INT8,
        }


INT8_CONFIG = TfliteFullInteger("static", per_channel=True, activation_type="int8")


def tflite_output(spec: Any) -> str:
    return spec.probabilities_output if spec.task == "classification" else spec.value_output


def build(fp32_proto: Any, *, calibration: np.ndarray | None, source: str) -> dict[str, bytes]:
    """The float32 .tflite and, with calibration rows, the int8 one, keyed by trial name."""
    reference = OnnxModel.from_bytes(serialize(fp32_proto), path=source)
    schema, spec = reference.input, reference.output
    if spec.task == "classification" and spec.probabilities_output is None:
        from edgekit.errors import ConversionError

        raise ConversionError("the classifier has no probability output to convert", "use --target onnx", path=source)
    tflite_spec = spec.to_dict()
    tensor = schema.tensor is not None and len(schema.tensor.shape) > 2
    if spec.task == "classification":
        # a tensor model's labels come from its scores, as for its ONNX file: a bundle's --labels then name them
        int_labels = not tensor and all(isinstance(c, int) and not isinstance(c, bool) for c in spec.labels)
        tflite_spec.update(label_output="label" if int_labels else None, probabilities_output=tflite_output(spec))
    meta = {p.key: p.value for p in fp32_proto.metadata_props}
    metadata = {
        METADATA_INPUT: json.dumps(schema.to_dict()),
        METADATA_OUTPUT: json.dumps(tflite_spec),
        METADATA_SOURCE: meta.get(METADATA_SOURCE, "onnx"),
    }
    labels = tuple(spec.labels) if spec.task == "classification" else None
    if tensor:  # tensor models: the NHWC graph writer
        return _build_tensor(fp32_proto, spec, calibration, None, metadata, schema, source)
    plan = plan_from_onnx(fp32_proto, tflite_output(spec), source=source)
    built = {
        FLOAT: write_float(
            plan, tflite_output(spec), labels, {**metadata, METADATA_QUANTIZATION: json.dumps({"mode": "none"})}
        )
    }
    if calibration is not None:
        built[INT8] = _best_int8(plan, tflite_output(spec), calibration, labels, metadata, source)
    return built


def _build_tensor(
    fp32_proto: Any,
    spec: Any,
    calibration: np.ndarray | None,
    labels: tuple[Any, ...] | None,
    metadata: dict[str, str],
    schema: Any,
    source: str,
) -> dict[str, bytes]:
    """A convolutional network's .tflite files (``tensor_export``: NHWC, float32 and full int8)."""
    from edgekit.build.tflite.tensor_export import build_tensor

    output = tflite_output(spec)
    embedding = getattr(spec, "embedding_output", None)  # drift's embedding, when the ONNX model exposes one
    float_data, int8_data = build_tensor(
        fp32_proto,
        [output, *([embedding] if embedding else [])],
        calibration,
        labels,
        metadata,
        schema=schema,
        int8_quantization={**INT8_CONFIG.to_dict(), "layout": "NHWC"},
        source=source,
    )
    return {FLOAT: float_data, **({INT8: int8_data} if int8_data is not None else {})}


def _best_int8(
    plan: Plan,
    output: str,
    calibration: np.ndarray,
    labels: tuple[Any, ...] | None,
    metadata: dict[str, str],
    source: str,
) -> bytes:
    """The int8 .tflite with and without input equalization; the one whose outputs stay closest to the float
    plan on the calibration rows (mean absolute error) is kept. The held-out rows play no part in this."""
    expected = plan.run(calibration)
    best, best_error = b"", np.inf
    for equalized in (False, True):
        candidate = equalize_first_layer(plan, calibration) if equalized else plan
        if candidate is None:
            continue
        quant = {**INT8_CONFIG.to_dict(), "input_equalization": equalized}
        data = write_int8(
            candidate, output, calibration, labels, {**metadata, METADATA_QUANTIZATION: json.dumps(quant)}
        )
        scores = TfliteModel.from_bytes(data, path=source).predict(calibration).scores
        error = float(np.mean(np.abs(scores.reshape(expected.shape) - expected)))
        if error < best_error:
            best, best_error = data, error
    return best


def choose(
    fp32_proto: Any,
    *,
    rows: np.ndarray,
    labels: np.ndarray | None,
    calibration: np.ndarray | None,
    limits: Limits,
    force: bool,
    source: str,
    progress: Progress = NoProgress(),
    prefer: str = "size",
) -> tuple[SearchOutcome, bytes, dict[str, Any]]:
    progress.start(3, "building .tflite")
    built = build(fp32_proto, calibration=calibration, source=source)
    progress.advance()
    onnx_fp32 = OnnxModel.from_bytes(serialize(fp32_proto), path=source)
    models = {name: TfliteModel.from_bytes(data, path=f"{source} ({name})") for name, data in built.items()}
    reference = onnx_fp32.predict(rows)
    # a tensor model's .tflite takes NHWC where the ONNX one took NCHW: each is fed its own layout
    tflite_spec = next(iter(models.values())).input.tensor
    tflite_rows = in_layout(rows, onnx_fp32.input.tensor, tflite_spec) if tflite_spec is not None else rows
    trials = _trials(models, built, tflite_rows, reference, labels)
    progress.advance()
    timing = measure(
        {"onnxruntime float32": _fed_as(onnx_fp32, tflite_spec), **{name: m.raw for name, m in models.items()}},
        batches_from(tflite_rows),
        budget_seconds=3.0,
    )
    progress.advance()
    progress.finish()
    base = trials[FLOAT]
    onnx_metric = compare.task_metric(onnx_fp32.output, reference, labels)
    for name, trial in trials.items():
        trial.latency = timing[name]
        trial.drop = compare.metric_drop(onnx_fp32.output, onnx_metric, trial.metric)
        trial.within = limits.holds(trial) if trial is not base else True
    outcome = _choose(
        base,
        [t for n, t in trials.items() if n != FLOAT],
        limits=limits,
        force=force,
        metric_name=compare.metric_name(onnx_fp32.output),
        prefer=prefer,
    )
    versus_onnx = {
        name: {str(b): timing["onnxruntime float32"][b]["p50_ms"] / timing[name][b]["p50_ms"] for b in timing[name]}
        for name in trials
    }
    return (
        outcome,
        outcome.chosen.proto,
        {
            "speedup_vs_onnxruntime_fp32": versus_onnx,
            "onnxruntime_fp32_latency": {str(b): v for b, v in timing["onnxruntime float32"].items()},
        },
    )


def _trials(
    models: dict[str, Any], built: dict[str, bytes], rows: np.ndarray, reference: Any, labels: np.ndarray | None
) -> dict[str, Trial]:
    """Each .tflite scored on ``rows``: its task metric, and its agreement with the ONNX model's ``reference``."""
    trials = {}
    for name, model in models.items():
        prediction = model.predict(rows)
        config = None if name == FLOAT else INT8_CONFIG
        trial = Trial(name, config, built[name], model.size_bytes)
        trial.metric = compare.task_metric(model.output, prediction, labels)
        trial.agreement = compare.agreement(model.output, reference, prediction)
        trials[name] = trial
    return trials


def _fed_as(onnx_model: Any, spec: Any) -> Any:
    """The ONNX model's call, taking batches in the .tflite's layout (transposed back: microseconds)."""
    if spec is None or onnx_model.input.tensor is None or spec.layout == onnx_model.input.tensor.layout:
        return onnx_model.raw
    return lambda X: onnx_model.raw(in_layout(X, spec, onnx_model.input.tensor))
