"""The model's input schema, and the check every row goes through before it reaches a runtime.

The same check serves the host (``edgekit validate`` reading a CSV) and the device (a request to the
agent), so a file the host accepts is a request the device accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

import numpy as np

from .errors import InputError

SUPPORTED_DTYPES = ("float32", "float64", "int64", "int32")


@dataclass(frozen=True)
class InputSchema:
    """Name, dtype and width of the model's single tabular input.

    ``allow_nan`` is true only when the model itself handles missing values (an imputer in the
    graph); otherwise a NaN would silently become a confident wrong answer.
    """

    input_name: str
    feature_names: tuple[str, ...]
    dtype: str = "float32"
    allow_nan: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_np_dtype", np.dtype(self.dtype))
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported input dtype {self.dtype!r}")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError("feature names must be unique")

    @property
    def width(self) -> int:
        return len(self.feature_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_name": self.input_name,
            "feature_names": list(self.feature_names),
            "dtype": self.dtype,
            "shape": [None, self.width],
            "allow_nan": self.allow_nan,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> InputSchema:
        return cls(
            input_name=doc["input_name"],
            feature_names=tuple(doc["feature_names"]),
            dtype=doc.get("dtype", "float32"),
            allow_nan=bool(doc.get("allow_nan", False)),
        )

    def check(self, rows: Any, *, source: str = "input") -> np.ndarray:
        """Return ``rows`` as a 2-D array of the schema's dtype, or raise ``InputError`` naming the first problem."""
        if (isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.dtype == self._np_dtype and rows.shape[1] == self.width
                and rows.shape[0] and math.isfinite(rows.sum())):
            return rows  # the fast path an embedding app hits on every call: one sum tells "all finite"
        array = _as_numeric_2d(rows, source)
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


def _as_numeric_2d(rows: Any, source: str) -> np.ndarray:
    if isinstance(rows, np.ndarray) and rows.dtype.kind in "fiub":
        array = rows
    elif isinstance(rows, (list, tuple)) and not rows:
        raise InputError(f"{source} has no rows", "send at least one row")
    elif _has_booleans(rows):
        raise InputError(f"{source} holds true/false where numbers belong", "send numbers (1/0 for flags)")
    else:
        try:
            array = np.asarray(rows, dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{source} is not numeric ({_first_bad_value(rows)})", "send numbers only; encode categories as numbers") from exc
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise InputError(f"{source} has shape {array.shape}, expected rows × features", "send a list of rows")
    if array.dtype.kind == "b":
        array = array.astype(np.float64)
    return array


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
            f"{source} row {row} column {schema.feature_names[col]!r} is infinite", "replace it with a finite value", row=row, column=schema.feature_names[col]
        )
    if schema.allow_nan:
        return
    nan = np.isnan(array)
    if nan.any():
        row, col = map(int, np.argwhere(nan)[0])
        count = int(nan.sum())
        raise InputError(
            f"{source} has {count} missing value(s), first at row {row} column {schema.feature_names[col]!r}, and the model has no imputer",
            "fill or drop those rows, or retrain with an imputer in the pipeline",
            row=row,
            column=schema.feature_names[col],
        )


def _first_bad_value(rows: Any) -> str:
    try:
        for r, row in enumerate(rows):
            for value in row if isinstance(row, (list, tuple)) else [row]:
                try:
                    float(value)
                except (TypeError, ValueError):
                    return f"row {r} holds {value!r}"
    except TypeError:
        return f"got {type(rows).__name__}"
    return "ragged rows"


def _preview(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", …" if len(names) > limit else "")
