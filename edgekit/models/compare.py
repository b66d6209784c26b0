"""How two models' answers on the same rows are compared: one definition for validate and the search.

Classifiers: accuracy, label agreement, and |Δ| of class probabilities.
Regressors: RMSE and MAE; agreement is the share of rows whose outputs differ by at most 1 % of
the reference outputs' standard deviation; |Δ| of the values.
``metric_drop`` is how much worse the candidate is: accuracy points as a fraction (0.01 is one
point) for classifiers, the relative increase of RMSE for regressors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from device_agent.outputs import CLASSIFICATION, OutputSpec, Prediction

REGRESSION_AGREEMENT_TOLERANCE = 0.01

# What the limits mean, in words shared by the flags' help, the reports and the README.
DROP_MEANING = {
    "accuracy": "accuracy points lost, as a fraction (0.01 = one point)",
    "rmse": "relative RMSE increase (0.01 = RMSE up 1 %)",
}
AGREEMENT_MEANING = {
    "classification": "share of rows given the same label",
    "regression": (
        f"share of rows whose outputs are within {REGRESSION_AGREEMENT_TOLERANCE:.0%} "
        "of the reference outputs' standard deviation"
    ),
}
DROP_HELP = "accuracy points as a fraction (0.01 = one point); for regressors, the relative RMSE increase (0.01 = 1 %)"
AGREEMENT_HELP = (
    f"same label for classifiers; for regressors, outputs within {REGRESSION_AGREEMENT_TOLERANCE:.0%} "
    "of the standard deviation of the reference's outputs"
)


def check_labels(spec: OutputSpec, y: np.ndarray | None, *, source: str) -> None:
    """Refuse labels that are not among the classifier's classes: they would silently score as wrong."""
    from edgekit.errors import DataError

    if y is None or spec.task != CLASSIFICATION or not spec.labels:
        return
    known = {str(label) for label in spec.labels}
    unknown = sorted({str(v) for v in np.asarray(y).ravel().tolist()} - known)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise DataError(
            f"has labels the model does not know: {shown} (its classes are {list(spec.labels)[:10]})",
            "check the label column (--label) and that the data belongs to this model",
            path=source,
        )


def metric_name(spec: OutputSpec) -> str:
    return "accuracy" if spec.task == CLASSIFICATION else "rmse"


def task_metric(spec: OutputSpec, prediction: Prediction, y: np.ndarray | None) -> float | None:
    if y is None:
        return None
    if spec.task == CLASSIFICATION:
        return float(np.mean(_labels_equal(prediction.labels, y)))
    values = prediction.values[:, 0] if prediction.values.shape[1] == 1 else prediction.values
    errors = values - np.asarray(y, dtype=np.float64).reshape(values.shape)
    return float(np.sqrt(np.mean(errors**2)))


def mae(prediction: Prediction, y: np.ndarray) -> float:
    values = prediction.values.reshape(len(y), -1)
    return float(np.mean(np.abs(values - np.asarray(y, dtype=np.float64).reshape(values.shape))))


def metric_drop(spec: OutputSpec, reference: float | None, candidate: float | None) -> float | None:
    if reference is None or candidate is None:
        return None
    if spec.task == CLASSIFICATION:
        return reference - candidate
    return (candidate - reference) / reference if reference > 0 else candidate - reference


def describe_drop(drop: float | None, metric: str = "accuracy") -> str:
    """``accuracy drop 0.50 points`` (``accuracy gain …`` when the candidate did better) or, for a
    regressor, ``RMSE increase 1.20 %``: a regressor has no accuracy, and its drop is relative."""
    if metric != "accuracy":
        if drop is None:
            return "RMSE change n/a"
        return f"RMSE {'decrease' if drop < 0 else 'increase'} {abs(drop) * 100:.2f} %"
    if drop is None:
        return "accuracy change n/a"
    return f"accuracy {'gain' if drop < 0 else 'drop'} {abs(drop) * 100:.2f} points"


def describe_drop_limit(limit: float, metric: str = "accuracy") -> str:
    """``accuracy drop ≤ 1.00 points`` or ``RMSE increase ≤ 1.00 %``."""
    if metric == "accuracy":
        return f"accuracy drop ≤ {limit * 100:.2f} points"
    return f"RMSE increase ≤ {limit * 100:.2f} %"


def agreement(spec: OutputSpec, reference: Prediction, candidate: Prediction) -> float:
    if spec.task == CLASSIFICATION:
        return float(np.mean(_labels_equal(reference.labels, candidate.labels)))
    scale = float(np.std(reference.values)) or 1.0
    close = np.all(np.abs(reference.values - candidate.values) <= REGRESSION_AGREEMENT_TOLERANCE * scale, axis=1)
    return float(np.mean(close))


def output_diff(reference: Prediction, candidate: Prediction) -> dict[str, float | None]:
    ref, cand = reference.scores, candidate.scores
    if ref is None or cand is None or np.shape(ref) != np.shape(cand):
        return {"max_abs_diff": None, "mean_abs_diff": None}
    diff = np.abs(np.asarray(ref, dtype=np.float64) - np.asarray(cand, dtype=np.float64))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


def _labels_equal(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.dtype.kind in "iuf" and b.dtype.kind in "iuf":
        return a == b
    return a.astype(str) == b.astype(str)
