"""Tabular data files: ``.npz`` (``X``, optional ``y``, optional ``feature_names``) and ``.csv`` with a header.

Everything that reads rows for a model (calibration, evaluation, validation, baselines) comes
through ``load_dataset``, and through ``Dataset.aligned_to`` when the model's feature names are known,
so a CSV with its columns in another order is reordered and one with missing columns is refused.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import DataError

if TYPE_CHECKING:
    from device_agent.schema import InputSchema

LABEL_COLUMN_GUESSES = ("label", "target", "y")


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
            raise DataError(f"has no labels, which {why} needs", "give an .npz with 'y' or a CSV with a label column (--label NAME)", path=self.source)
        return self.y

    def aligned_to(self, feature_names: Sequence[str] | None, width: int | None = None) -> "Dataset":
        """This data with columns in the model's order, or a ``DataError`` naming what does not match."""
        if feature_names is not None and self.feature_names is not None and not _is_default(feature_names):
            missing = [n for n in feature_names if n not in self.feature_names]
            extra = [n for n in self.feature_names if n not in feature_names]
            if missing:
                raise DataError(
                    f"lacks the model's columns {_names(missing)}" + (f" and has columns the model does not know: {_names(extra)}" if extra else ""),
                    "give data with the columns the model was trained on",
                    path=self.source,
                )
            if extra:
                raise DataError(f"has columns the model does not know: {_names(extra)}", "drop them, or name the label column with --label", path=self.source)
            order = [self.feature_names.index(n) for n in feature_names]
            return Dataset(self.X[:, order], self.y, tuple(feature_names), self.source, self.sha256)
        expected = len(feature_names) if feature_names is not None else width
        if expected is not None and self.width != expected:
            raise DataError(f"has {self.width} feature columns, the model takes {expected}", "give data with the model's features (and name the label column with --label)", path=self.source)
        return self

    def sample(self, rows: int, seed: int = 0) -> "Dataset":
        if self.rows <= rows:
            return self
        index = np.sort(np.random.default_rng(seed).choice(self.rows, rows, replace=False))
        return Dataset(self.X[index], None if self.y is None else self.y[index], self.feature_names, self.source, self.sha256)


def default_feature_names(width: int) -> tuple[str, ...]:
    return tuple(f"f{i}" for i in range(width))


def _is_default(names: Sequence[str]) -> bool:
    return tuple(names) == default_feature_names(len(names))


def load_dataset(path: str | Path, *, label: str | None = None) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "is not a file", "check the path", path=path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    suffix = path.suffix.lower()
    if suffix == ".npz":
        X, y, names = _read_npz(path, label)
    elif suffix in (".csv", ".txt"):
        X, y, names = _read_csv(path, raw, label)
    else:
        raise DataError(f"unknown data file type {suffix or '(none)'!r}", "give a .npz with X (and y) or a .csv with a header row", path=path)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"X has shape {X.shape}; expected rows × features with at least one of each", "save a 2-D array as X", path=path)
    if y is not None and len(y) != len(X):
        raise DataError(f"has {len(X)} rows but {len(y)} labels", "give one label per row", path=path)
    return Dataset(X, y, names, str(path), digest)


def _read_npz(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"is not a readable .npz ({exc})", "save it with numpy.savez(path, X=..., y=...)", path=path) from exc
    if "X" not in arrays:
        raise DataError(f"has no array 'X' (it has {sorted(arrays)})", "save it with numpy.savez(path, X=..., y=...)", path=path)
    X = arrays["X"]
    if X.dtype.kind not in "fiub":
        raise DataError(f"X has dtype {X.dtype}, not numbers", "encode every feature as a number", path=path)
    y_key = label or "y"
    y = arrays.get(y_key)
    if label and y is None:
        raise DataError(f"has no array {label!r}", f"the arrays are {sorted(arrays)}", path=path)
    names = tuple(str(n) for n in arrays["feature_names"].tolist()) if "feature_names" in arrays else None
    if names is not None and X.ndim == 2 and len(names) != X.shape[1]:
        raise DataError(f"has {len(names)} feature_names for {X.shape[1]} columns", "save one name per column", path=path)
    return X.astype(np.float32), _normalise_labels(y), names


def _read_csv(path: Path, raw: bytes, label: str | None) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError("is not UTF-8 text", "save the CSV as UTF-8", path=path) from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise DataError("is empty or has no header row", "put the column names on the first line", path=path)
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        duplicated = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"has duplicated column names {duplicated}", "give each column a unique name", path=path)
    label_index = _label_index(path, header, label)
    rows = []
    for line_number, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"line {line_number} has {len(row)} fields, the header has {len(header)}", "fix that row (a missing or extra comma?)", path=path)
        rows.append(row)
    if not rows:
        raise DataError("has a header but no rows", "add data rows", path=path)
    feature_columns = [i for i in range(len(header)) if i != label_index]
    X = np.empty((len(rows), len(feature_columns)), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, column in enumerate(feature_columns):
            X[r, c] = _parse_number(path, row[column], r + 2, header[column])
    y = None
    if label_index is not None:
        y = _normalise_labels(np.asarray([row[label_index].strip() for row in rows], dtype=object))
    return X, y, tuple(header[i] for i in feature_columns)


def _label_index(path: Path, header: list[str], label: str | None) -> int | None:
    if label is not None:
        if label not in header:
            raise DataError(f"has no column {label!r} (columns: {_names(header)})", "name the label column with --label", path=path)
        return header.index(label)
    for guess in LABEL_COLUMN_GUESSES:
        if guess in header:
            return header.index(guess)
    return None


_MISSING = {"", "na", "nan", "null", "none", "?"}


def _parse_number(path: Path, cell: str, line: int, column: str) -> float:
    cell = cell.strip()
    if cell.lower() in _MISSING:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"line {line} column {column!r} holds {cell!r}, not a number", "encode categories as numbers before scoring", path=path) from None


def _normalise_labels(y: np.ndarray | None) -> np.ndarray | None:
    """Labels as int64 when they are all whole numbers, float for regression targets, else strings."""
    if y is None:
        return None
    y = np.asarray(y).ravel()
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        return y.astype(np.int64) if np.all(np.isfinite(y)) and np.all(y == np.round(y)) else y.astype(np.float64)
    try:
        numbers = y.astype(np.float64)
    except ValueError:
        return y.astype(str)
    return _normalise_labels(numbers)


def _names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def adopt_feature_names(schema: "InputSchema", dataset: Dataset | None) -> "InputSchema":
    """The model's schema, named after the data's columns when the model itself knows no names.

    A Pipeline fitted on a bare array has no ``feature_names_in_``; the CSV header (or the .npz's
    ``feature_names``) is then the best record of what each column means, and it goes into the
    ONNX metadata and the bundle so devices report drift per named feature.
    """
    from dataclasses import replace

    if dataset is None or dataset.feature_names is None or not _is_default(schema.feature_names) or dataset.width != schema.width:
        return schema
    return replace(schema, feature_names=dataset.feature_names)
