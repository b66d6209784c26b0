"""Tabular data files: ``.npz`` (``X``, optional ``y``, optional ``feature_names``) and ``.csv`` with a header.

Everything that reads rows for a model (calibration, evaluation, validation, baselines) comes
through ``load_dataset``, and through ``Dataset.aligned_to`` when the model's feature names are known,
so a CSV with its columns in another order is reordered and one with missing columns is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.tabular import TableError, column_order, placeholder_names, read_table
from edgekit.errors import DataError

if TYPE_CHECKING:
    from device_agent.columns import Column
    from device_agent.schema import InputSchema


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray
    y: np.ndarray | None
    feature_names: tuple[str, ...] | None  # None when the file carries no names (an .npz without them)
    source: str
    sha256: str

    @property
    def rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def width(self) -> int:
        return int(self.X.shape[1])

    def names_or_default(self) -> tuple[str, ...]:
        return self.feature_names or default_feature_names(self.width)

    def require_labels(self, why: str) -> np.ndarray:
        if self.y is None:
            raise DataError(
                f"has no labels, which {why} needs",
                "give an .npz with 'y' or a CSV with a label column (--label NAME)",
                path=self.source,
            )
        return self.y

    def aligned_to(self, feature_names: Sequence[str] | None, width: int | None = None) -> Dataset:
        """This data with columns in the model's order, or a ``DataError`` naming what does not match."""
        if self.X.ndim > 2:  # tensors: checked against the model's shape when read
            return self
        if feature_names is not None:
            try:
                order = column_order(feature_names, self.feature_names)
            except TableError as exc:
                raise DataError(exc.problem, exc.fix, path=self.source) from exc
            if order is not None:
                return Dataset(self.X[:, order], self.y, tuple(feature_names), self.source, self.sha256)
        expected = len(feature_names) if feature_names is not None else width
        if expected is not None and self.width != expected:
            raise DataError(
                f"has {self.width} feature columns, the model takes {expected}",
                "give data with the model's features (and name the label column with --label)",
                path=self.source,
            )
        return self

    def sample(self, rows: int, seed: int = 0) -> Dataset:
        if self.rows <= rows:
            return self
        index = np.sort(np.random.default_rng(seed).choice(self.rows, rows, replace=False))
        return Dataset(
            self.X[index], None if self.y is None else self.y[index], self.feature_names, self.source, self.sha256
        )


default_feature_names = placeholder_names


def _is_default(names: Sequence[str]) -> bool:
    return tuple(names) == default_feature_names(len(names))


def load_dataset(
    path: str | Path,
    *,
    label: str | None = None,
    columns: Sequence[Column] | None = None,
    schema: InputSchema | None = None,
    limit: int | None = None,
    progress: Any = None,
) -> Dataset:
    """The rows of a data file; ``columns`` (a model's typed columns) say how to read each cell. For a
    tensor model (``schema``), the examples of an .npz, or of a folder of images, WAVs or .npy files
    read through the model's preprocessing (``tensor_data``), at most ``limit`` of them."""
    if schema is not None and schema.tensor is not None:
        from edgekit.models.tensor_data import load_tensor_dataset

        X, y, digest = load_tensor_dataset(path, schema, limit=limit, progress=progress)
        return Dataset(X, y, (schema.tensor.name,), str(path), digest)
    path = Path(path)
    if path.is_dir():
        raise DataError(
            "is a folder; a model of rows and columns reads one data file", "give an .npz, .csv or .parquet", path=path
        )
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "is not a file", "check the path", path=path)
    raw = path.read_bytes()
    try:
        X, y, names = read_table(path, label, raw, columns=columns)
    except TableError as exc:
        raise DataError(exc.problem, exc.fix, path=path) from exc
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(
            f"X has shape {X.shape}; expected rows × features with at least one of each",
            "save a 2-D array as X",
            path=path,
        )
    if y is not None and len(y) != len(X):
        raise DataError(f"has {len(X)} rows but {len(y)} labels", "give one label per row", path=path)
    return Dataset(X, y, names, str(path), hashlib.sha256(raw).hexdigest())


def adopt_feature_names(schema: InputSchema, dataset: Dataset | None) -> InputSchema:
    """The model's schema, named after the data's columns when the model itself knows no names.

    A Pipeline fitted on a bare array has no ``feature_names_in_``; the CSV header (or the .npz's
    ``feature_names``) is then the best record of what each column means, and it goes into the
    ONNX metadata and the bundle so devices report drift per named feature.
    """
    from dataclasses import replace

    if (
        schema.tensor is not None
        or dataset is None
        or dataset.feature_names is None
        or not _is_default(schema.feature_names)
        or dataset.width != schema.width
    ):
        return schema
    return replace(schema, feature_names=dataset.feature_names)
