"""The model's input schema, and the check every row goes through before it reaches a runtime.

The same check serves the host (``edgekit validate`` reading a CSV) and the device (a request to the
agent), so a file the host accepts is a request the device accepts.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .columns import Column, ColumnChecker, rows_from_columnar
from .errors import InputError, SchemaError
from .tensors import MAX_BATCH_BYTES, TensorSpec, check_tensor

SUPPORTED_DTYPES = ("float32", "float64", "int64", "int32")
MATRIX, COLUMNS, TENSOR = "matrix", "columns", "tensor"


@dataclass(frozen=True)
class InputSchema:
    """What the model takes: one numeric matrix, typed columns, or a tensor.

    The *matrix* layout (``columns`` is None) is one ``[rows, features]`` input of one ``dtype``: the
    fast path of an all-numeric model. The *columns* layout is one input per named, typed column
    (``device_agent.columns``): a DataFrame pipeline with string, integer and float columns.
    ``allow_nan`` is true only when the model itself handles missing values (an imputer in the
    graph); otherwise a NaN would silently become a confident wrong answer. The *tensor* layout is
    one image, spectrogram or sensor window per example (``tensor``: ``device_agent.tensors``), with
    the preprocessing that turns encoded items (JPEG, PNG, WAV) into it (``preprocess``, the TOML's
    table, run by ``device_agent.preprocess``) and the summary signals the agent sketches of it
    (``signals``, ``device_agent.tensor_signals``).
    """

    input_name: str
    feature_names: tuple[str, ...]
    dtype: str = "float32"
    allow_nan: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    columns: tuple[Column, ...] | None = None
    tensor: TensorSpec | None = None
    preprocess: dict[str, Any] | None = field(default=None, compare=False)
    signals: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def of_tensor(
        cls, spec: TensorSpec, *, preprocess: dict[str, Any] | None = None, signals: dict[str, Any] | None = None
    ) -> InputSchema:
        return cls(
            input_name=spec.name,
            feature_names=(spec.name,),
            dtype=spec.dtype,
            tensor=spec,
            preprocess=preprocess,
            signals=signals,
        )

    @classmethod
    def of_columns(cls, columns: Sequence[Column]) -> InputSchema:
        columns = tuple(columns)
        return cls(
            input_name="",
            feature_names=tuple(c.name for c in columns),
            dtype="float64",
            allow_nan=any(c.nullable and c.feed is not None for c in columns),
            columns=columns,
        )

    @property
    def layout(self) -> str:
        return TENSOR if self.tensor is not None else MATRIX if self.columns is None else COLUMNS

    @property
    def kinds(self) -> tuple[str, ...]:
        """Each column's kind (numeric or categorical); a matrix is numeric throughout."""
        return tuple(c.kind for c in self.columns) if self.columns else ("numeric",) * self.width

    def feed(self, rows: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Checked rows as the runtime takes them: the matrix or tensor itself, or one array per column."""
        return rows if self.columns is None else self._checker.feed(rows)

    def preprocessor(self) -> Any:
        """The ``Preprocess`` that turns encoded items into this tensor (None without preprocessing).
        Built once, on first use: Pillow is imported only by a model that decodes images."""
        if self.preprocess is None:
            return None
        cached = self.__dict__.get("_preprocessor")
        if cached is None:
            from .preprocess import Preprocess

            cached = Preprocess.from_dict(self.preprocess, self.tensor)
            object.__setattr__(self, "_preprocessor", cached)
        return cached

    def tensor_signals(self) -> Any:
        """The ``TensorSignals`` that reduce a batch of this tensor to the rows the profile sketches."""
        cached = self.__dict__.get("_signals")
        if cached is None and self.tensor is not None:
            from .tensor_signals import TensorSignals

            cached = TensorSignals.from_dict(self.signals, self.tensor) if self.signals else TensorSignals(self.tensor)
            object.__setattr__(self, "_signals", cached)
        return cached

    def __post_init__(self) -> None:
        object.__setattr__(self, "_np_dtype", np.dtype(self.dtype))
        object.__setattr__(self, "_matrix", self.columns is None and self.tensor is None)
        object.__setattr__(self, "_row_shape", (len(self.feature_names),))
        object.__setattr__(self, "_checker", ColumnChecker(self.columns) if self.columns else None)
        if self.tensor is not None:
            return  # the tensor spec checked itself
        if self.dtype not in SUPPORTED_DTYPES:
            raise SchemaError(
                f"input dtype {self.dtype!r} is not supported",
                f"export the model with one of {', '.join(SUPPORTED_DTYPES)}",
            )
        if len(set(self.feature_names)) != len(self.feature_names):
            repeated = sorted({n for n in self.feature_names if self.feature_names.count(n) > 1})
            raise SchemaError(
                f"feature names repeat ({', '.join(map(repr, repeated[:5]))})", "give every column its own name"
            )

    @property
    def width(self) -> int:
        return len(self.feature_names)

    def to_dict(self) -> dict[str, Any]:
        if self.tensor is not None:
            return {
                "layout": TENSOR,
                "tensor": self.tensor.to_dict(),
                "preprocess": self.preprocess,
                "signals": self.signals,
            }
        doc = {
            "input_name": self.input_name,
            "feature_names": list(self.feature_names),
            "dtype": self.dtype,
            "shape": [None, self.width],
            "allow_nan": self.allow_nan,
        }
        if self.columns is not None:  # written only for typed columns: a matrix schema reads as it always did
            doc.update(layout=COLUMNS, columns=[c.to_dict() for c in self.columns])
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> InputSchema:
        layout = doc.get("layout", MATRIX)
        if layout == COLUMNS:
            return cls.of_columns([Column.from_dict(c) for c in doc["columns"]])
        if layout == TENSOR:
            return cls.of_tensor(
                TensorSpec.from_dict(doc["tensor"]), preprocess=doc.get("preprocess"), signals=doc.get("signals")
            )
        if layout != MATRIX:
            raise SchemaError(f"input layout {layout!r} is not one this agent reads", "upgrade the agent")
        return cls(
            input_name=doc["input_name"],
            feature_names=tuple(doc["feature_names"]),
            dtype=doc.get("dtype", "float32"),
            allow_nan=bool(doc.get("allow_nan", False)),
        )

    def check(self, rows: Any, *, source: str = "input") -> np.ndarray:
        """Return ``rows`` as a 2-D array of the schema's dtype (an object array of checked cells for
        typed columns), or raise ``InputError`` naming the first problem.

        Rows come as lists in the schema's order, objects keyed by column name, the columnar form
        (one list per column name), a 2-D array, or a DataFrame (any object with ``to_dict("list")``
        and ``columns``: device_agent never imports pandas)."""
        if (
            self._matrix
            and type(rows) is np.ndarray
            and rows.dtype == self._np_dtype
            and rows.shape[1:] == self._row_shape
            and rows.shape[0]
            and all_finite(rows)
        ):
            return rows  # the fast path an embedding app hits on every call
        if self.tensor is not None:
            return self._check_tensor(rows, source)
        if hasattr(rows, "columns") and hasattr(rows, "to_dict") and not isinstance(rows, dict):
            rows = {str(k): v for k, v in rows.to_dict("list").items()}
        if isinstance(rows, dict) and rows and all(isinstance(v, list) for v in rows.values()):
            rows = rows_from_columnar(rows, self.feature_names, source)
        if self.columns is not None:
            return self._check_columns(rows, source)
        if isinstance(rows, dict):
            example = f"[{{{_preview_keys(self.feature_names)}}}] or [[{self.width} numbers in that order]]"
            raise InputError(f"{source} is one object, not a list of rows", f"send a list of rows: {example}")
        if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], dict):
            rows = self._rows_from_objects(rows, source)
        array = _as_numeric_2d(rows, source, self)
        if array.shape[1] != self.width:
            raise InputError(
                f"{source} has {array.shape[1]} columns, the model takes {self.width}",
                f"send rows of {self.width} values in the order {_preview(self.feature_names)}",
            )
        if array.shape[0] == 0:
            raise InputError(f"{source} has no rows", "send at least one row")
        array = array.astype(self.dtype, copy=False)
        if array.dtype.kind == "f":
            _check_finite(array, self, source)
        return array

    def _check_tensor(self, data: Any, source: str) -> np.ndarray:
        """A batch of the tensor: an array, nested lists, ``{input name: ...}``, or encoded items
        (``{"b64": ...}`` objects or bytes: JPEG, PNG, WAV, .npy) run through the preprocessing."""
        if isinstance(data, dict) and not _is_b64(data):
            if set(data) != {self.tensor.name}:
                raise InputError(
                    f"{source} names inputs {_preview_quoted(sorted(map(str, data)))}",
                    f"the model has one input, {self.tensor.name!r}",
                )
            data = data[self.tensor.name]
        if isinstance(data, (list, tuple)) and data and (isinstance(data[0], (dict, bytes))):
            return self._decoded(data, source)
        if _is_b64(data) or isinstance(data, bytes):
            return self._decoded([data], source)
        return check_tensor(self.tensor, data, source=source)

    def _decoded(self, items: Sequence[Any], source: str) -> np.ndarray:
        most = max(1, MAX_BATCH_BYTES // self.tensor.example_bytes)
        if len(items) > most:  # before anything is decoded or allocated
            raise InputError(
                f"{source} holds {len(items)} items, which would decode into more than "
                f"{MAX_BATCH_BYTES >> 20} MB ({most} fit)",
                f"send at most {most} items a request",
            )
        preprocess = self.preprocessor()
        if preprocess is None:
            raise InputError(
                f"{source} holds encoded items (images, audio) but the model has no preprocessing",
                f"send tensors of shape {list(self.tensor.shape)}, or package the model with --preprocess",
            )
        raw = []
        for i, item in enumerate(items):
            if isinstance(item, bytes):
                raw.append(item)
                continue
            if not _is_b64(item):
                raise InputError(
                    f"{source} item {i} is {_json_kind(item)}",
                    'send an encoded file as {"b64": "<base64>"} (the key is b64), or the tensor as nested lists',
                    row=i,
                )
            try:
                raw.append(base64.b64decode(item["b64"], validate=True))
            except (binascii.Error, ValueError, TypeError):
                raise InputError(
                    f"{source} item {i} is not valid base64", "encode the file with base64", row=i
                ) from None
        return preprocess.batch(raw, source=source)

    def _check_columns(self, rows: Any, source: str) -> np.ndarray:
        if isinstance(rows, dict):
            example = f"[{{{_preview_keys(self.feature_names)}}}]"
            raise InputError(f"{source} is one object, not a list of rows", f"send a list of rows: {example}")
        if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], dict):
            rows = self._rows_from_objects(rows, source)
        return self._checker.check(rows, source)

    def _rows_from_objects(self, rows: Sequence[Any], source: str) -> list[list[Any]]:
        """Rows sent as objects keyed by feature name, as lists in the schema's order.

        Accepted because a name cannot be sent in the wrong position: a client that builds rows from
        named fields cannot swap two columns. Missing and unknown keys are refused (null is how a
        missing value is sent), as a CSV's missing or unknown columns are."""
        names, ordered = self.feature_names, []
        for r, row in enumerate(rows):
            if not isinstance(row, dict):
                problem = f"{source} row {r} is {_json_kind(row)} but row 0 is an object"
                raise InputError(problem, "send every row the same way (objects keyed by feature name)", row=r)
            if len(row) != len(names) or not all(n in row for n in names):
                raise _keys_error(row, names, source, r)
            ordered.append([row[n] for n in names])
        return ordered


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _keys_error(row: dict[str, Any], names: Sequence[str], source: str, r: int) -> InputError:
    missing = [n for n in names if n not in row]
    extra = [str(k) for k in row if k not in names]
    parts = [f"lacks {_preview_quoted(missing)}"] if missing else []
    if extra:
        parts.append(f"has keys the model does not know: {_preview_quoted(extra)}")
    fix = f"send the keys {_preview_quoted(names)} (null for a missing value)"
    return InputError(f"{source} row {r} " + " and ".join(parts), fix, row=r, column=(missing or extra)[0])


def _as_numeric_2d(rows: Any, source: str, schema: InputSchema) -> np.ndarray:
    if isinstance(rows, np.ndarray) and rows.dtype.kind in "fiub":
        array = rows
    elif isinstance(rows, (list, tuple)) and not rows:
        raise InputError(f"{source} has no rows", "send at least one row")
    elif _has_booleans(rows):
        raise InputError(f"{source} holds true/false where numbers belong", "send numbers (1/0 for flags)")
    elif not isinstance(rows, (list, tuple, np.ndarray)):
        raise InputError(
            f"{source} is not numeric: it is {_json_kind(rows)}",
            f"send a list of rows, each {schema.width} numbers in the order {_preview(schema.feature_names)}",
        )
    else:
        array = _from_lists(rows, source, schema)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise InputError(f"{source} has shape {array.shape}, expected rows × features", "send a list of rows")
    if array.dtype.kind == "b":
        array = array.astype(np.float64)
    return array


def all_finite(array: np.ndarray) -> bool:
    """True when a numeric array holds no NaN and no infinity, in one pass that allocates nothing.

    ``x . x`` is finite exactly when every value is, unless the squares overflow (values past 1e19 in
    float32); only then are the values looked at one by one. Integers are always finite."""
    if array.dtype.kind != "f":
        return True
    flat = array.reshape(-1)
    if math.isfinite(np.dot(flat, flat)):
        return True
    return bool(np.isfinite(array).all())


def _has_booleans(rows: Any) -> bool:
    if not isinstance(rows, (list, tuple)):
        return False
    # the first rows tell: a full scan would tax every large JSON request
    return any(isinstance(v, bool) for row in rows[:10] for v in (row if isinstance(row, (list, tuple)) else [row]))


def _check_finite(array: np.ndarray, schema: InputSchema, source: str) -> None:
    inf = np.isinf(array)
    if inf.any():
        row, col = map(int, np.argwhere(inf)[0])
        raise InputError(
            f"{source} row {row} column {schema.feature_names[col]!r} is infinite",
            "replace it with a finite value",
            row=row,
            column=schema.feature_names[col],
        )
    if schema.allow_nan:
        return
    nan = np.isnan(array)
    if nan.any():
        row, col = map(int, np.argwhere(nan)[0])
        count = int(nan.sum())
        raise InputError(
            f"{source} has {count} missing value(s), first at row {row} column {schema.feature_names[col]!r}, "
            "and the model has no imputer",
            "fill or drop those rows, or retrain with an imputer in the pipeline",
            row=row,
            column=schema.feature_names[col],
        )


def _from_lists(rows: Any, source: str, schema: InputSchema) -> np.ndarray:
    """Nested lists of JSON numbers (null: missing) as an array.

    Strings are refused, even "3.5": the API promises numbers, and a string that happens to parse is
    more often a category or a locale's number sent by mistake than a number meant as one. numpy
    would convert it silently, so the dtype it infers without being told is checked first."""
    try:
        array = np.asarray(rows)
    except ValueError:  # numpy refuses ragged nesting
        raise _ragged(rows, source, schema) from None
    if array.dtype.kind in "fiub":
        return array
    bad = _first_non_number(rows)
    if bad is not None:
        raise _not_a_number(*bad, source, schema)
    return array.astype(np.float64)  # an object array of numbers and None (JSON null): None becomes NaN


_NUMBERS = (int, float, np.number)


def _first_non_number(rows: Any) -> tuple[int, int, Any] | None:
    """(row, column, value) of the first value that is neither a number nor null; the error path only."""
    sequences = (list, tuple, np.ndarray)
    if not any(isinstance(row, sequences) for row in rows):
        rows = [rows]  # one flat row: its positions are columns
    for r, row in enumerate(rows):
        for c, value in enumerate(row if isinstance(row, sequences) else [row]):
            if value is not None and (isinstance(value, (str, bytes, bool)) or not isinstance(value, _NUMBERS)):
                return r, c, value
    return None


def _not_a_number(r: int, c: int, value: Any, source: str, schema: InputSchema) -> InputError:
    column = schema.feature_names[c] if c < schema.width else f"#{c}"
    where = f"{source} row {r} column {column!r}"
    if isinstance(value, str):
        fix = 'send JSON numbers, not strings (3.5, not "3.5"); encode categories as numbers'
        return InputError(f"{where} holds the string {value!r}, which is not numeric", fix, row=r, column=column)
    fix = "send numbers only (null for a missing value); encode categories as numbers"
    return InputError(f"{where} holds {_json_kind(value)}, which is not numeric", fix, row=r, column=column)


def _ragged(rows: Any, source: str, schema: InputSchema) -> InputError:
    """Which row breaks the table: the first that is not a list, or not of the model's width."""
    fix = f"send every row as a list of {schema.width} numbers in the order {_preview(schema.feature_names)}"
    for r, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            return InputError(f"{source} row {r} is {_json_kind(row)}, not a list of values", fix, row=r)
        if len(row) != schema.width:
            return InputError(f"{source} row {r} has {len(row)} values, the model takes {schema.width}", fix, row=r)
    bad = _first_non_number(rows)
    return _not_a_number(*bad, source, schema) if bad else InputError(f"{source} rows are nested unevenly", fix)


def _json_kind(value: Any) -> str:
    """A value as a client would recognise it in its JSON, shortened."""
    kinds = {dict: "an object", list: "a list", tuple: "a list", str: "the string", bool: "the boolean"}
    kind = kinds.get(type(value), "the value")
    shown = repr(value) if not isinstance(value, (dict, list, tuple)) else _json_preview(value)
    return f"{kind} {shown}"


def _json_preview(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, default=str)
    except ValueError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _preview_quoted(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _preview_keys(names: Sequence[str], limit: int = 2) -> str:
    return ", ".join(f'"{n}": ...' for n in names[:limit]) + (", ..." if len(names) > limit else "")


def _preview(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", …" if len(names) > limit else "")


def request_rows(body: Any) -> Any:
    """The rows of a KServe v1 request: ``instances`` (rows: lists in schema order or objects keyed by
    column name) or ``inputs`` (the same, or the columnar form: one list per column name). HTTP and
    MQTT streaming both read requests with this."""
    if not isinstance(body, dict):
        raise InputError("the body is not a JSON object", 'send {"instances": [[...], ...]}')
    instances = body.get("instances", body.get("inputs"))
    if instances is None:
        raise InputError(
            "the body has no 'instances' (or 'inputs')",
            'send {"instances": [[...], ...]} or {"inputs": {"column": [...], ...}}',
        )
    return instances
