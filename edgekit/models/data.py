"""Tabular data files: ``.npz`` (``X``, optional ``y``, optional ``feature_names``) and ``.csv`` with a header.

Everything that reads rows for a model (calibration, evaluation, validation, baselines) comes
through ``load_dataset``, and through ``Dataset.aligned_to`` when the model's feature names are known,
so a CSV with its columns in another order is reordered and one with missing columns is refused.

A field-samples export (``edgekit fleet samples``, ``.csv`` or ``.parquet``) is read as it is: its
features and its ``label``, never its metadata columns (``FIELD_SAMPLE_METADATA``); see ``is_field_export``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.tabular import TableError, column_order, placeholder_names, read_table
from edgekit.errors import DataError

if TYPE_CHECKING:
    from device_agent.columns import Column
    from device_agent.schema import InputSchema


# The metadata columns a field-samples export (``edgekit.fleet.samples.export_samples``) writes first, in this
# order, before the features and ``label``: a file format, so changed only on purpose (README, docs/retrain.md).
FIELD_SAMPLE_METADATA = ("id", "device", "model", "version", "seq", "ts", "drifted", "prediction")
FIELD_SAMPLE_LABEL = "label"


@dataclass(frozen=True)
class Dataset:
    """The rows of one data file. ``unlabelled`` counts the rows of a field-samples export whose label has not
    arrived yet; when there are any, ``y`` is None and ``X`` still holds every row (a baseline counts them
    all), and ``require_labels`` refuses the file naming the count and the fix. So ``y`` is always one label
    per row of ``X`` or None, and no caller has to drop rows from ``X`` to match it."""

    X: np.ndarray
    y: np.ndarray | None
    feature_names: tuple[str, ...] | None  # None when the file carries no names (an .npz without them)
    source: str
    sha256: str
    unlabelled: int = 0

    @property
    def rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def width(self) -> int:
        return int(self.X.shape[1])

    def names_or_default(self) -> tuple[str, ...]:
        return self.feature_names or default_feature_names(self.width)

    def require_labels(self, why: str) -> np.ndarray:
        if self.y is None and self.unlabelled:
            raise DataError(
                f"{self.unlabelled} of its {self.rows} field rows have no label yet, which {why} needs",
                "export only the labelled ones (edgekit fleet samples --labelled-only -o FILE), "
                "or send the devices their labels first (POST /v1/feedback)",
                path=self.source,
            )
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
                return replace(self, X=self.X[:, order], feature_names=tuple(feature_names))
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
        return replace(self, X=self.X[index], y=None if self.y is None else self.y[index])


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
        unlabelled = _npz_unlabelled(Path(path))
        return Dataset(X, None if unlabelled else y, (schema.tensor.name,), str(path), digest, unlabelled)
    path = Path(path)
    if path.is_dir():
        raise DataError(
            "is a folder; a model of rows and columns reads one data file", "give an .npz, .csv or .parquet", path=path
        )
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "is not a file", "check the path", path=path)
    raw = path.read_bytes()
    try:
        X, y, names, unlabelled = _read_rows(path, raw, label, columns)
    except TableError as exc:
        raise DataError(exc.problem, _fix_for(exc), path=path) from exc
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(
            f"X has shape {X.shape}; expected rows × features with at least one of each",
            "save a 2-D array as X",
            path=path,
        )
    if y is not None and len(y) != len(X):
        raise DataError(f"has {len(X)} rows but {len(y)} labels", "give one label per row", path=path)
    return Dataset(X, y, names, str(path), hashlib.sha256(raw).hexdigest(), unlabelled)


def is_field_export(header: Sequence[str]) -> bool:
    """Whether a table's column names are a field-samples export's: its first eight are exactly
    ``FIELD_SAMPLE_METADATA`` (id, device, model, version, seq, ts, drifted, prediction) in that order, and
    its last is ``label``. A hand-made table that starts with those eight names in that order would mean
    the same thing, so nothing is lost by the rule; a table that has only some of them is a plain table
    (its non-numeric id column is then refused with the fix to drop it)."""
    names = tuple(name.strip() for name in header)
    width = len(FIELD_SAMPLE_METADATA)
    return len(names) > width and names[:width] == FIELD_SAMPLE_METADATA and names[-1] == FIELD_SAMPLE_LABEL


def _read_rows(
    path: Path, raw: bytes, label: str | None, columns: Sequence[Column] | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None, int]:
    """``read_table``'s answer and the count of rows without a label: a field-samples export's features and
    label only (its metadata columns cut before ``read_table`` sees the table, so they never become features,
    and its own ``label`` column whatever ``--label`` names for the other files); its labels only when every
    row has one. The sha256 stays the file's own (lineage and the gate know files by it)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        X, y, names = read_table(path, label, raw, columns=columns)
        unlabelled = _npz_unlabelled(path)
        return X, (y if unlabelled == 0 else None), names, unlabelled
    header = _csv_header(raw) if suffix in (".csv", ".txt") else _parquet_header(path) if suffix in _PARQUET else None
    if header is None or not is_field_export(header):
        return (*read_table(path, label, raw, columns=columns), 0)
    if suffix in _PARQUET:
        X, y, names, labelled = _read_parquet_export(path, columns)
    else:
        table, labelled = _csv_export_features(raw)
        X, y, names = read_table(path, FIELD_SAMPLE_LABEL, table, columns=columns)
    unlabelled = int(len(labelled) - sum(labelled))
    return X, (y if unlabelled == 0 else None), names, unlabelled


_PARQUET = (".parquet", ".pq")


def _csv_header(raw: bytes) -> list[str] | None:
    end = raw.find(b"\n")  # the first line only: a training CSV may be gigabytes, and read_table decodes it anyway
    try:
        first = raw[: end if end >= 0 else len(raw)].decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError:
        return None  # read_table says so
    return next(csv.reader([first]), None)


def _npz_unlabelled(path: Path) -> int:
    """Rows of an .npz field-samples export (``fleet samples -o x.npz``: it holds ``labelled`` and ``ids``) whose
    label has not arrived (their ``y`` is a placeholder); 0 for any other file."""
    if path.suffix.lower() != ".npz" or not path.is_file():
        return 0
    try:
        with np.load(path, allow_pickle=False) as data:
            if "labelled" not in data.files or "ids" not in data.files:
                return 0
            labelled = np.asarray(data["labelled"], dtype=bool)
    except (ValueError, OSError, EOFError):
        return 0  # read_table (or the tensor reader) has said what is wrong with it
    return int(len(labelled) - labelled.sum())  # of the whole file, even when a limit read fewer rows: never less


def _parquet_header(path: Path) -> list[str] | None:
    try:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except Exception:  # no pyarrow, or not Parquet: read_table says which, in its words
        return None


def _csv_export_features(raw: bytes) -> tuple[bytes, list[bool]]:
    """An export's CSV without its metadata columns, line for line (so ``read_table`` names the right line),
    and whether each data row ``read_table`` will keep has a label."""
    width = len(FIELD_SAMPLE_METADATA)
    lines = csv.reader(raw.decode("utf-8-sig").splitlines())  # as read_table splits them
    header = next(lines)
    out, labelled = io.StringIO(), []
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header[width:])
    for row in lines:
        kept = row[width:] if len(row) == len(header) else row  # a short row: read_table names its field count
        writer.writerow(kept)
        if kept and any(cell.strip() for cell in kept):
            labelled.append(kept[-1].strip() != "")
    return out.getvalue().encode(), labelled


def _read_parquet_export(
    path: Path, columns: Sequence[Column] | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None, list[bool]]:
    """An export's Parquet file read without its metadata columns: they are cut into a file of their own
    (``read_table`` reads Parquet by path), which keeps every column's Parquet type."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError share no useful base
        raise TableError(f"is not a readable Parquet file ({exc})", "write it with DataFrame.to_parquet") from exc
    labels = table.column(FIELD_SAMPLE_LABEL).to_pylist()
    labelled = [value is not None and value != "" for value in labels]
    with tempfile.TemporaryDirectory(prefix="edgekit-field-") as folder:
        features = Path(folder) / "features.parquet"
        pq.write_table(table.select(table.column_names[len(FIELD_SAMPLE_METADATA) :]), features)
        X, y, names = read_table(features, FIELD_SAMPLE_LABEL, columns=columns)
    return X, y, names, labelled


_NOT_A_NUMBER = re.compile(r"column (?P<quote>['\"])(?P<name>.*)(?P=quote) holds .*, not a number$")


def _fix_for(exc: TableError) -> str:
    """The fix a table error suggests, made to fit a text column named like an identifier (or a field-samples
    metadata column of a hand-cut export): drop it, rather than encode it as a category."""
    match = _NOT_A_NUMBER.search(exc.problem)
    if match is None:
        return exc.fix
    name = match["name"]
    lowered = name.strip().lower()
    if lowered in ("id", "uuid", "guid", "key") or lowered.endswith(("_id", "-id", " id", "_uuid")):
        return f"drop the column {name!r}: an identifier is not a feature"
    if lowered in FIELD_SAMPLE_METADATA:
        return (
            f"drop the column {name!r} (field-samples metadata, not a feature), "
            "or give the export as 'edgekit fleet samples' wrote it: its features and label are read by themselves"
        )
    return exc.fix


def adopt_feature_names(schema: InputSchema, dataset: Dataset | None) -> InputSchema:
    """The model's schema, named after the data's columns when the model itself knows no names.

    A Pipeline fitted on a bare array has no ``feature_names_in_``; the CSV header (or the .npz's
    ``feature_names``) is then the best record of what each column means, and it goes into the
    ONNX metadata and the bundle so devices report drift per named feature.
    """
    if (
        schema.tensor is not None
        or dataset is None
        or dataset.feature_names is None
        or not _is_default(schema.feature_names)
        or dataset.width != schema.width
    ):
        return schema
    return replace(schema, feature_names=dataset.feature_names)
