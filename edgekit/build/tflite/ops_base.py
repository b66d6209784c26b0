"""What the ONNX operator translations share: the registry (``converts``), and reading an ONNX node's
constants and inferred shapes. The translations are in ``onnx_ops`` (dense, element-wise, activations),
``spatial_ops`` (convolution, pooling, resizing) and ``shape_ops`` (reshapes, transposes, concatenation,
padding); ``onnx_ops.graph_from_onnx`` calls them. Imports: numpy, ``graph``, edgekit.errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgekit.build.tflite.graph import TO_NHWC, Builder, Value
from edgekit.errors import ConversionError

CONVERTERS: dict[str, Callable[[Builder, Any, dict[str, Any]], None]] = {}


def converts(*op_types: str) -> Callable:
    def register(function: Callable) -> Callable:
        for op_type in op_types:
            CONVERTERS[op_type] = function
        return function

    return register


def _out(b: Builder, node: Any, tensor: str, layout: str, order: np.ndarray | None = None) -> None:
    b.values[node.output[0]] = Value(tensor, layout, _onnx_shape(b, node.output[0]), order)


def _onnx_shape(b: Builder, name: str) -> tuple[int, ...]:
    shape = b.onnx_shapes.get(name)
    if shape is None:
        raise ConversionError(
            f"the shape of {name!r} is not known", "export the model with fixed shapes", path=b.source
        )
    return shape


def _nhwc_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    full = tuple(shape[i] for i in TO_NHWC[len(shape)])
    return (full[0], 1, *full[1:]) if len(shape) == 3 else full


def _constant(b: Builder, node: Any, index: int, what: str) -> np.ndarray:
    name = node.input[index] if len(node.input) > index else ""
    if name not in b.constants:
        raise b.refuse(node, f"its {what} must be a constant")
    return b.constants[name]


def _pair(values: Any, default: int, rank: int) -> tuple[int, int]:
    values = list(values) if values is not None else [default] * rank
    return (1, values[0]) if rank == 1 else (values[0], values[1])
