"""What one loaded model is while it serves, and what a prediction answers.

Apart from the agent so that the HTTP routes, the metrics and the updater can name these types
without importing the agent (which imports them back).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import Bundle
from .monitor import Monitor
from .outputs import Prediction
from .runtimes import Runtime

LATENCY_BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
# a tensor model runs this many examples a call: onnxruntime's arena keeps the largest batch's activations
# (600 images of a 96x96 network took it past 2 GB), and 32 is already past where batching pays
TENSOR_RUN_CHUNK = 32
RESPONSE_CHUNK_ROWS = 4096  # rows of an answer turned into JSON at a time
# rows of a table a call: the arena keeps a batch's activations too (a 60,000-row request would leave tens of
# MB behind in it); past a few thousand rows a larger call is no faster
MATRIX_RUN_CHUNK = 4096


@dataclass
class PredictResult:
    boot: str
    first: int
    prediction: Prediction
    model_version: int
    labels: tuple[Any, ...]

    @property
    def ids(self) -> list[str]:
        return [f"{self.boot}-{self.first + i}" for i in range(len(self.prediction.primary))]

    def answers(self) -> list[Any]:
        p = self.prediction
        if p.labels is not None:
            return p.labels.tolist()
        return [v[0] if len(v) == 1 else v for v in p.values.tolist()]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"predictions": self.answers(), "ids": self.ids, "model_version": self.model_version}
        if self.prediction.probabilities is not None:
            # widened first: a float32 rounded to 6 decimals still reaches JSON as 0.12345699965953827
            doc["probabilities"] = np.round(self.prediction.probabilities.astype(np.float64), 6).tolist()
            doc["labels"] = list(self.labels)
        return doc

    def json_body(self) -> bytes:
        """``json.dumps(self.to_json())`` as bytes, written ``RESPONSE_CHUNK_ROWS`` rows at a time: the answer
        to a 60,000-row request would otherwise be 600,000 Python floats (30 MB) at once."""
        rows = len(self.prediction.primary)
        if rows <= RESPONSE_CHUNK_ROWS:
            return json.dumps(self.to_json(), default=str).encode()
        parts: dict[str, list[str]] = {}
        for start in range(0, rows, RESPONSE_CHUNK_ROWS):
            part = self._slice(start, start + RESPONSE_CHUNK_ROWS).to_json()
            for key, value in part.items():
                if isinstance(value, list) and key != "labels":
                    parts.setdefault(key, []).append(json.dumps(value, default=str)[1:-1])
        first = self._slice(0, 1).to_json()  # the keys in their order, and the fields that are not per row
        fields = [
            f"{json.dumps(key)}: [{', '.join(p for p in parts[key] if p)}]"
            if key in parts
            else f"{json.dumps(key)}: {json.dumps(value, default=str)}"
            for key, value in first.items()
        ]
        return ("{" + ", ".join(fields) + "}").encode()

    def _slice(self, start: int, stop: int) -> PredictResult:
        p = self.prediction

        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[start:stop]

        sliced = Prediction(cut(p.labels), cut(p.probabilities), cut(p.values), cut(p.embedding))
        return PredictResult(self.boot, self.first + start, sliced, self.model_version, self.labels)


@dataclass
class Serving:
    """One loaded model and everything tied to it. The agent swaps the whole object in one
    assignment, so a request sees either the old model or the new one, never a mix."""

    bundle: Bundle
    runtime: Runtime
    monitor: Monitor | None = None

    def __post_init__(self) -> None:
        self.schema, self.spec, self.baseline = (
            self.bundle.input_schema,
            self.bundle.output_spec,
            self.bundle.baseline(),
        )
        self.model_info = {"name": self.bundle.name, "version": self.bundle.version}
        # a matrix model's rows go straight to the runtime's bound call when it has one (``matrix_runner``)
        runner = getattr(self.runtime, "matrix_runner", None)
        matrix = self.schema.columns is None and self.schema.tensor is None
        self._run_matrix = runner() if matrix and runner is not None else None
        # one item per request answering on this model now (``Agent.predict``): a swapped-out model's last
        # window waits for them. A deque's append and pop are atomic: no lock on the request path
        self.running: deque = deque()

    def run(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """The runtime's raw outputs for checked rows; a tensor batch in chunks of ``TENSOR_RUN_CHUNK``."""
        chunk = MATRIX_RUN_CHUNK if self.schema.tensor is None else TENSOR_RUN_CHUNK
        if len(X) <= chunk:
            if self._run_matrix is not None:
                return self._run_matrix(X)
            return self.runtime.predict(self.schema.feed(X))
        parts = [self.runtime.predict(self.schema.feed(X[i : i + chunk])) for i in range(0, len(X), chunk)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
