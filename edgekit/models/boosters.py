"""XGBoost and LightGBM models in their own file formats, run by their own library.

A booster file (XGBoost's ``save_model`` .json or .ubj, LightGBM's ``save_model`` .txt) is what
``edgekit validate`` compares a conversion with, so it is run by the library that trained it, never
by a re-implementation: ``BoosterModel`` has the interface ``SklearnModel`` has (``input``,
``output``, ``predict``, ``timed_call``, ``size_bytes``, ``sha256``).

What each library decides, the schema records:

- classifier or regressor, from the objective (``binary:logistic``, ``multiclass``, ...); an
  objective whose meaning ONNX cannot carry (ranking, raw margins) is refused here, once;
- feature names from the booster, placeholders (f0, f1, ...) when it was trained on a bare array;
- NaN is allowed: both route a missing value down each split's default branch;
- the input dtype is the library's own precision: XGBoost rounds every input to float32, so
  float32 rows are exactly what it computes on; LightGBM compares float64 inputs with float64
  thresholds, so its rows are float64 (the conversion keeps its thresholds in float64 too).

Loading a booster file runs no code from it (unlike a pickle).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.outputs import CLASSIFICATION, REGRESSION, OutputSpec, Prediction
from device_agent.schema import InputSchema
from device_agent.tabular import placeholder_names
from edgekit.errors import ModelLoadError, require

BOOST_EXTRA = "boost"
XGBOOST_SUFFIXES = (".json", ".ubj")
LIGHTGBM_SUFFIXES = (".txt", ".model")

# Objectives whose conversion was measured exact (tests/test_boosters.py); the first word for LightGBM.
XGBOOST_CLASSIFIERS = ("binary:logistic", "multi:softprob")
XGBOOST_REGRESSORS = (
    "reg:squarederror",
    "reg:absoluteerror",
    "reg:pseudohubererror",
    "count:poisson",
    "reg:gamma",
    "reg:tweedie",
)
LIGHTGBM_CLASSIFIERS = ("binary", "multiclass")
LIGHTGBM_REGRESSORS = ("regression", "regression_l1", "huber", "quantile", "poisson", "gamma", "tweedie")


def sniff(path: Path) -> str | None:
    """``"xgboost"`` or ``"lightgbm"`` when the file holds one of their saved models, else None.

    The content decides, not the suffix alone: an XGBoost model is JSON (or UBJSON) whose first key
    is ``learner``; a LightGBM text model starts with the line ``tree``."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head.startswith((b"tree\n", b"tree\r\n")):
        return "lightgbm"
    if head[:1] == b"{" and b"learner" in head[:64]:
        return "xgboost"
    return None


@dataclass
class BoosterModel:
    """A booster loaded from its file; ``library`` is ``xgboost`` or ``lightgbm``."""

    path: str
    booster: Any
    library: str
    objective: str
    input: InputSchema
    output: OutputSpec
    threads: int = 1

    @property
    def kind(self) -> str:
        return self.library

    @classmethod
    def from_file(cls, path: Path, *, threads: int = 1) -> BoosterModel:
        library = sniff(path)
        if library == "xgboost":
            return _load_xgboost(path, threads)
        if library == "lightgbm":
            return _load_lightgbm(path, threads)
        raise ModelLoadError(
            "is not an XGBoost or LightGBM model file",
            "save the booster with booster.save_model('model.json') (XGBoost) or ('model.txt') (LightGBM)",
            path=path,
        )

    @property
    def size_bytes(self) -> int:
        return Path(self.path).stat().st_size

    @property
    def sha256(self) -> str:
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()

    @property
    def description(self) -> str:
        """What the model is, for the converted model's ``edgekit.source``."""
        return f"{self.library} Booster ({self.objective})"

    def scores(self, X: np.ndarray) -> np.ndarray:
        """The library's own answer: probabilities (binary: of class 1) or values."""
        X = np.ascontiguousarray(X, dtype=np.dtype(self.input.dtype))
        if self.library == "xgboost":
            return np.asarray(self.booster.inplace_predict(X))
        return np.asarray(self.booster.predict(X, num_threads=self.threads))

    def predict(self, X: np.ndarray) -> Prediction:
        scores = np.asarray(self.scores(X), dtype=np.float64)
        if self.output.task == REGRESSION:
            return Prediction(values=scores.reshape(scores.shape[0], -1))
        probabilities = np.column_stack([1.0 - scores, scores]) if scores.ndim == 1 else scores
        # argmax keeps the first class on a tie, as XGBClassifier and LGBMClassifier do (p > 0.5 for binary)
        labels = np.asarray(self.output.labels, dtype=np.int64)[np.argmax(probabilities, axis=1)]
        return Prediction(labels=labels, probabilities=probabilities)

    def timed_call(self, X: np.ndarray) -> object:
        """The one call that answers a request (probabilities carry the label), for latency."""
        return self.scores(X)


def _load_xgboost(path: Path, threads: int) -> BoosterModel:
    xgboost = require("xgboost", BOOST_EXTRA)
    booster = xgboost.Booster()
    try:
        booster.load_model(bytearray(path.read_bytes()))  # bytes: JSON or UBJSON whatever the suffix
    except xgboost.core.XGBoostError as exc:
        raise ModelLoadError(
            f"is not a readable XGBoost model ({_first_line(exc)})",
            "save it with booster.save_model('model.json') from the xgboost that trained it",
            path=path,
        ) from exc
    booster.set_param({"nthread": threads})
    learner = json.loads(booster.save_config())["learner"]
    _refuse(xgboost_unsupported(learner), path)
    objective = learner["objective"]["name"]
    classes = int(learner["learner_model_param"].get("num_class", "0"))
    task = _task(objective, XGBOOST_CLASSIFIERS, XGBOOST_REGRESSORS, "xgboost", path)
    width = booster.num_features()
    names = tuple(booster.feature_names) if booster.feature_names else placeholder_names(width)
    schema = InputSchema(input_name="X", feature_names=names, dtype="float32", allow_nan=True)
    return BoosterModel(str(path), booster, "xgboost", objective, schema, _output_spec(task, classes), threads)


def _load_lightgbm(path: Path, threads: int) -> BoosterModel:
    lightgbm = require("lightgbm", BOOST_EXTRA)
    data = path.read_bytes()
    if not _lightgbm_complete(data):
        raise ModelLoadError(
            "is not a complete LightGBM model (its trees do not end where its tree_sizes line says)",
            "save it again with booster.save_model('model.txt'); the file may have been cut short",
            path=path,
        )
    text = data.decode("utf-8", errors="replace")
    _refuse(lightgbm_unsupported(text), path)
    objective, task = _lightgbm_objective(text, path)
    try:
        booster = lightgbm.Booster(model_str=text)
    except lightgbm.basic.LightGBMError as exc:
        raise ModelLoadError(
            f"is not a readable LightGBM model ({_first_line(exc)})",
            "save it with booster.save_model('model.txt') from the lightgbm that trained it",
            path=path,
        ) from exc
    width = booster.num_feature()
    names = tuple(booster.feature_name())
    if names == tuple(f"Column_{i}" for i in range(width)):  # LightGBM's own placeholders
        names = placeholder_names(width)
    schema = InputSchema(input_name="X", feature_names=names, dtype="float64", allow_nan=True)
    classes = booster.num_model_per_iteration() if task == CLASSIFICATION else 0
    spec = _output_spec(task, classes)
    return BoosterModel(str(path), booster, "lightgbm", objective, schema, spec, threads)


def xgboost_unsupported(learner: dict[str, Any]) -> str | None:
    """Why onnxmltools cannot convert this XGBoost model (its ``save_config()["learner"]``), or None."""
    kind = learner.get("gradient_booster", {}).get("name", "gbtree")
    if kind != "gbtree":  # dart weighs its trees, gblinear has none: onnxmltools fails on both
        return f"is an XGBoost {kind} model; edgekit converts tree boosters (booster='gbtree')"
    return None


def lightgbm_unsupported(text: str) -> str | None:
    """Why onnxmltools would convert this LightGBM model (its text) wrongly, or None.

    Each was measured against LightGBM on breast cancer: a random forest's averaging moved
    probabilities by 0.43, dropped linear leaf models by 0.61, zeros-as-missing by 0.28."""
    if "\naverage_output\n" in text:
        return "is a LightGBM random forest (boosting='rf'), whose averaging onnxmltools does not reproduce"
    if "\nis_linear=1" in text:
        return "has linear trees (linear_tree=True), whose leaf models onnxmltools drops"
    for line in text.splitlines():
        # decision_type bits 2-3 are the missing-value type; 1 is "zero": zeros take the default branch
        if line.startswith("decision_type=") and any((int(v) >> 2) & 3 == 1 for v in line[14:].split()):
            return "treats zeros as missing (zero_as_missing=True), which ONNX's tree operators cannot express"
    return None


def _refuse(reason: str | None, path: Path) -> None:
    if reason is not None:
        raise ModelLoadError(reason, "retrain without that option", path=path)


def _lightgbm_complete(data: bytes) -> bool:
    """Whether every tree is where the ``tree_sizes`` header line says, followed by ``end of trees``.

    LightGBM (4.7) trusts those sizes: given a truncated file it reads past the end of its buffer and
    aborts the whole process, so the file is checked here first."""
    start = data.find(b"\nTree=0") + 1
    sizes = next((line[11:] for line in data[:start].splitlines() if line.startswith(b"tree_sizes=")), None)
    if not start or sizes is None:
        return False
    offset = start
    for size in sizes.split():
        if data[offset : offset + 5] != b"Tree=" or not size.isdigit():
            return False
        offset += int(size)
    return data[offset:].startswith(b"end of trees")


def _lightgbm_objective(text: str, path: Path) -> tuple[str, str]:
    """The objective's name and task, from the ``objective=`` line before the first tree; its options
    (``binary sigmoid:2``, ``regression sqrt``) change the output in ways onnxmltools does not convert."""
    line = next((line for line in text.splitlines() if line.startswith(("objective=", "Tree="))), "")
    name, *options = line.partition("=")[2].split(" ") if line.startswith("objective=") else [""]
    task = _task(name, LIGHTGBM_CLASSIFIERS, LIGHTGBM_REGRESSORS, "lightgbm", path)
    unsupported = [
        o for o in options if o == "sqrt" or (o.startswith("sigmoid:") and o not in ("sigmoid:1", "sigmoid:1.0"))
    ]
    if unsupported:
        raise ModelLoadError(
            f"has objective {name!r} with {', '.join(unsupported)}, which onnxmltools does not convert",
            "train without reg_sqrt and with the default sigmoid=1.0",
            path=path,
        )
    return name, task


def _task(objective: str, classifiers: tuple[str, ...], regressors: tuple[str, ...], library: str, path: Path) -> str:
    if objective in classifiers:
        return CLASSIFICATION
    if objective in regressors:
        return REGRESSION
    raise ModelLoadError(
        f"has {library} objective {objective!r}, which edgekit does not convert",
        f"train with one of {', '.join(classifiers + regressors)}",
        path=path,
    )


def _output_spec(task: str, classes: int) -> OutputSpec:
    if task == REGRESSION:
        return OutputSpec(REGRESSION, value_output="variable")
    labels = tuple(range(max(classes, 2)))  # binary: XGBoost says 0 classes, LightGBM 1 tree per round
    return OutputSpec(CLASSIFICATION, labels=labels, label_output="label", probabilities_output="probabilities")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
