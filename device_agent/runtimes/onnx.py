"""ONNX Runtime behind the runtime seam, with its errors translated where they enter."""

from __future__ import annotations

import numpy as np

from ..errors import ModelError, RuntimeUnavailableError

INSTALL_HINT = "pip install onnxruntime (or 'edgekit-ml[agent]')"


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailableError(f"onnxruntime is not installed; {INSTALL_HINT}") from exc
    return onnxruntime


class OnnxRuntime:
    """One ``InferenceSession`` on the CPU. ``threads`` bounds intra-op parallelism (1 on a busy Pi)."""

    name = "onnxruntime"

    def __init__(self, *, threads: int = 1, source: str = "model") -> None:
        self.threads = threads
        self.source = source
        self._session = None
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def load(self, model: bytes) -> None:
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initializers are noise to a user
        try:
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind classes with no common base
            raise ModelError(
                self.source,
                "onnxruntime",
                f"cannot load the model: {_first_line(exc)}",
                "check it is a valid ONNX file for this onnxruntime version",
            ) from exc
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._run = _direct_run(self._session)
        self._run_options = ort.RunOptions()
        batch = self._session.get_inputs()[0].shape[0] if self._session.get_inputs()[0].shape else None
        # a model exported with a fixed batch (often 1): larger batches run in slices of that size
        self._fixed_batch = batch if isinstance(batch, int) and batch > 0 and len(self.input_names) == 1 else None

    def predict(self, rows: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one matrix (its single input) or on a feed of named inputs (typed columns)."""
        if self._session is None:
            raise ModelError(self.source, "onnxruntime", "has no model loaded", "call load() first")
        fixed = self._fixed_batch
        if fixed is not None and not isinstance(rows, dict) and len(rows) != fixed:
            return self._in_slices(rows, fixed)
        try:
            feed = rows if isinstance(rows, dict) else {self.input_names[0]: rows}
            values = self._run(self.output_names, feed, self._run_options)
        except Exception as exc:
            raise ModelError(self.source, "onnxruntime", f"failed to run: {_first_line(exc)}") from exc
        return dict(zip(self.output_names, values, strict=True))

    def matrix_runner(self):
        """``predict`` for one matrix, as a closure with the names, the options and the error translation
        bound once: on a one-row model the checks ``predict`` makes before each call are a tenth of the call.
        None for a model ``predict`` must slice (a fixed batch) or feed several inputs."""
        if self._session is None or self._fixed_batch is not None or len(self.input_names) != 1:
            return None
        run, names, options, feed_name = self._run, self.output_names, self._run_options, self.input_names[0]

        def run_matrix(rows: np.ndarray) -> dict[str, np.ndarray]:
            try:
                values = run(names, {feed_name: rows}, options)
            except Exception as exc:
                raise ModelError(self.source, "onnxruntime", f"failed to run: {_first_line(exc)}") from exc
            return dict(zip(names, values, strict=True))

        return run_matrix

    def _in_slices(self, rows: np.ndarray, fixed: int) -> dict[str, np.ndarray]:
        """A batch through a model that takes exactly ``fixed`` rows: in slices of that size, the last
        padded with copies of its first row and the padding's answers dropped."""
        parts = []
        for start in range(0, len(rows), fixed):
            part = rows[start : start + fixed]
            short = fixed - len(part)
            if short:
                part = np.concatenate([part, np.repeat(part[:1], short, axis=0)])
            answer = self.predict(part)
            parts.append({name: value[: fixed - short] for name, value in answer.items()})
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    def close(self) -> None:
        self._session = None


def _direct_run(session):
    """The session's own ``run`` (its C++ binding) when this onnxruntime exposes it, else the Python one.

    ``InferenceSession.run`` checks the feed's names and types in Python before every call, about 1.5 µs
    of a 7 µs single-row prediction; the agent has checked the rows against the schema already, and the
    binding still refuses a wrong feed (the error is translated the same way). Output names and run
    options are resolved once at load."""
    binding = getattr(getattr(session, "_sess", None), "run", None)
    return binding if callable(binding) else session.run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
