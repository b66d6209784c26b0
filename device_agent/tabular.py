"""Reading tabular files (``.npz``, ``.csv``, ``.parquet``): the one reader the host and the device share.

``.npz`` holds ``X`` (rows × features), optionally ``y`` and ``feature_names``; ``.csv`` has a header
row, numbers in every feature cell (empty, NA, NaN, null and ? are missing values) and an optional
label column: ``label`` argument, else a column named ``label``, ``target`` or ``y``.

For a model of typed columns (``columns``), each cell is read as its column's type says, never
guessed from the text: "007" in a string column stays "007", and in a string column only the
empty field is missing ("NA" is Namibia). The rows are then an object array, as ``columns.py``
describes. ``.parquet`` needs pyarrow (the ``parquet`` extra) and keeps its own types.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .columns import Column
from .errors import InputError

LABEL_COLUMN_GUESSES = ("label", "target", "y")


class TableError(InputError):
    """A file that cannot be read as a table; the caller adds the path."""


def read_table(
    path: str | Path,
    label: str | None = None,
    raw: bytes | None = None,
    *,
    columns: Sequence[Column] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """``(X, y, feature_names)`` from an .npz, .csv or .parquet file; ``TableError`` says what is wrong.

    ``columns``: the model's typed columns, which say how to read each cell (X is then an object array)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if columns:
            raise TableError("is an .npz, which holds numbers only", "give the typed columns as a .csv or .parquet")
        return _read_npz(path, label)
    if suffix in (".csv", ".txt"):
        return _read_csv(path, path.read_bytes() if raw is None else raw, label, columns)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path, label, columns)
    raise TableError(
        f"unknown data file type {suffix or '(none)'!r}",
        "give a .npz with X (and y), a .csv with a header row, or a .parquet file",
    )


def _read_npz(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise TableError(f"is not a readable .npz ({exc})", "save it with numpy.savez(path, X=..., y=...)") from exc
    if "X" not in arrays:
        raise TableError(f"has no array 'X' (it has {sorted(arrays)})", "save it with numpy.savez(path, X=..., y=...)")
    X = arrays["X"]
    if X.dtype.kind not in "fiub":
        raise TableError(f"X has dtype {X.dtype}, not numbers", "encode every feature as a number")
    y_key = label or "y"
    y = arrays.get(y_key)
    if label and y is None:
        raise TableError(f"has no array {label!r}", f"the arrays are {sorted(arrays)}")
    names = tuple(str(n) for n in arrays["feature_names"].tolist()) if "feature_names" in arrays else None
    if names is not None and X.ndim == 2 and len(names) != X.shape[1]:
        raise TableError(f"has {len(names)} feature_names for {X.shape[1]} columns", "save one name per column")
    return X.astype(np.float32), normalise_labels(y), names


def _read_csv(
    path: Path, raw: bytes, label: str | None, columns: Sequence[Column] | None = None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TableError("is not UTF-8 text", "save the CSV as UTF-8") from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise TableError("is empty or has no header row", "put the column names on the first line")
    header = [h.strip() for h in header]
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        separator = "';'" if ";" in header[0] else "tabs"
        raise TableError(
            f"has one column named {header[0][:40]!r}…: it looks separated by {separator}, not commas",
            "save it as comma-separated CSV",
        )
    if len(set(header)) != len(header):
        duplicated = sorted({h for h in header if header.count(h) > 1})
        raise TableError(f"has duplicated column names {duplicated}", "give each column a unique name")
    label_index = _label_index(path, header, label)
    rows = []
    for line_number, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise TableError(
                f"line {line_number} has {len(row)} fields, the header has {len(header)}",
                "fix that row (a missing or extra comma?)",
            )
        rows.append(row)
    if not rows:
        raise TableError("has a header but no rows", "add data rows")
    feature_columns = [i for i in range(len(header)) if i != label_index]
    if columns:
        X = _typed_cells(rows, [header[i] for i in feature_columns], feature_columns, columns)
    else:
        X = np.empty((len(rows), len(feature_columns)), dtype=np.float32)
        for r, row in enumerate(rows):
            for c, column in enumerate(feature_columns):
                X[r, c] = _parse_number(path, row[column], r + 2, header[column])
    y = None
    if label_index is not None:
        y = normalise_labels(np.asarray([row[label_index].strip() for row in rows], dtype=object))
    return X, y, tuple(header[i] for i in feature_columns)


def _typed_cells(
    rows: list[list[str]], names: list[str], positions: list[int], columns: Sequence[Column]
) -> np.ndarray:
    """CSV cells read by their column's type; a column the model does not know stays text (the
    column-order check refuses it, naming it)."""
    by_name = {c.name: c for c in columns}
    X = np.empty((len(rows), len(names)), dtype=object)
    for c, (name, position) in enumerate(zip(names, positions, strict=True)):
        column = by_name.get(name)
        parse = _CELL_PARSERS[column.dtype] if column else str
        for r, row in enumerate(rows):
            try:
                X[r, c] = parse(row[position])
            except ValueError:
                what = {"int64": "a whole number", "bool": "true or false"}.get(column.dtype, "a number")
                raise TableError(
                    f"line {r + 2} column {name!r} holds {row[position]!r}, not {what}",
                    f"fix that cell: the model reads {name!r} as {column.dtype}",
                ) from None
    return X


def _number_cell(cell: str) -> float:
    cell = cell.strip()
    return math.nan if cell.lower() in _MISSING else float(cell)


def _integer_cell(cell: str) -> float | int:
    value = _number_cell(cell)
    if math.isnan(value):
        return value
    if not value.is_integer():
        raise ValueError(cell)
    return int(value)


def _bool_cell(cell: str) -> float | bool:
    text = cell.strip().lower()
    if text in _MISSING:
        return math.nan
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(cell)


def _string_cell(cell: str) -> str | None:
    return cell if cell != "" else None  # only the empty field: "NA", "null" may be real categories


def _any_cell(cell: str) -> str | None:
    return cell if cell != "" else None  # a column the model drops: kept as text


_CELL_PARSERS = {
    "any": _any_cell,
    "float32": _number_cell,
    "float64": _number_cell,
    "int64": _integer_cell,
    "bool": _bool_cell,
    "string": _string_cell,
}


def _read_parquet(
    path: Path, label: str | None, columns: Sequence[Column] | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError("is Parquet, and pyarrow is not installed", "pip install 'edgekit-ml[parquet]'") from None
    try:
        data = pq.read_table(path).to_pydict()
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError share no useful base
        raise TableError(f"is not a readable Parquet file ({exc})", "write it with DataFrame.to_parquet") from exc
    header = list(data)
    label_index = _label_index(path, header, label)
    names = [n for i, n in enumerate(header) if i != label_index]
    y = normalise_labels(np.asarray(data[header[label_index]], dtype=object)) if label_index is not None else None
    if columns:
        X = np.empty((len(data[header[0]]) if header else 0, len(names)), dtype=object)
        for c, name in enumerate(names):
            X[:, c] = [math.nan if v is None and _numeric(columns, name) else v for v in data[name]]
        return X, y, tuple(names)
    try:
        X = np.asarray([[math.nan if v is None else v for v in data[n]] for n in names], dtype=np.float32).T
    except (TypeError, ValueError):
        raise TableError(
            "has non-numeric columns", "encode them as numbers, or convert a model that takes them"
        ) from None
    return X.reshape(-1, len(names)), y, tuple(names)


def parquet_column_types(path: str | Path) -> dict[str, str]:
    """Each column's type in a Parquet file's schema, as a column dtype (int64, float64, bool, string):
    the types a CSV cannot carry, which ``edgekit convert --names-from`` records in the schema."""
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as kinds
    except ImportError:
        raise TableError("is Parquet, and pyarrow is not installed", "pip install 'edgekit-ml[parquet]'") from None
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError share no useful base
        raise TableError(f"is not a readable Parquet file ({exc})", "write it with DataFrame.to_parquet") from exc
    found = {}
    for field in schema:
        if kinds.is_boolean(field.type):
            found[field.name] = "bool"
        elif kinds.is_integer(field.type):
            found[field.name] = "int64"
        elif kinds.is_floating(field.type):
            found[field.name] = "float64"
        elif kinds.is_string(field.type) or kinds.is_large_string(field.type):
            found[field.name] = "string"
    return found


def _numeric(columns: Sequence[Column], name: str) -> bool:
    return any(c.name == name and c.dtype != "string" for c in columns)


def _label_index(path: Path, header: list[str], label: str | None) -> int | None:
    if label is not None:
        if label not in header:
            raise TableError(
                f"has no column {label!r} (columns: {preview_names(header)})", "name the label column with --label"
            )
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
        raise TableError(
            f"line {line} column {column!r} holds {cell!r}, not a number", "encode categories as numbers before scoring"
        ) from None


def normalise_labels(y: np.ndarray | None) -> np.ndarray | None:
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
    return normalise_labels(numbers)


def placeholder_names(width: int) -> tuple[str, ...]:
    """``f0, f1, …``: what a model records when nothing told it what its columns are."""
    return tuple(f"f{i}" for i in range(width))


def column_order(model_names: Sequence[str], data_names: Sequence[str] | None) -> list[int] | None:
    """Indices that put the data's columns in the model's order (``None``: already in order or unnamed).

    The host (validate, baselines) and the device (``edge-agent predict``) both match by name, never
    silently by position: a model that knows its columns only as placeholders cannot check the order of
    named data, so that is refused too, with the way to record the names.
    """
    model_names, width = tuple(model_names), len(model_names)
    if data_names is None or tuple(data_names) == model_names:
        return None
    data_names = tuple(data_names)
    if model_names == placeholder_names(width):
        if len(data_names) != width:
            return None  # the caller's width check says it more plainly than names it cannot compare
        raise TableError(
            f"names its columns ({preview_names(data_names, 4)}) "
            f"but the model knows them only by position ({preview_names(model_names, 4)}), "
            "so their order cannot be checked",
            "re-convert the model with these names recorded "
            "(edgekit convert MODEL --names-from THIS_FILE, its header in training order), "
            "or give the rows without a header (.npz without feature_names) in training order",
        )
    missing = [n for n in model_names if n not in data_names]
    extra = [n for n in data_names if n not in model_names]
    if missing:
        raise TableError(
            f"lacks the model's columns {preview_names(missing)}"
            + (f" and has columns the model does not know: {preview_names(extra)}" if extra else ""),
            "give data with the columns the model was trained on",
        )
    if extra:
        raise TableError(
            f"has columns the model does not know: {preview_names(extra)}",
            "drop them, or name the label column with --label",
        )
    return [data_names.index(n) for n in model_names]


def preview_names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
