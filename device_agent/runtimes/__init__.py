"""Runtimes: the seam between the agent and an inference engine.

A runtime has three methods: ``load(model_bytes)``, ``predict(rows) -> {output name: array}`` and
``close()``. ``open_runtime`` picks the one a model format needs; each engine is imported only here,
on first use, so a device with only LiteRT never imports onnxruntime and vice versa.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runtime(Protocol):
    name: str

    def load(self, model: bytes) -> None: ...

    def predict(self, rows: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def open_runtime(model_format: str, model: bytes, *, threads: int = 1, source: str = "model") -> Runtime:
    """A loaded runtime for ``model`` (bytes of a ``model_format`` file)."""
    if model_format == "onnx":
        from .onnx import OnnxRuntime

        runtime: Runtime = OnnxRuntime(threads=threads, source=source)
    elif model_format == "tflite":
        from .litert import LiteRtRuntime

        runtime = LiteRtRuntime(threads=threads, source=source)
    else:
        from ..errors import RuntimeUnavailableError

        raise RuntimeUnavailableError(
            f"{source}: no runtime for model format {model_format!r} in this version of the agent"
        )
    runtime.load(model)
    return runtime
