"""Typed columns: models whose input is a table of named columns of different types.

A DataFrame pipeline (a ColumnTransformer with a OneHotEncoder on a string column in front of a
forest) takes one ONNX input per column, as skl2onnx requires for strings. Its rows travel through
the agent as a 2-D object array (rows × columns, each cell a Python value: NaN for a missing
number, None for a missing string). That is the one row-shaped container the monitor, the
prediction log and the host tools already slice, copy and concatenate; the typed arrays a runtime
takes are made once per request, by ``feed``.

The check here is the whole contract a client meets: every column present, every cell of its
column's type, a missing value only where the model imputes it. Its errors name the row, the
column and what was expected (``request row 3, column 'country': expected a string, got 17``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError, SchemaError

COLUMN_DTYPES = ("float32", "float64", "int64", "bool", "string", "any")  # any: a column the model drops
COLUMN_KINDS = ("numeric", "categorical", "unused")
FEED_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "bool": np.bool_, "string": object}
_WHAT = {
    "float32": "a number",
    "float64": "a number",
    "int64": "a whole number",
    "bool": "true or false",
    "string": "a string",
    "any": "a string, a number, true, false or null",
}


@dataclass(frozen=True)
class Column:
    """One input column.

    ``dtype`` is what a client sends and a data file holds; ``feed`` is the element type of the
    model's input for it (an integer column may be fed as float64 to the scaler that reads it), or
    None when the model drops the column (it is still checked and sketched: the pipeline was fitted
    with it, and a client that sends it is right to). ``nullable``: a missing value is served,
    because the model imputes it or routes it natively; otherwise it is refused by column.
    """

    name: str
    dtype: str
    kind: str = "numeric"
    nullable: bool = False
    feed: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in COLUMN_DTYPES:
            raise SchemaError(
                f"column {self.name!r} has dtype {self.dtype!r}", f"use one of {', '.join(COLUMN_DTYPES)}"
            )
        if self.kind not in COLUMN_KINDS:
            raise SchemaError(f"column {self.name!r} has kind {self.kind!r}", f"use one of {', '.join(COLUMN_KINDS)}")
        if self.feed is not None and self.feed not in FEED_DTYPES:
            raise SchemaError(f"column {self.name!r} is fed as {self.feed!r}", f"use one of {', '.join(FEED_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "kind": self.kind, "nullable": self.nullable, "feed": self.feed}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Column:
        return cls(doc["name"], doc["dtype"], doc.get("kind", "numeric"), bool(doc.get("nullable")), doc.get("feed"))


class ColumnChecker:
    """Checks rows against typed columns and builds the runtime's feed; made once per schema."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)
        self.names = tuple(c.name for c in self.columns)
        self.plain = tuple(_PLAIN_TYPES[c.dtype] for c in self.columns)  # types a cell may have unlooked-at
        self.numeric = tuple(c.dtype != "string" for c in self.columns)
        # fed columns of one element type are converted together, one numpy call per type; strings too
        self.groups: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
        for dtype in dict.fromkeys(c.feed for c in self.columns if c.feed is not None):
            members = [(j, c.name) for j, c in enumerate(self.columns) if c.feed == dtype]
            self.groups[dtype] = (np.asarray([j for j, _ in members], dtype=np.intp), tuple(n for _, n in members))
        self.blank_missing = any(c.feed == "string" and c.nullable for c in self.columns)

    def check(self, rows: Any, source: str) -> np.ndarray:
        """``rows`` (lists in column order, as a 2-D object array) as a checked object array.

        The common request costs a type test per cell in C (``set(map(type, ...))``) and one
        finiteness test for the floats; a cell is looked at alone only on the way to an error or a
        fix (None to NaN). One row, the commonest request, has a path of its own."""
        rows = self._as_rows(rows, source)
        if len(rows) == 1 and self._plain_row(rows[0]):
            table = np.empty((1, len(self.columns)), dtype=object)
            table[0] = rows[0]
            return table
        cells = list(zip(*rows, strict=True))  # the columns, as tuples (widths checked above)
        fixed: dict[int, list[Any]] = {}
        floats: list[int] = []
        for j, column in enumerate(self.columns):
            types = set(map(type, cells[j]))
            if types <= self.plain[j]:
                if float in types and column.dtype != "any":
                    floats.append(j)
            else:
                fixed[j] = _checked_column(column, list(cells[j]), source)
        if floats and not _finite([cells[j] for j in floats], False, F32_MAX):  # in range for any feed
            for j in floats:  # which column: NaN where it is imputed stays, anything else is refused
                fixed[j] = _checked_column(self.columns[j], list(cells[j]), source)
        table = np.empty((len(rows), len(self.columns)), dtype=object)
        table[:] = rows
        for j, values in fixed.items():
            table[:, j] = values
        return table

    def _plain_row(self, row: Any) -> bool:
        """One row whose every cell is of a plain type and every number finite and within float32's range."""
        for value, plain in zip(row, self.plain, strict=True):
            kind = type(value)
            if kind not in plain or ((kind is float or kind is int) and not -F32_MAX <= value <= F32_MAX):
                return False  # NaN fails the comparison too: the slow path decides
        return True

    def _as_rows(self, rows: Any, source: str) -> list[Any]:
        if isinstance(rows, np.ndarray) and rows.ndim == 1 and len(rows) == len(self.columns):
            rows = rows.reshape(1, -1)
        if isinstance(rows, np.ndarray) and rows.ndim == 2:
            rows = rows.tolist()
        if not isinstance(rows, (list, tuple)) or not rows:
            raise InputError(f"{source} has no rows", "send at least one row")
        if not isinstance(rows[0], (list, tuple)):
            rows = [rows]  # one flat row
        width = len(self.columns)
        for r, row in enumerate(rows):
            if not isinstance(row, (list, tuple)) or len(row) != width:
                got = f"has {len(row)} values" if isinstance(row, (list, tuple)) else "is not a list of values"
                raise InputError(
                    f"{source} row {r} {got}, the model takes {width} columns",
                    f"send {width} values in the order {_preview(self.names)}, or objects keyed by column name",
                    row=r,
                )
        return rows

    def feed(self, table: np.ndarray) -> dict[str, np.ndarray]:
        """The runtime's inputs: one ``[rows, 1]`` array per fed column, of the model's element type."""
        try:
            return self._feed(table)
        except (ValueError, OverflowError, TypeError) as exc:  # a value no check foresaw: the client's, not a 500
            raise InputError(
                f"a value does not fit the model's inputs ({exc})", "send values of each column's type"
            ) from exc

    def _feed(self, table: np.ndarray) -> dict[str, np.ndarray]:
        feed = {}
        rows = len(table)
        for dtype, (index, names) in self.groups.items():
            block = table[:, index]
            if dtype == "string" and self.blank_missing:  # the graph's imputer replaces "": a missing string
                block = np.where(np.equal(block, None), "", block)
            # one conversion, columns made contiguous rows, each handed out as a [rows, 1] view
            block = np.ascontiguousarray(block.T, dtype=FEED_DTYPES[dtype]).reshape(len(names), rows, 1)
            for position, name in enumerate(names):
                feed[name] = block[position]
        return feed


# the types a column's cells may have without a look one by one (floats still get the finiteness test)
_PLAIN_TYPES = {
    "string": frozenset({str}),
    "bool": frozenset({bool}),
    "int64": frozenset({int}),
    "float32": frozenset({float, int}),
    "float64": frozenset({float, int}),
    "any": frozenset({str, float, int, bool, type(None)}),
}


F32_MAX = float(np.finfo(np.float32).max)


def _checked_column(column: Column, values: list[Any], source: str) -> list[Any]:
    """The column's values, NaN or None for missing ones, or the first bad cell's ``InputError``."""
    types = set(map(type, values))  # one pass in C: the usual request needs no per-cell look
    if column.dtype == "any":  # dropped by the model: any JSON scalar; a numpy scalar as the Python one
        if types <= _PLAIN_TYPES["any"]:
            return values
        return [_any_cell(column, v, r, source) for r, v in enumerate(values)]
    if column.dtype == "string":
        if types <= {str}:
            return values
        allowed = {str, np.str_}
    elif column.dtype == "bool":
        if types <= {bool}:
            return values
        allowed = {bool, np.bool_, int, np.int64}
    else:
        numbers = types <= {float, int} and (types == {int} or column.dtype != "int64")
        limit = F32_MAX if column.feed == "float32" else math.inf
        if numbers and (float not in types or _finite(values, column.nullable, limit)):
            return values
        allowed = {float, int, np.float64, np.float32, np.int64, np.int32}
    return [_checked_cell(column, v, r, source, allowed) for r, v in enumerate(values)]


def _finite(values: list[Any], nan_allowed: bool, limit: float = math.inf) -> bool:
    try:
        array = np.asarray(values, dtype=np.float64)
    except OverflowError:
        return False
    finite = np.isfinite(array)
    within = bool((np.abs(array[finite]) <= limit).all())
    return within and bool(finite.all() or (nan_allowed and not np.isinf(array).any()))


def _any_cell(column: Column, value: Any, r: int, source: str) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise _wrong_type(column, value, f"{source} row {r}, column {column.name!r}", r)


def _checked_cell(column: Column, value: Any, r: int, source: str, allowed: set[type]) -> Any:
    where = f"{source} row {r}, column {column.name!r}"
    missing = value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))
    if missing:
        if not column.nullable:
            raise InputError(
                f"{where}: a missing value, and the model does not impute this column",
                "send a value (or retrain with an imputer for it)",
                row=r,
                column=column.name,
            )
        return None if column.dtype == "string" else math.nan
    if type(value) not in allowed or (column.dtype != "bool" and isinstance(value, bool)):
        raise _wrong_type(column, value, where, r)
    if column.dtype == "bool":
        if value not in (0, 1):
            raise _wrong_type(column, value, where, r)
        return bool(value)
    if column.dtype == "string":
        return value
    try:
        number = float(value)
    except OverflowError:  # an integer past any float
        number = math.inf
    limit = F32_MAX if column.feed == "float32" else math.inf
    if math.isinf(number) or abs(number) > limit:
        raise InputError(
            f"{where}: {_shown(value)} is infinite or too large for the model's {column.feed} input",
            f"send a finite number within ±{limit:.3g}",
            row=r,
            column=column.name,
        )
    if column.dtype == "int64":
        if not number.is_integer() or (column.feed == "int64" and abs(int(value)) >= 2**63):
            raise _wrong_type(column, value, where, r)
        return int(value)
    return number


def _wrong_type(column: Column, value: Any, where: str, r: int) -> InputError:
    fix = f"send {_WHAT[column.dtype]} for {column.name!r}" + (" (null for a missing value)" if column.nullable else "")
    return InputError(f"{where}: expected {_WHAT[column.dtype]}, got {_shown(value)}", fix, row=r, column=column.name)


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, bool) else ("true" if value else "false")
    return text if len(text) <= 40 else text[:39] + "…"


def rows_from_columnar(doc: dict[str, Any], names: Sequence[str], source: str) -> list[list[Any]]:
    """The columnar form (``{"age": [41, 23], "country": ["DE", "IN"]}``) as rows in ``names`` order.

    KServe v1 and TF-Serving clients send it as ``inputs``; every column must be there, as a list,
    and all of one length."""
    missing = [n for n in names if n not in doc]
    extra = [str(k) for k in doc if k not in names]
    if missing or extra:
        parts = [f"lacks the columns {_preview_quoted(missing)}"] if missing else []
        if extra:
            parts.append(f"has columns the model does not know: {_preview_quoted(extra)}")
        raise InputError(
            f"{source} " + " and ".join(parts),
            f"send the columns {_preview_quoted(names)}, each a list with one value per row",
            column=(missing or extra)[0],
        )
    lengths = {n: len(doc[n]) if isinstance(doc[n], list) else None for n in names}
    for name, length in lengths.items():
        if length is None:
            raise InputError(
                f"{source} column {name!r} is not a list", "send each column as a list of values", column=name
            )
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{n!r}: {k}" for n, k in list(lengths.items())[:4])
        raise InputError(f"{source} columns differ in length ({shown})", "send one value per row in every column")
    return [list(row) for row in zip(*(doc[n] for n in names), strict=True)]


def _preview(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


def _preview_quoted(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
