"""The baseline of a tensor model: its preprocessing, its labels, and the signals its profile sketches.

A table's baseline sketches its columns; an image model's sketches what ``TensorSignals`` reduces
each example to (per-channel value histograms and moments, brightness, contrast, saturation and
sharpness, or an audio clip's level and spectral centroid, and the projected embedding). Those
signals are fixed here, once, and written into the bundle, so every device reduces its traffic
with the same subsample positions and the same projection, and their windows merge.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from device_agent.errors import AgentError
from device_agent.outputs import CLASSIFICATION, Prediction
from device_agent.profile import Profile, build_baseline
from edgekit.errors import PackageError
from edgekit.models.tensor_data import with_preprocess

PREDICT_BATCH = 64
MAX_BASELINE_EXAMPLES = 5000


def prepared(model: Any, *, preprocess: str | None, labels: str | None) -> None:
    """``model`` with ``--preprocess`` and ``--labels`` applied (its class names from a labels file)."""
    if preprocess is not None:
        stored = model.input.preprocess
        model.input = with_preprocess(model.input, preprocess)
        if stored is not None and stored != model.input.preprocess:
            raise PackageError(
                "differs from the preprocessing the model was converted (and validated) with",
                "drop --preprocess to keep the model's own, or convert the model again with this file",
                path=preprocess,
            )
    if labels is None:
        return
    if model.input.tensor is None:
        raise PackageError(
            "--labels names the classes of a tensor model", "a scikit-learn model's classes are its own", path=labels
        )
    from device_agent.tensor_files import read_labels

    try:
        names = read_labels(labels)
    except AgentError as exc:
        raise PackageError(exc.problem, exc.fix, path=labels) from exc
    spec = model.output
    if spec.task != CLASSIFICATION or len(names) != len(spec.labels):
        raise PackageError(
            f"has {len(names)} labels but the model has {len(spec.labels) if spec.task == CLASSIFICATION else 'no'} "
            "classes",
            "give one label per line, one per class, in the order of the model's outputs",
            path=labels,
        )
    model.output = replace(spec, labels=tuple(names))


def tensor_baseline(model: Any, X: np.ndarray) -> Profile:
    """The baseline profile of ``X`` (a batch of the model's input) and of the model's answers on it;
    the signals it was reduced with go into ``model.input`` (and so into the manifest)."""
    from device_agent.tensor_signals import TensorSignals

    prediction = _predict_in_batches(model, X)
    embedding = prediction.embedding
    signals = TensorSignals(
        model.input.tensor,
        value_range=value_range(model.input),
        embedding_width=None if embedding is None else embedding.shape[1],
        mel_axis=getattr(model.input.preprocessor(), "mel_axis", None),
    )
    model.input = replace(model.input, signals=signals.to_dict())
    rows = np.concatenate(
        [
            signals.rows(X[i : i + PREDICT_BATCH], None if embedding is None else embedding[i : i + PREDICT_BATCH])
            for i in range(0, len(X), PREDICT_BATCH)
        ]
    )
    spec = model.output
    return build_baseline(
        rows,
        signals.names,
        per_row=signals.per_row,
        labels=list(spec.labels) if spec.task == CLASSIFICATION else None,
        predicted_labels=prediction.labels,
        probabilities=prediction.probabilities,
        predicted_values=prediction.values,
    )


def value_range(schema: Any) -> tuple[list[float], list[float]] | None:
    """What the darkest and brightest raw pixels become after the preprocessing, per channel (for the
    saturation signal: ImageNet's mean/std send 0 and 255 elsewhere in each channel); None for models
    without image preprocessing."""
    preprocess = schema.preprocessor()
    if preprocess is None or preprocess.kind != "image" or schema.tensor.spatial is None:
        return None
    height, width = schema.tensor.spatial
    channels = schema.tensor.channels
    shape = (height, width) if channels == 1 else (height, width, channels)
    dark = preprocess.from_array(np.zeros(shape, dtype=np.uint8))
    bright = preprocess.from_array(np.full(shape, 255, dtype=np.uint8))
    if schema.tensor.channel_axis is None:  # one gray channel with no C in the layout
        return [float(dark.min())], [float(bright.max())]
    others = tuple(a for a in range(dark.ndim) if a != schema.tensor.channel_axis - 1)  # axes of one example
    return dark.min(axis=others).tolist(), bright.max(axis=others).tolist()


def _predict_in_batches(model: Any, X: np.ndarray) -> Prediction:
    parts = [model.predict(X[i : i + PREDICT_BATCH]) for i in range(0, len(X), PREDICT_BATCH)]

    def join(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return Prediction(
        labels=join("labels"), probabilities=join("probabilities"), values=join("values"), embedding=join("embedding")
    )
