"""Tensor inputs: images, audio spectrograms and sensor windows, described and checked.

A ``TensorSpec`` is one named model input of fixed element type and shape, whose first dimension
is the batch. ``layout`` names the other dimensions by letter (``NCHW``, ``NHWC``, ``NWC``, ``NCW``,
``NC``...: N batch, C channels, H height, W width); ``kind`` says what the tensor holds (``image``,
``audio``, ``sensor`` or plain ``tensor``), which picks the summary statistics the agent sketches.

``check_tensor`` is the one check every batch goes through, on the host and on the device: shape
and element type named in the error, finiteness of float data, and conversion only when it loses
nothing (a JSON list of integers into uint8 is fine; 300 into uint8 or 1.5 into int8 is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError, SchemaError

TENSOR_DTYPES = ("float32", "uint8", "int8", "int16")
KINDS = ("image", "audio", "sensor", "tensor")
# The most a request's decoded items may take: 5,000 tiny PNGs (525 KB of JSON) would otherwise decode
# into gigabytes of 224x224x3 float32 before anything else could refuse them.
MAX_BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One tensor input. ``shape[0]`` is the batch (None: any); the other dimensions are fixed."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    layout: str = ""
    kind: str = "tensor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype not in TENSOR_DTYPES:
            raise SchemaError(
                f"tensor input {self.name!r} has element type {self.dtype!r}",
                f"export the model with one of {', '.join(TENSOR_DTYPES)}",
            )
        if len(self.shape) < 2 or any(d is None or d <= 0 for d in self.shape[1:]):
            raise SchemaError(
                f"tensor input {self.name!r} has shape {list(self.shape)}",
                "export the model with a batch dimension first and fixed sizes after it",
            )
        if self.layout and (len(self.layout) != len(self.shape) or self.layout[0] != "N"):
            raise SchemaError(
                f"tensor input {self.name!r}: layout {self.layout!r} does not fit shape {list(self.shape)}",
                "give one letter per dimension, N (batch) first, e.g. NCHW or NHWC",
            )
        if self.kind not in KINDS:
            raise SchemaError(f"tensor input {self.name!r} has kind {self.kind!r}", f"use one of {', '.join(KINDS)}")

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example: the input's shape without the batch dimension."""
        return tuple(int(d) for d in self.shape[1:])

    @property
    def elements(self) -> int:
        return int(np.prod(self.example_shape))

    @property
    def example_bytes(self) -> int:
        return self.elements * np.dtype(self.dtype).itemsize

    @property
    def channel_axis(self) -> int | None:
        """The axis of channels in a batch, from the layout (None when the layout names none)."""
        return self.layout.index("C") if "C" in self.layout else None

    @property
    def channels(self) -> int:
        axis = self.channel_axis
        return 1 if axis is None else int(self.shape[axis])

    @property
    def spatial(self) -> tuple[int, int] | None:
        """(height, width) of an image-like input, from the layout."""
        if "H" in self.layout and "W" in self.layout:
            return int(self.shape[self.layout.index("H")]), int(self.shape[self.layout.index("W")])
        return None

    def describe(self) -> str:
        dims = ", ".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} {self.dtype} [{dims}]" + (f" {self.layout}" if self.layout else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "layout": self.layout,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(doc["name"]),
            dtype=str(doc["dtype"]),
            shape=tuple(None if d is None else int(d) for d in doc["shape"]),
            layout=str(doc.get("layout", "")),
            kind=str(doc.get("kind", "tensor")),
        )


def guess_layout(shape: Sequence[int | None]) -> str:
    """A layout for a shape whose exporter did not say: channels are the small dimension (≤ 4 of
    an image, the smaller of a 1-D signal's two). ``NCHW`` for PyTorch-style images, ``NHWC`` for
    TensorFlow-style ones, ``NCW``/``NWC`` for sensor windows, ``NC`` for a vector."""
    rank = len(shape)
    if rank == 4:
        return "NHWC" if shape[3] is not None and shape[3] <= 4 and (shape[1] or 0) > 4 else "NCHW"
    if rank == 3:
        return "NWC" if shape[2] is not None and (shape[1] or 0) > (shape[2] or 0) else "NCW"
    if rank == 2:
        return "NC"
    return ""


def guess_kind(layout: str) -> str:
    return "image" if layout in ("NCHW", "NHWC") else "sensor" if layout in ("NCW", "NWC") else "tensor"


_LIMITS = {k: (np.iinfo(k).min, np.iinfo(k).max) for k in ("uint8", "int8", "int16")}


def check_tensor(spec: TensorSpec, data: Any, *, source: str = "input") -> np.ndarray:
    """``data`` as a ``[batch, *example_shape]`` array of the spec's element type, or ``InputError``.

    One example without its batch dimension is accepted as a batch of one. Integers are converted
    only when every value fits the type; floats into an integer type only when they are whole."""
    where = f"{source} {spec.name!r}"
    try:
        array = data if isinstance(data, np.ndarray) else np.asarray(data)
    except ValueError:
        raise InputError(f"{where} is nested unevenly", f"send a tensor of shape {_shape_text(spec)}") from None
    if array.dtype.kind == "b":
        raise InputError(f"{where} holds true/false", f"send numbers of type {spec.dtype}")
    if array.dtype.kind not in "iuf":  # strings, objects, complex numbers, dates: nothing a tensor holds
        raise InputError(f"{where} holds values that are not numbers", f"send numbers of type {spec.dtype}")
    if array.shape == spec.example_shape:
        array = array[np.newaxis]
    if array.ndim != len(spec.shape) or array.shape[1:] != spec.example_shape:
        raise InputError(
            f"{where} has shape {list(array.shape)}, the model takes {_shape_text(spec)}",
            _shape_fix(spec, array.shape),
        )
    if array.shape[0] == 0:
        raise InputError(f"{where} has no examples", "send at least one")
    if array.dtype == spec.dtype:
        if array.dtype.kind == "f" and not np.isfinite(array.sum(dtype=np.float64)):
            raise _not_finite(array, where)
        return array
    if spec.dtype == "float32":
        converted = array.astype(np.float32)
        if not np.isfinite(converted.sum(dtype=np.float64)):
            raise _not_finite(converted, where)
        return converted
    low, high = _LIMITS[spec.dtype]
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise InputError(
            f"{where} holds fractions, the model takes {spec.dtype}", f"send whole numbers in [{low}, {high}]"
        )
    if array.size and (array.min() < low or array.max() > high):
        raise InputError(
            f"{where} holds values in [{array.min()}, {array.max()}], past {spec.dtype}'s [{low}, {high}]",
            f"send values in [{low}, {high}]",
        )
    return array.astype(spec.dtype)


def _not_finite(array: np.ndarray, where: str) -> InputError:
    bad = np.argwhere(~np.isfinite(array))[0]
    return InputError(
        f"{where} holds NaN or infinity (first at index {bad.tolist()})", "send finite numbers", row=int(bad[0])
    )


def _shape_text(spec: TensorSpec) -> str:
    return (
        "["
        + ", ".join("N" if d is None else str(d) for d in spec.shape)
        + "]"
        + (f" ({spec.layout})" if spec.layout else "")
    )


def _shape_fix(spec: TensorSpec, got: tuple[int, ...]) -> str:
    if len(got) == len(spec.shape) and sorted(got[1:]) == sorted(spec.example_shape) and spec.layout:
        dims = "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"
        return f"the dimensions are in another order: send them as {spec.layout}, {dims}"
    return f"send a batch of shape {_shape_text(spec)}"
