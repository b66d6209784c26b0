"""The map from what a device sketches of a model's answers to how good those answers are, made at package time.

A device never sees labels in time, but it does sketch each prediction's top-class confidence (the
baseline profile's ``confidence`` output, on ``CONFIDENCE_CUTS`` bins) and, for a regressor, the
predicted value (``prediction``, on the baseline's quantile bins). ``edgekit package --eval`` runs the
converted model on labelled data and stores, per slot of that sketch, the model's expected accuracy
(or a regressor's expected absolute error) in the baseline profile (``Profile.calibration``). The
collector then estimates each window's accuracy from its histogram alone: the sum over slots of
count times value, divided by the rows (confidence-based performance estimation, NannyML's CBPE).

Within a slot, a classifier's value is the mean, over the eval rows in that slot, of the isotonic fit
of "correct" on confidence (pool adjacent violators: accuracy never falls as confidence rises): the
accuracy a row of that slot has when the slot holds the eval data's mix of confidences. It is pulled
towards the slot's mean eval confidence by ``PRIOR_ROWS`` pseudo-rows, so a slot the eval data barely
reaches trusts the model's own confidence rather than two or three rows; a slot it never reaches takes
its midpoint. Earlier maps (``method`` "isotonic") read the fit at the slot's mean confidence instead:
one point of a step function, which moved with the step nearest to it (on 1,000 eval rows of a calibrated synthetic
model, 1.4 points of error on windows like the eval data against 0.7 now; the fixtures of
``scripts/bench_cbpe.py`` cannot tell the two apart). That bench also measured, and did not adopt,
finer bins cut at the eval confidence's quantiles, a fit per predicted class, Platt scaling and ATC:
see docs/bundle.md for what each gives and why the error that is left is not the map's.

A regressor's value is the mean absolute error of the eval rows predicted into that slot, pulled
towards the overall MAE the same way. Imports: ``device_agent`` (the sketches), numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.outputs import CLASSIFICATION
from device_agent.profile import NumericSketch, Profile
from edgekit.bundle.tensor_baseline import MAX_BASELINE_EXAMPLES
from edgekit.errors import PackageError
from edgekit.models.compare import check_labels
from edgekit.models.data import load_dataset

CALIBRATION_SCHEMA = "edgekit.calibration/1"
PRIOR_ROWS = 5.0  # pseudo-rows at the model's own confidence (or the overall MAE) in every slot
MIN_EVAL_ROWS = 20  # fewer labelled rows than this give no map, and package says so
METHODS = {  # how ``classifier_map`` reads a slot's value, and how its map says so
    "isotonic": "mean of the isotonic fit over the slot's eval rows",
    "isotonic at mean": "isotonic at the slot's mean eval confidence",
    "binned": "the slot's eval accuracy",
}


@dataclass(frozen=True)
class LabelledRows:
    """Eval rows as the model takes them, their labels (as the model names its classes), and the files' sha256."""

    X: np.ndarray
    y: np.ndarray
    data_sha256: tuple[str, ...]


def calibration_of(model: Any, profile: Profile, rows: LabelledRows, *, identity: dict[str, Any]) -> dict[str, Any]:
    """The map of ``model`` (the converted file, run as the device runs it) measured on labelled ``rows``;
    ``identity`` (the bundle's name and version) is recorded so a collector never applies it to windows of
    another version that happens to share the baseline's bins."""
    X, y = rows.X, rows.y
    if len(y) < MIN_EVAL_ROWS:
        raise PackageError(
            f"--eval has {len(y)} labelled rows; the calibration needs at least {MIN_EVAL_ROWS}",
            "give more held-out labelled data (a few hundred rows measure within a point or two)",
        )
    prediction = _predict(model, X)
    if model.output.task == CLASSIFICATION:
        if prediction.probabilities is None or "confidence" not in profile.outputs:
            raise PackageError(
                "--eval needs a classifier that outputs probabilities (its confidence is what devices sketch)",
                "convert the model with its probabilities (skl2onnx's zipmap=False keeps them), or leave --eval out",
                path=model.path,
            )
        confidence = np.max(np.asarray(prediction.probabilities, dtype=np.float64), axis=1)
        doc = calibrate(profile, confidence=confidence, correct=_correct(prediction.labels, y))
    else:
        values = np.asarray(prediction.values, dtype=np.float64)
        if values.ndim == 2 and values.shape[1] != 1:
            raise PackageError(
                f"--eval estimates one target's error; this regressor has {values.shape[1]}",
                "leave --eval out for a multi-target regressor",
                path=model.path,
            )
        doc = calibrate(profile, predicted=values.ravel(), actual=np.asarray(y, dtype=np.float64).ravel())
    return {**doc, "model": dict(identity), "data_sha256": list(rows.data_sha256)}


def labelled_rows(model: Any, paths: Sequence[str], label: str | None) -> LabelledRows:
    """The labelled rows of every ``--eval`` file, read as the baseline is, checked against the model's classes."""
    parts, labels, digests = [], [], []
    for path in paths:
        data = load_dataset(
            path, label=label, columns=model.input.columns, schema=model.input, limit=MAX_BASELINE_EXAMPLES
        )
        data = data.aligned_to(model.input.feature_names)
        y = data.require_labels("--eval (the accuracy a device's confidence stands for)")
        check_labels(model.output, y, source=str(path))
        parts.append(model.input.check(data.X, source=str(path)))
        labels.append(np.asarray(y).ravel())
        digests.append(data.sha256)
    return LabelledRows(np.concatenate(parts), np.concatenate(labels), tuple(digests))


def _predict(model: Any, X: np.ndarray) -> Any:
    """The model's answers in batches (a tensor model's eval set may be thousands of images)."""
    if model.input.tensor is None:
        return model.predict(X)
    parts = [model.predict(X[i : i + 256]) for i in range(0, len(X), 256)]
    joined = {
        key: np.concatenate([getattr(p, key) for p in parts])
        for key in ("labels", "probabilities", "values")
        if getattr(parts[0], key) is not None
    }
    return type(parts[0])(**joined)


def _correct(predicted: Any, actual: Any) -> np.ndarray:
    """1.0 where the predicted label is the true one: numbers compared as numbers, anything else as text."""
    a, b = np.asarray(predicted).ravel(), np.asarray(actual).ravel()
    same = a == b if a.dtype.kind in "iuf" and b.dtype.kind in "iuf" else a.astype(str) == b.astype(str)
    return same.astype(np.float64)


def calibrate(profile: Profile, *, confidence: Any = None, correct: Any = None, **regression: Any) -> dict[str, Any]:
    """The map for ``profile``'s model: a classifier gives ``confidence`` (top-class probability per eval
    row) and ``correct`` (0/1); a regressor gives ``predicted`` and ``actual`` (in ``regression``)."""
    if confidence is not None:
        return classifier_map(profile.outputs["confidence"], confidence, correct)
    return regressor_map(profile.outputs["prediction"], regression["predicted"], regression["actual"])


def classifier_map(
    sketch: NumericSketch, confidence: Any, correct: Any, *, prior_rows: float = PRIOR_ROWS, method: str = "isotonic"
) -> dict[str, Any]:
    """Expected accuracy per slot of the ``confidence`` sketch. ``method`` "isotonic at mean" reads the fit at
    the slot's mean eval confidence (the earlier maps), "binned" takes each slot's raw eval
    accuracy (both with the same prior): the bench compares them."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    slots = slot_of(sketch, confidence)
    size = len(sketch.counts)
    rows = np.bincount(slots, minlength=size).astype(np.float64)
    mean_conf = np.divide(np.bincount(slots, confidence, size), rows, out=_midpoints(sketch), where=rows > 0)
    if method == "isotonic at mean":
        observed = np.interp(mean_conf, *isotonic(confidence, correct))
    else:
        fitted = correct if method == "binned" else _fitted(confidence, correct)
        observed = np.divide(np.bincount(slots, fitted, size), rows, out=mean_conf.copy(), where=rows > 0)
    weight = rows + prior_rows  # a slot with no eval rows (and no prior) keeps its midpoint
    values = np.divide(rows * observed + prior_rows * mean_conf, weight, out=mean_conf.copy(), where=weight > 0)
    described = f"{METHODS[method]}, prior {prior_rows:g} rows at the slot's mean eval confidence"
    return _document("accuracy", "confidence", values, rows, float(correct.mean()), described)


def regressor_map(
    sketch: NumericSketch, predicted: Any, actual: Any, *, prior_rows: float = PRIOR_ROWS
) -> dict[str, Any]:
    """Expected absolute error per slot of the ``prediction`` sketch (the predicted value's bins)."""
    predicted = np.asarray(predicted, dtype=np.float64).ravel()
    error = np.abs(predicted - np.asarray(actual, dtype=np.float64).ravel())
    slots = slot_of(sketch, predicted)
    rows = np.bincount(slots, minlength=len(sketch.counts)).astype(np.float64)
    overall = float(error.mean())
    weight = rows + prior_rows
    sums = np.bincount(slots, error, len(rows)) + prior_rows * overall
    values = np.divide(sums, weight, out=np.full(len(rows), overall), where=weight > 0)
    method = f"mean absolute error of the slot's eval rows, prior {prior_rows:g} rows at the overall MAE"
    return _document("mae", "prediction", values, rows, overall, method)


def _document(
    metric: str, output: str, values: np.ndarray, rows: np.ndarray, observed: float, method: str
) -> dict[str, Any]:
    """``expected`` is the map read on the eval data's own histogram: what a window like the eval data
    estimates, the level the ``estimated_accuracy_drop`` alert measures a fall from."""
    expected = float(rows @ values / rows.sum())
    return {
        "schema": CALIBRATION_SCHEMA,
        "metric": metric,
        "output": output,
        "values": [round(float(v), 6) for v in values],
        "expected": round(expected, 6),
        "observed": round(observed, 6),
        "rows": int(rows.sum()),
        "method": method,
    }


def slot_of(sketch: NumericSketch, values: np.ndarray) -> np.ndarray:
    """The slot of ``sketch.counts`` each finite value falls in, as ``NumericSketch.update`` counts it
    (NaN and inf, which a sketch counts apart, go to the nearest end slot; eval rows rarely have any)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    index = np.searchsorted(sketch.cuts, values, side="right") + 1
    if sketch.low is not None:
        index[values < sketch.low] = 0
    if sketch.high is not None:
        index[values > sketch.high] = len(sketch.counts) - 1
    return np.clip(index, 0, len(sketch.counts) - 1)


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators), as knots
    ``(x, fitted)`` sorted by x for ``np.interp`` (flat beyond the ends)."""
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    means: list[float] = []
    weights: list[float] = []
    for value in y.tolist():
        means.append(value)
        weights.append(1.0)
        while len(means) > 1 and means[-2] > means[-1]:
            weight = weights[-2] + weights[-1]
            means[-2:] = [(means[-2] * weights[-2] + means[-1] * weights[-1]) / weight]
            weights[-2:] = [weight]
    return x, np.repeat(means, np.asarray(weights, dtype=np.intp))


def _fitted(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The isotonic fit's value at each row, in the rows' own order (tied confidences keep the values the fit
    gave them, which a lookup by confidence could not tell apart)."""
    fitted = np.empty_like(y)
    fitted[np.argsort(x, kind="stable")] = isotonic(x, y)[1]
    return fitted


def _midpoints(sketch: NumericSketch) -> np.ndarray:
    """Each slot's middle (its edge for the under- and overflow slots): the prior of a slot with no eval rows."""
    edges = np.concatenate([[sketch.low], sketch.cuts, [sketch.high]]).astype(np.float64)
    middles = (edges[:-1] + edges[1:]) / 2
    return np.concatenate([[edges[0]], middles, [edges[-1]]])
