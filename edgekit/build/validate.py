"""``edgekit validate``: does the candidate (int8, converted) still do the reference's job?

Both models answer the same rows; the report gives the task metric of each, label agreement,
|Δ| of probabilities or values, file sizes and latency (p50/p99 at batch 1 and 256, interleaved in
one process with one thread). Thresholds turn it into a verdict; when one fails and the candidate
is a QDQ model, the per-layer error shows where int8 hurt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.build.layer_error import is_qdq, layer_errors
from edgekit.build.onnx_export import to_onnx
from edgekit.errors import DataError, EdgekitError
from edgekit.models import compare
from edgekit.models.data import default_feature_names, load_dataset
from edgekit.models.latency import batches_from, measure
from edgekit.models.loading import OnnxModel, load_model
from edgekit.models.tensor_data import in_layout

LATENCY_METHOD = "interleaved in one process, 1 intra-op thread (numpy/BLAS limited to 1 thread too)"


@dataclass(frozen=True)
class Thresholds:
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    max_size_ratio: float | None = None


def validate(
    candidate_path: str,
    *,
    reference_path: str,
    data_path: str,
    label: str | None = None,
    thresholds: Thresholds = Thresholds(),
    latency_budget: float = 2.0,
) -> dict[str, Any]:
    reference = load_model(reference_path)
    candidate = load_model(candidate_path)
    _check_compatible(reference, candidate)
    dataset = load_dataset(
        data_path,
        label=label,
        columns=candidate.input.columns or reference.input.columns,
        schema=candidate.input if candidate.input.tensor is not None else reference.input,
    )
    dataset = dataset.aligned_to(_known_names(candidate, reference))
    X = candidate.input.check(dataset.X, source=data_path)
    y = dataset.y
    if thresholds.max_accuracy_drop is not None:
        y = dataset.require_labels("--max-accuracy-drop")
    spec = reference.output
    compare.check_labels(spec, y, source=data_path)
    ref_X = _for_reference(X, candidate, reference)  # an NHWC .tflite of an NCHW ONNX model: each its own layout
    ref_pred, cand_pred = reference.predict(ref_X), candidate.predict(X)
    ref_metric, cand_metric = compare.task_metric(spec, ref_pred, y), compare.task_metric(spec, cand_pred, y)
    report: dict[str, Any] = {
        "task": spec.task,
        "metric": compare.metric_name(spec),
        "rows": int(X.shape[0]),
        "labelled": y is not None,
        "reference": _side(reference, ref_metric, ref_pred, y),
        "candidate": _side(candidate, cand_metric, cand_pred, y),
        "size_ratio": candidate.size_bytes / reference.size_bytes,
        "size_ratio_of": Path(
            reference.path
        ).name,  # candidate bytes / the reference's: often a pickle, not float32 ONNX
        "accuracy_drop": compare.metric_drop(spec, ref_metric, cand_metric),
        "accuracy_drop_meaning": compare.DROP_MEANING[compare.metric_name(spec)],
        "agreement": compare.agreement(spec, ref_pred, cand_pred),
        "agreement_meaning": compare.AGREEMENT_MEANING[spec.task],
        **compare.output_diff(ref_pred, cand_pred),
        "thresholds": asdict(thresholds),
    }
    timings = measure(
        {"reference": _reference_call(reference, candidate), "candidate": candidate.timed_call},
        batches_from(X),
        budget_seconds=latency_budget,
    )
    report["latency"] = {side: {str(b): v for b, v in per.items()} for side, per in timings.items()}
    report["latency"]["method"] = LATENCY_METHOD
    report["speedup"] = {
        str(b): timings["reference"][b]["p50_ms"] / timings["candidate"][b]["p50_ms"] for b in timings["candidate"]
    }
    report["failures"] = _failures(report, thresholds)
    report["passed"] = not report["failures"]
    report["layer_errors"] = _layer_errors(reference, candidate, X) if report["failures"] else None
    return report


def _for_reference(X: np.ndarray, candidate: Any, reference: Any) -> np.ndarray:
    if candidate.input.tensor is None or reference.input.tensor is None:
        return X
    return in_layout(X, candidate.input.tensor, reference.input.tensor)


def _reference_call(reference: Any, candidate: Any) -> Any:
    """The reference's timed call on the candidate's batches, transposed to its own layout when they differ."""
    if _same_layout(candidate, reference):
        return reference.timed_call
    return lambda rows: reference.timed_call(_for_reference(rows, candidate, reference))


def _same_layout(candidate: Any, reference: Any) -> bool:
    tensors = candidate.input.tensor, reference.input.tensor
    return None in tensors or tensors[0].layout == tensors[1].layout


def _check_compatible(reference: Any, candidate: Any) -> None:
    if reference.input.width != candidate.input.width:
        raise DataError(
            f"the reference takes {reference.input.width} features and the candidate {candidate.input.width}",
            "compare a model with its own conversion",
        )
    if reference.output.task != candidate.output.task:
        raise DataError(
            f"the reference is a {reference.output.task} model and the candidate a {candidate.output.task} model",
            "compare a model with its own conversion",
        )


def _known_names(*models: Any) -> tuple[str, ...]:
    """The first model's feature names that are real names rather than the f0… placeholders."""
    for model in models:
        if model.input.feature_names != default_feature_names(model.input.width):
            return model.input.feature_names
    return models[0].input.feature_names


def _side(model: Any, metric: float | None, prediction: Any, y: np.ndarray | None) -> dict[str, Any]:
    side = {
        "path": model.path,
        "kind": model.kind,
        "size_bytes": model.size_bytes,
        "sha256": model.sha256,
        "metric": metric,
    }
    if model.output.task == "regression" and y is not None:
        side["mae"] = compare.mae(prediction, y)
    return side


def _failures(report: dict[str, Any], thresholds: Thresholds) -> list[dict[str, Any]]:
    """Each threshold that does not hold, with a message in the task's own terms (a regressor has no accuracy)."""
    metric = report["metric"]
    checks = [
        (
            "accuracy_drop",
            thresholds.max_accuracy_drop,
            lambda v, limit: v <= limit,
            lambda v, limit: (
                f"{compare.describe_drop(v, metric)} is over --max-accuracy-drop {limit} "
                f"({compare.describe_drop_limit(limit, metric)})"
            ),
        ),
        (
            "agreement",
            thresholds.min_agreement,
            lambda v, limit: v >= limit,
            lambda v, limit: f"agreement {v:.4f} is under --min-agreement {limit} ({report['agreement_meaning']})",
        ),
        (
            "size_ratio",
            thresholds.max_size_ratio,
            lambda v, limit: v <= limit,
            lambda v, limit: f"size {v:.3f}x of {report['size_ratio_of']} is over --max-size-ratio {limit}",
        ),
    ]
    failures = []
    for name, limit, holds, message in checks:
        value = report[name]
        if limit is not None and value is not None and not holds(value, limit):
            failures.append({"check": name, "value": value, "limit": limit, "message": message(value, limit)})
    return failures


def _layer_errors(reference: Any, candidate: Any, X: np.ndarray) -> list[dict[str, Any]] | None:
    if not isinstance(candidate, OnnxModel) or not is_qdq(candidate.proto()):
        return None
    float_proto = reference.proto() if isinstance(reference, OnnxModel) else to_onnx(reference)
    try:
        return layer_errors(float_proto, candidate.proto(), X)[:10]
    except (EdgekitError, KeyError, ValueError, RuntimeError):
        # Models of different lineage share no tensor names; the report then simply has none.
        return []
