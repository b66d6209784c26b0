"""What a model's output tensors mean, and turning them into labels, probabilities or values.

The host decides this once when it packages a model (``output`` in the manifest); the device and
the host's validator read raw outputs through the same ``OutputSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import SchemaError

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(frozen=True)
class Prediction:
    """Labels and probabilities for classifiers; values (rows × targets) for regressors."""

    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    values: np.ndarray | None = None
    embedding: np.ndarray | None = None  # rows × width: the penultimate activation, when the model exposes it

    @property
    def primary(self) -> np.ndarray:
        return self.labels if self.labels is not None else self.values  # type: ignore[return-value]

    @property
    def scores(self) -> np.ndarray:
        """The continuous output to compare between models: probabilities, else values."""
        return self.probabilities if self.probabilities is not None else self.values  # type: ignore[return-value]


@dataclass(frozen=True)
class OutputSpec:
    task: str
    labels: tuple[Any, ...] = ()
    label_output: str | None = None
    probabilities_output: str | None = None
    value_output: str | None = None
    # a classifier whose probabilities are shares of votes (a forest): exact ties go to the first class
    ties_to_first: bool = False
    # the output holding the penultimate activation of a tensor model, sketched for drift (never answered)
    embedding_output: str | None = None
    # the probabilities output holds class scores (a network exported without its softmax): softmax them
    logits: bool = False

    def __post_init__(self) -> None:
        if self.task not in (CLASSIFICATION, REGRESSION):
            raise SchemaError(f"unknown task {self.task!r}", f"the task is {CLASSIFICATION!r} or {REGRESSION!r}")

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"task": self.task}
        if self.task == CLASSIFICATION:
            doc.update(
                labels=list(self.labels), label_output=self.label_output, probabilities_output=self.probabilities_output
            )
            if self.ties_to_first:  # written only when set: a spec without it reads as it always did
                doc["ties_to_first"] = True
        else:
            doc.update(value_output=self.value_output)
        if self.embedding_output:
            doc["embedding_output"] = self.embedding_output
        if self.logits:
            doc["logits"] = True
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> OutputSpec:
        return cls(
            task=doc["task"],
            labels=tuple(doc.get("labels", ())),
            label_output=doc.get("label_output"),
            probabilities_output=doc.get("probabilities_output"),
            value_output=doc.get("value_output"),
            ties_to_first=bool(doc.get("ties_to_first", False)),
            embedding_output=doc.get("embedding_output"),
            logits=bool(doc.get("logits", False)),
        )

    def interpret(self, raw: dict[str, np.ndarray]) -> Prediction:
        prediction = self._interpret(raw)
        if self.embedding_output is None:
            return prediction
        embedding = raw[self.embedding_output]
        return replace(prediction, embedding=embedding.reshape(len(embedding), -1))

    def _interpret(self, raw: dict[str, np.ndarray]) -> Prediction:
        if self.task == REGRESSION:
            values = np.asarray(raw[self.value_output], dtype=np.float64)  # type: ignore[index]
            return Prediction(values=values.reshape(values.shape[0], -1))
        probabilities = None
        if self.probabilities_output is not None:
            probabilities = raw[self.probabilities_output]
            if probabilities.ndim != 2:
                probabilities = probabilities.reshape(len(probabilities), -1)
            if self.logits:
                probabilities = softmax(probabilities)
        if self.label_output is not None:
            labels = raw[self.label_output].ravel()
            if self.ties_to_first and probabilities is not None and len(self.labels) == probabilities.shape[1] > 1:
                labels = _ties_to_the_first_class(labels, probabilities, self.labels)
        else:
            # A bare scores tensor: the label is the class with the highest score.
            labels = (
                np.asarray(self.labels, dtype=object)[np.argmax(probabilities, axis=1)]
                if self.labels
                else np.argmax(probabilities, axis=1)
            )
            if self.labels and all(isinstance(c, int) for c in self.labels):
                labels = labels.astype(np.int64)
        return Prediction(labels=labels, probabilities=probabilities)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


TIE = 1e-6  # classes whose probabilities differ by less are tied (float32 sums of votes differ by ~1e-7)


def _ties_to_the_first_class(labels: np.ndarray, probabilities: np.ndarray, classes: tuple[Any, ...]) -> np.ndarray:
    """Labels with ties given to the first of the tied classes, as scikit-learn's ``argmax`` does.

    A forest's probability is a share of votes, so two classes often tie exactly (15 of 30 trees);
    onnxruntime sums the votes in float32 and can give the tie to either class. Only tied rows change."""
    if probabilities.shape[1] == 2:  # the common case, in one numpy call: are the two classes tied anywhere?
        if not (np.abs(probabilities[:, 0] - probabilities[:, 1]) <= TIE).any():
            return labels
    near = probabilities >= probabilities.max(axis=1, keepdims=True) - TIE
    tied = near.sum(axis=1) > 1
    if not tied.any():
        return labels
    labels = labels.copy()
    labels[tied] = np.asarray(classes, dtype=labels.dtype if labels.dtype != object else object)[
        near[tied].argmax(axis=1)
    ]
    return labels
