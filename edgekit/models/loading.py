"""Loading models and running them the same way, whatever they are.

``load_model(path)`` gives a ``SklearnModel`` (joblib or pickle) or an ``OnnxModel``; both have an
``input`` schema, an ``output`` spec and ``predict(X) -> Prediction``. Validation and the
quantization search compare models through this interface only.

Loading a pickle or joblib file runs code from that file: load only files you trust.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_agent.columns import Column
from device_agent.errors import AgentError, SchemaError
from device_agent.outputs import CLASSIFICATION, REGRESSION, OutputSpec, Prediction
from device_agent.runtimes.onnx import OnnxRuntime
from device_agent.schema import InputSchema
from device_agent.tensors import TENSOR_DTYPES, TensorSpec, guess_kind, guess_layout
from edgekit.errors import ModelLoadError, require
from edgekit.models.columns import has_tree_ensemble, passes_nan, typed_columns
from edgekit.models.data import default_feature_names

SKLEARN_SUFFIXES = (".joblib", ".pkl", ".pickle", ".sav")
ONNX_SUFFIXES = (".onnx",)
TFLITE_SUFFIXES = (".tflite",)
METADATA_INPUT = "edgekit.input"
METADATA_OUTPUT = "edgekit.output"
METADATA_SOURCE = "edgekit.source"
METADATA_QUANTIZATION = "edgekit.quantization"


class Model(Protocol):
    kind: str
    path: str
    input: InputSchema
    output: OutputSpec

    @property
    def size_bytes(self) -> int: ...

    def predict(self, X: np.ndarray) -> Prediction: ...

    def timed_call(self, X: np.ndarray) -> object: ...


def load_model(path: str | Path, *, threads: int = 1, pin_to: Any = None) -> SklearnModel | OnnxModel:
    """Load a model file. ``pin_to`` (a ``RuntimeTarget``) first lowers an ONNX file's IR version to
    what that runtime loads, for files written by a newer onnx than the runtime here reads."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError("no such file" if not path.exists() else "is not a file", "check the path", path=path)
    kind = _sniff(path)
    if kind == "tflite":
        return TfliteModel.from_bytes(path.read_bytes(), path=str(path), threads=threads)
    if kind == "onnx":
        return OnnxModel.from_bytes(path.read_bytes(), path=str(path), threads=threads, pin_to=pin_to)
    if kind == "sklearn":
        return SklearnModel.from_file(path)
    from edgekit.models.boosters import BoosterModel, sniff  # XGBoost/LightGBM save_model files: boosters.py

    if sniff(path):
        return BoosterModel.from_file(path, threads=threads)
    raise ModelLoadError(
        "is not a model edgekit reads",
        "give a scikit-learn model saved with joblib or pickle (.joblib, .pkl), an ONNX file (.onnx), "
        "or an XGBoost/LightGBM model saved with save_model (.json, .ubj, .txt)",
        path=path,
    )


def _sniff(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in TFLITE_SUFFIXES:
        return "tflite"
    if suffix in SKLEARN_SUFFIXES:
        return "sklearn"
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[:1] == b"\x80" or head[:2] in (b"x\x9c", b"x\xda"):  # pickle protocol 2+, or zlib-compressed joblib
        return "sklearn"
    return None


@dataclass
class SklearnModel:
    """A fitted scikit-learn estimator or Pipeline."""

    path: str
    estimator: Any
    input: InputSchema
    output: OutputSpec
    kind: str = "sklearn"

    @classmethod
    def from_file(cls, path: Path) -> SklearnModel:
        joblib = require("joblib")
        require("sklearn")
        try:
            estimator = joblib.load(path)
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError) as exc:
            raise ModelLoadError(
                f"is not a readable joblib/pickle file ({type(exc).__name__}: {exc})",
                "save the model with joblib.dump(model, path)",
                path=path,
            ) from exc
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ModelLoadError(
                f"needs code this environment lacks to unpickle ({exc})",
                "install the package the model was trained with",
                path=path,
            ) from exc
        return cls.from_estimator(estimator, path=str(path))

    @classmethod
    def from_estimator(cls, estimator: Any, *, path: str = "<estimator>") -> SklearnModel:
        if not hasattr(estimator, "predict"):
            raise ModelLoadError(
                f"holds a {type(estimator).__name__}, not a fitted scikit-learn model",
                "save a fitted estimator or Pipeline",
                path=path,
            )
        width = getattr(estimator, "n_features_in_", None)
        if width is None:
            raise ModelLoadError(
                f"holds a {type(estimator).__name__} that is not fitted (no n_features_in_)",
                "fit the model before saving it",
                path=path,
            )
        columns = typed_columns(estimator)
        if columns is not None:
            schema = InputSchema.of_columns(columns)
        else:
            names = getattr(estimator, "feature_names_in_", None)
            names = tuple(str(n) for n in names) if names is not None else default_feature_names(int(width))
            schema = InputSchema(
                input_name="X",
                feature_names=names,
                dtype="float64" if has_tree_ensemble(estimator) else "float32",
                allow_nan=_sklearn_allows_nan(estimator),
            )
        return cls(path=path, estimator=estimator, input=schema, output=_sklearn_output_spec(estimator))

    def retyped(self, dtypes: dict[str, str]) -> None:
        """Refine the columns' types from data that carries them (Parquet, a DataFrame)."""
        columns = typed_columns(self.estimator, dtypes)
        if columns is not None:
            self.input = InputSchema.of_columns(columns)

    @property
    def size_bytes(self) -> int:
        path = Path(self.path)
        return path.stat().st_size if path.is_file() else len(pickle.dumps(self.estimator))

    @property
    def sha256(self) -> str:
        import hashlib

        path = Path(self.path)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""

    @property
    def is_classifier(self) -> bool:
        return self.output.task == CLASSIFICATION

    def _frame(self, X: np.ndarray) -> Any:
        """Typed rows as the DataFrame the pipeline was fitted on (a matrix goes in as it is)."""
        return X if self.input.columns is None else to_frame(X, self.input.columns)

    def predict(self, X: np.ndarray) -> Prediction:
        X = self._frame(X)
        with warnings.catch_warnings():
            # A model fitted on a DataFrame warns when given an array; the columns are aligned already.
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            if self.is_classifier:
                probabilities = self.estimator.predict_proba(X) if hasattr(self.estimator, "predict_proba") else None
                return Prediction(labels=np.asarray(self.estimator.predict(X)), probabilities=probabilities)
            values = np.asarray(self.estimator.predict(X), dtype=np.float64)
            return Prediction(values=values.reshape(values.shape[0], -1))

    def timed_call(self, X: np.ndarray) -> object:
        """The one call that answers a request (probabilities carry the label), for latency."""
        X = self._frame(X)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            if self.is_classifier and hasattr(self.estimator, "predict_proba"):
                return self.estimator.predict_proba(X)
            return self.estimator.predict(X)


def _sklearn_output_spec(estimator: Any) -> OutputSpec:
    from sklearn.base import is_classifier

    if is_classifier(estimator):
        labels = tuple(c.item() if isinstance(c, np.generic) else c for c in estimator.classes_)
        return OutputSpec(
            CLASSIFICATION,
            labels=labels,
            label_output="label",
            probabilities_output="probabilities" if hasattr(estimator, "predict_proba") else None,
            ties_to_first=has_tree_ensemble(estimator),
        )
    return OutputSpec(REGRESSION, value_output="variable")


def _sklearn_allows_nan(estimator: Any) -> bool:
    try:
        return passes_nan(estimator)
    except (ImportError, AttributeError):
        return False


class _ConvertedModel:
    """What ONNX and TFLite models share: bytes in memory, a runtime from ``device_agent``."""

    data: bytes

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.data).hexdigest()

    def predict(self, X: np.ndarray) -> Prediction:
        return self.output.interpret(self.raw(X))


def _loaded(runtime: Any, data: bytes, path: str) -> Any:
    """``runtime`` with ``data`` loaded; the device side's error becomes this side's, naming the file."""
    try:
        runtime.load(data)
    except AgentError as exc:
        raise ModelLoadError(str(exc).split(": ", 1)[-1], path=path) from exc
    return runtime


@dataclass
class OnnxModel(_ConvertedModel):
    """An ONNX model run with onnxruntime on the CPU (the same runtime class the agent uses)."""

    path: str
    data: bytes
    input: InputSchema
    output: OutputSpec
    runtime: OnnxRuntime
    kind: str = "onnx"

    @classmethod
    def from_bytes(cls, data: bytes, *, path: str = "<model>", threads: int = 1, pin_to: Any = None) -> OnnxModel:
        from edgekit.models.targets import RuntimeTarget, pin

        onnx = require("onnx")
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as exc:  # protobuf's DecodeError and friends share no useful base
            raise ModelLoadError(
                "is not a valid ONNX file (it does not parse)",
                "re-export the model, or check the file is complete",
                path=path,
            ) from exc
        if not proto.graph.node:
            raise ModelLoadError("is not a valid ONNX model (its graph is empty)", "re-export the model", path=path)
        if pin_to is not None:
            data = pin(proto, pin_to, source=path).SerializeToString()
        elif proto.ir_version > RuntimeTarget().max_ir:
            raise ModelLoadError(
                f"has IR version {proto.ir_version}, newer than onnxruntime loads (at most {RuntimeTarget().max_ir})",
                f"pin it with 'edgekit convert {path} -o pinned.onnx'",
                path=path,
            )
        runtime = _loaded(OnnxRuntime(threads=threads, source=path), data, path)
        try:
            schema, spec = describe_onnx(proto)
        except ModelLoadError as exc:
            raise ModelLoadError(exc.problem, exc.fix, path=path) from exc
        return cls(path=path, data=data, input=schema, output=spec, runtime=runtime)

    def proto(self):
        return require("onnx").load_model_from_string(self.data)

    def raw(self, X: np.ndarray) -> dict[str, np.ndarray]:
        if self.input.columns is not None:
            return self.runtime.predict(self.input.feed(X))
        return self.runtime.predict(np.ascontiguousarray(X, dtype=np.dtype(self.input.dtype)))

    timed_call = raw


def to_frame(X: np.ndarray, columns: Any) -> Any:
    """Typed rows (an object array) as a pandas DataFrame of the columns' types; missing values as
    NaN, which is what scikit-learn's imputers look for in string columns too."""
    pandas = require("pandas", "tabular")
    data = {}
    for j, column in enumerate(columns):
        values = X[:, j]
        if column.dtype in ("string", "any"):  # any: a column the pipeline drops, kept as it came
            data[column.name] = pandas.Series([np.nan if v is None else v for v in values], dtype=object)
        elif column.dtype == "int64" and not any(isinstance(v, float) for v in values):
            data[column.name] = pandas.Series(values.astype(np.int64))
        elif column.dtype == "bool":
            data[column.name] = pandas.Series(values.astype(bool))
        else:
            data[column.name] = pandas.Series(values.astype(np.float64))
    return pandas.DataFrame(data)


def describe_onnx(proto: Any) -> tuple[InputSchema, OutputSpec]:
    """The input schema and output meaning of an ONNX model: from edgekit's metadata, else inferred."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_INPUT in meta and METADATA_OUTPUT in meta:
        return InputSchema.from_dict(json.loads(meta[METADATA_INPUT])), OutputSpec.from_dict(
            json.loads(meta[METADATA_OUTPUT])
        )
    schema = _infer_input(proto)
    return schema, _infer_output(proto, tensor_input=schema.tensor is not None)


_ONNX_DTYPES = {1: "float32", 11: "float64", 7: "int64", 6: "int32"}


def _graph_inputs(proto: Any) -> list[Any]:
    initializers = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def _infer_input(proto: Any) -> InputSchema:
    inputs = _graph_inputs(proto)
    if len(inputs) > 1:
        return _infer_columns(proto, inputs)
    if not inputs:
        raise ModelLoadError("has no inputs", "export the model with a [batch, features] input")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 2 or dims[1] is None:
        return InputSchema.of_tensor(_tensor_spec(inputs[0].name, tensor.elem_type, dims))
    dtype = _ONNX_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise ModelLoadError(
            f"input {inputs[0].name!r} has ONNX element type {tensor.elem_type}, not a number type edgekit feeds",
            "export the model with a float input",
        )
    allow_nan = any(n.op_type == "Imputer" for n in proto.graph.node)
    return InputSchema(
        input_name=inputs[0].name, feature_names=default_feature_names(dims[1]), dtype=dtype, allow_nan=allow_nan
    )


_COLUMN_DTYPES = {1: "float32", 11: "float64", 7: "int64", 9: "bool", 8: "string"}
_TENSOR_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16"}


def _tensor_spec(name: str, elem_type: int | str, dims: list[int | None]) -> TensorSpec:
    """A tensor input read off a model file: batch first, fixed sizes after it, layout guessed from
    the shape (channels are the small dimension) unless the bundle says otherwise."""
    dtype = _TENSOR_DTYPES.get(elem_type, elem_type) if isinstance(elem_type, int) else elem_type
    shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        raise ModelLoadError(
            f"input {name!r} has shape {shown}: edgekit serves a batch dimension first and fixed sizes after it",
            "export the model with fixed input sizes (e.g. torch.onnx.export with a fixed example input "
            "and dynamic_axes only on the batch)",
        )
    if dtype not in TENSOR_DTYPES:
        raise ModelLoadError(
            f"input {name!r} has element type {dtype}, not one edgekit feeds a tensor as",
            f"export the model with a {', '.join(TENSOR_DTYPES)} input",
        )
    layout = guess_layout(dims)
    try:
        return TensorSpec(name, dtype, tuple(dims), layout, guess_kind(layout))
    except SchemaError as exc:
        raise ModelLoadError(exc.problem, exc.fix) from exc


def _infer_columns(proto: Any, inputs: list[Any]) -> InputSchema:
    """A model of several ``[batch, 1]`` inputs (another exporter's DataFrame pipeline): typed columns,
    strings categorical, missing values allowed only where the graph has an imputer."""
    columns = []
    imputes = any(n.op_type in ("Imputer", "IsNaN") for n in proto.graph.node)
    for value in inputs:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        dtype = _COLUMN_DTYPES.get(tensor.elem_type)
        if len(dims) != 2 or dims[1] != 1 or dtype is None:
            raise ModelLoadError(
                f"has {len(inputs)} inputs and {value.name!r} is not a [batch, 1] column of numbers, flags or strings",
                "export one [batch, features] input, one [batch, 1] input per column, or one tensor input "
                "(edgekit serves tensor models with a single input)",
            )
        kind = "categorical" if dtype == "string" else "numeric"
        columns.append(Column(value.name, dtype, kind, imputes and dtype != "int64", dtype))
    return InputSchema.of_columns(columns)


def _infer_output(proto: Any, *, tensor_input: bool = False) -> OutputSpec:
    outputs = list(proto.graph.output)
    integer_like = [o for o in outputs if o.type.tensor_type.elem_type in (6, 7, 8)]  # int32, int64, string
    floats = [o for o in outputs if o.type.tensor_type.elem_type in (1, 11)]
    classes = _classes_initializer(proto)
    if integer_like:
        probabilities = floats[0].name if floats else None
        return OutputSpec(
            CLASSIFICATION,
            labels=tuple(classes or ()),
            label_output=integer_like[0].name,
            probabilities_output=probabilities,
        )
    if len(floats) == 1:
        last = [n for n in proto.graph.node if floats[0].name in n.output]
        width = _last_dim(floats[0])
        if last and last[0].op_type in ("Softmax", "LogSoftmax") or classes:
            labels = tuple(classes) if classes else tuple(range(width or 0))
            return OutputSpec(CLASSIFICATION, labels=labels, probabilities_output=floats[0].name)
        if tensor_input and (width or 0) > 1:  # a network ending in its last Gemm: class scores (logits)
            return OutputSpec(
                CLASSIFICATION, labels=tuple(range(width)), probabilities_output=floats[0].name, logits=True
            )
        return OutputSpec(REGRESSION, value_output=floats[0].name)
    raise ModelLoadError(
        f"has outputs {[o.name for o in outputs]} whose meaning edgekit cannot tell",
        "export a label and a probability output, or a single value output",
    )


def _classes_initializer(proto: Any) -> list[Any] | None:
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == "classes":
            values = numpy_helper.to_array(init).tolist()
            return [v.decode() if isinstance(v, bytes) else v for v in values]
    return None


def _last_dim(value_info: Any) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


@dataclass
class TfliteModel(_ConvertedModel):
    """A .tflite model run with LiteRT (the agent's runtime); edgekit's schema and output meaning
    travel in the flatbuffer's metadata."""

    path: str
    data: bytes
    input: InputSchema
    output: OutputSpec
    runtime: Any
    kind: str = "tflite"

    @classmethod
    def from_bytes(cls, data: bytes, *, path: str = "<model>", threads: int = 1) -> TfliteModel:
        from device_agent.runtimes.litert import LiteRtRuntime

        metadata = tflite_metadata(data, path)
        from edgekit.models.litert_banner import without_banner

        with without_banner():  # the first interpreter of a process logs an INFO line to stderr
            runtime = _loaded(LiteRtRuntime(threads=threads, source=path), data, path)
        if METADATA_INPUT not in metadata or METADATA_OUTPUT not in metadata:
            # another converter's file (TensorFlow's, Edge Impulse): the schema from the flatbuffer's tensors
            try:
                schema, spec = _describe_foreign_tflite(runtime, data)
            except ModelLoadError as exc:
                raise ModelLoadError(exc.problem, exc.fix, path=path) from exc
            return cls(path=path, data=data, input=schema, output=spec, runtime=runtime)
        return cls(
            path=path,
            data=data,
            input=InputSchema.from_dict(json.loads(metadata[METADATA_INPUT])),
            output=OutputSpec.from_dict(json.loads(metadata[METADATA_OUTPUT])),
            runtime=runtime,
        )

    @property
    def metadata(self) -> dict[str, str]:
        return tflite_metadata(self.data, self.path)

    def raw(self, X: np.ndarray) -> dict[str, np.ndarray]:
        if self.input.tensor is not None:
            return self.runtime.predict(np.ascontiguousarray(X))
        return self.runtime.predict(np.ascontiguousarray(X, dtype=np.float32))

    timed_call = raw


def _describe_foreign_tflite(runtime: Any, data: bytes) -> tuple[InputSchema, OutputSpec]:
    """Schema and output meaning of a .tflite edgekit did not write, from its tensors.

    A quantized input (int8 or uint8 with a scale) is fed real values, quantized by the runtime
    with the tensor's own scale and zero point, so clients and the preprocessing speak float32; an
    integer input without a scale takes raw integers (a uint8 image model). One output of width > 1
    is a classifier's scores: probabilities when a SOFTMAX (or LOGISTIC) makes them, else logits
    (a Keras model trained ``from_logits``), which ``OutputSpec`` softmaxes; width 1, a value."""
    detail = runtime.input_details
    if len(runtime.input_names) != 1:
        raise ModelLoadError("has several inputs", "edgekit serves .tflite models with one input")
    scale, zero = detail["quantization"]
    # scale 1 and zero point 0 quantize nothing: the model takes raw integers (a uint8 image model's pixels)
    quantized = bool(scale) and (scale, zero) != (1.0, 0)
    dtype = "float32" if quantized or np.dtype(detail["dtype"]).kind == "f" else np.dtype(detail["dtype"]).name
    dims = [None, *(int(d) for d in detail["shape"][1:])]
    schema = InputSchema.of_tensor(_tensor_spec(detail["name"], dtype, dims))
    outputs = runtime.output_details
    first = outputs[0]
    width = int(np.prod(first["shape"][1:])) if len(first["shape"]) > 1 else 1
    if width > 1:
        logits = not _scores_are_probabilities(data)
        return schema, OutputSpec(
            CLASSIFICATION, labels=tuple(range(width)), probabilities_output=first["name"], logits=logits
        )
    return schema, OutputSpec(REGRESSION, value_output=first["name"])


def _scores_are_probabilities(data: bytes) -> bool:
    """Whether the first output comes from a SOFTMAX or LOGISTIC, looking back through the QUANTIZE,
    DEQUANTIZE, RESHAPE and SQUEEZE a converter puts after it (TF's int8 models end in one)."""
    schema = require("ai_edge_litert.schema_py_generated", "tflite")
    ops = schema.BuiltinOperator
    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    producers = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        producers.update((op.Outputs(j), op) for j in range(op.OutputsLength()))
    op = producers.get(graph.Outputs(0))
    while op is not None:
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # old files fill only the deprecated field
        if builtin in (ops.SOFTMAX, ops.LOGISTIC):
            return True
        if builtin not in (ops.QUANTIZE, ops.DEQUANTIZE, ops.RESHAPE, ops.SQUEEZE):
            return False
        op = producers.get(op.Inputs(0))
    return False


def tflite_metadata(data: bytes, path: str = "<model>") -> dict[str, str]:
    """The flatbuffer's metadata entries whose names start with ``edgekit.``."""
    schema = require("ai_edge_litert.schema_py_generated", "tflite")
    try:
        model = schema.Model.GetRootAs(data, 0)
        entries = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            name = entry.Name().decode()
            if name.startswith("edgekit."):
                entries[name] = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode()
        return entries
    except Exception as exc:  # flatbuffers raises struct.error, IndexError, ... on a damaged file
        raise ModelLoadError(
            "is not a readable .tflite flatbuffer", "re-convert it with 'edgekit convert --target tflite'", path=path
        ) from exc
