"""TFLite models behind the runtime seam: ai-edge-litert first, tflite-runtime as the fallback.

tflite-runtime 2.14 (its last release) was built against NumPy 1 and cannot create an
Interpreter under NumPy 2; when it is the only TFLite runtime and NumPy is 2.x we say exactly
that instead of surfacing its import error. Full-integer models get their inputs quantized and
their outputs dequantized here, so callers always see float arrays.
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import ModelError, RuntimeUnavailableError

INSTALL_HINT = "pip install ai-edge-litert (or 'edgekit-ml[tflite]')"
MAX_INTERPRETERS = 4


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError as exc:
        raise RuntimeUnavailableError(f"no TFLite runtime is installed; {INSTALL_HINT}") from exc
    except (
        Exception
    ) as exc:  # tflite-runtime built for NumPy 1 fails with AttributeError/ImportError variants under NumPy 2
        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeUnavailableError(
                f"tflite-runtime is the only TFLite runtime here and it cannot run under NumPy {np.__version__} "
                f"(its last release, 2.14, was built for NumPy 1); {INSTALL_HINT}, or pip install 'numpy<2'"
            ) from exc
        raise RuntimeUnavailableError(f"tflite-runtime failed to import ({exc}); {INSTALL_HINT}") from exc
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeUnavailableError(
            "tflite-runtime is the only TFLite runtime here and it cannot create an Interpreter "
            f"under NumPy {np.__version__} "
            f"(its last release, 2.14, was built for NumPy 1); {INSTALL_HINT}, or pip install 'numpy<2'"
        )
    return Interpreter, "tflite-runtime"


class LiteRtRuntime:
    name = "litert"

    def __init__(self, *, threads: int = 1, source: str = "model") -> None:
        self.threads, self.source = threads, source
        self._model: bytes | None = None
        self._class = None
        # One interpreter per recent batch size: resizing an interpreter re-plans and re-allocates
        # every tensor, which costs more than a small model's inference when sizes alternate. Each comes
        # with its lock: an interpreter is one set of tensors, and LiteRT lets go of the GIL while it
        # invokes, so two requests on one interpreter (the HTTP server's worker threads) overwrote each
        # other's input (a wrong answer) or failed ("at least 1 reference to internal data").
        self._by_batch: dict[int | None, tuple[object, threading.Lock]] = {}
        self._creating = threading.Lock()  # the cache's insertions and evictions, not the calls

    def load(self, model: bytes) -> None:
        self._class, self.name = _interpreter_class()
        self._model = model
        interpreter, _ = self._interpreter_for(None)
        self._input = interpreter.get_input_details()[0]
        self._outputs = interpreter.get_output_details()
        self.input_names = [d["name"] for d in interpreter.get_input_details()]  # all, so callers can refuse
        self.output_names = [o["name"] for o in self._outputs]
        # What predict needs, decided once: np.issubdtype and dict lookups per call cost as much as a tiny model.
        self._quantize_input = _quantizer(self._input)
        self._output_plan = [(o["name"], o["index"], *_dequantizer(o)) for o in self._outputs]

    def _interpreter_for(self, batch: int | None) -> tuple[object, threading.Lock]:
        """The interpreter sized for ``batch`` rows and the lock its calls are made under."""
        ready = self._by_batch.get(batch)
        if ready is not None:
            return ready
        with self._creating:
            ready = self._by_batch.get(batch)  # made by another thread while this one waited
            return ready if ready is not None else self._new_interpreter(batch)

    def _new_interpreter(self, batch: int | None) -> tuple[object, threading.Lock]:
        try:
            interpreter = self._class(model_content=self._model, num_threads=self.threads)
            if batch is not None:
                interpreter.resize_tensor_input(self._input["index"], [batch, *self._input["shape"][1:]])
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(
                self.source, self.name, f"cannot load the model: {exc}", "check it is a valid .tflite file"
            ) from exc
        if len(self._by_batch) >= MAX_INTERPRETERS:  # a request still using the evicted one keeps it (and its lock)
            self._by_batch.pop(next(iter(self._by_batch)))
        ready = self._by_batch[batch] = (interpreter, threading.Lock())
        return ready

    def predict(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self._model is None:
            raise ModelError(self.source, self.name, "has no model loaded", "call load() first")
        interpreter, lock = self._interpreter_for(len(rows))
        try:
            quantized = self._quantize_input(rows)
            with lock:  # concurrent requests of one size take turns; ``get_tensor`` answers copies
                interpreter.set_tensor(self._input["index"], quantized)
                interpreter.invoke()
                raw = [interpreter.get_tensor(index) for _, index, _, _ in self._output_plan]
        except (ValueError, RuntimeError) as exc:
            raise ModelError(self.source, self.name, f"failed to run: {exc}") from exc
        return {
            name: values if scale is None else (values.astype(np.float32) - zero) * scale
            for (name, _, scale, zero), values in zip(self._output_plan, raw, strict=True)
        }

    @property
    def input_details(self) -> dict:
        """The input tensor as LiteRT describes it: name, shape, dtype, quantization (scale, zero point)."""
        return self._input

    @property
    def output_details(self) -> list[dict]:
        return self._outputs

    def close(self) -> None:
        self._model = None
        self._by_batch.clear()


def _quantizer(detail: dict):
    """rows -> what the input tensor holds: a cast for float inputs, scale/round/clip for integer ones."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return lambda rows: np.ascontiguousarray(rows, dtype=dtype)
    scale, zero = detail["quantization"]
    if not scale:  # raw integers (a uint8 image model without quantization): cast, never divide by 0
        return lambda rows: np.ascontiguousarray(rows, dtype=dtype)
    info = np.iinfo(dtype)

    def quantized(rows: np.ndarray) -> np.ndarray:
        if rows.dtype == dtype:  # already the tensor's integers, quantized by the caller
            return np.ascontiguousarray(rows)
        return np.clip(np.round(rows / scale + zero), info.min, info.max).astype(dtype)

    return quantized


def _dequantizer(detail: dict) -> tuple[float | None, int]:
    """(scale, zero point) for an integer output that needs dequantizing, else (None, 0)."""
    scale, zero = detail["quantization"]
    return (scale, zero) if np.dtype(detail["dtype"]).kind in "iu" and scale else (None, 0)
