"""The Open Inference Protocol v2 (KServe v2, Triton, MLServer): the agent's model behind a second API.

    GET  /v2                                         server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready           200 while serving (open: probes carry no token)
    GET  /v2/models/<name>[/versions/<v>]            model metadata: inputs, outputs, platform
    GET  /v2/models/<name>[/versions/<v>]/ready      200 while serving
    POST /v2/models/<name>[/versions/<v>]/infer      inference, JSON or with binary tensors

Why a second protocol: Triton's and KServe's clients (``tritonclient``, ``kserve``) and the tools
built on them speak v2, and its binary tensors spare a camera frame the JSON round trip. The same
``Agent.predict`` answers both APIs, so the checks, the monitor and the prediction log are one.

The model is described from its input schema (:mod:`device_agent.schema`): a matrix model has one
input ``[-1, features]``, a typed-columns model one ``[-1, 1]`` input per column (BYTES for
strings), a tensor model its tensors with the batch as -1. A classifier answers a label output
(INT64, or BYTES for string labels) and its probabilities (FP32 ``[N, classes]``); a regressor its
values (FP64 ``[N, targets]``). Prediction ids (for ``:feedback``) travel in the response's
parameters as ``edgekit_ids``, joined by commas: the spec allows only strings, numbers and booleans
there. The wire format is :mod:`device_agent.v2_codec`; this module maps it to the agent.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .config import ServerConfig
from .errors import AgentError, InputError
from .outputs import REGRESSION, OutputSpec
from .schema import InputSchema
from .serving import PredictResult
from .v2_codec import (
    BYTES,
    DATATYPES,
    InferRequest,
    RequestInput,
    ResponseOutput,
    datatype_of,
    decode_inputs,
    encode_response,
    read_request,
    split_body,
)
from .version import __version__
from .wsgi import HttpError, Request, Response, error_response, json_response

SERVER_NAME = "edgekit-agent"
EXTENSIONS = ("binary_tensor_data",)
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflowlite"}
HEALTH_PREFIX = "/v2/health/"  # answered before the token check, as /healthz is
_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<verb>ready|infer))?$")


class V2Served(Protocol):
    """What the v2 routes need of an agent: the model being served, described, and predictions."""

    @property
    def serving(self) -> Any: ...  # None until a model is loaded

    @property
    def model_info(self) -> dict[str, Any]: ...

    @property
    def schema(self) -> InputSchema: ...

    @property
    def spec(self) -> OutputSpec: ...

    @property
    def model_format(self) -> str: ...  # "onnx" or "tflite"

    @property
    def monitor(self) -> Any: ...  # refused requests are counted in its window (record_error)

    def predict(self, rows: Any) -> PredictResult: ...


@dataclass(frozen=True)
class TensorMeta:
    """One input or output as the model metadata lists it; -1 is a dimension of any size (the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepts: tuple[str, ...] = ()  # more datatypes a client may send (a column the model drops takes any)
    flat_ok: bool = False  # a column: [N] is accepted for [N, 1]
    encoded: bool = False  # a tensor with preprocessing: BYTES [N] of encoded items (JPEG, PNG, WAV, .npy) too
    role: str = ""  # of an output: what of the prediction it carries ("labels", "probabilities", "values")
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        return {**doc, "parameters": self.parameters} if self.parameters else doc

    def fits(self, shape: Sequence[int], datatype: str) -> bool:
        if self.encoded and datatype == BYTES:  # one encoded file per example
            return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        if self.flat_ok and len(shape) == 1:
            return True
        return len(shape) == len(self.shape) and all(m in (-1, d) for m, d in zip(self.shape, shape, strict=True))

    def shape_to_send(self, datatype: str) -> str:
        if self.flat_ok or (self.encoded and datatype == BYTES):
            return "[N] or [N, 1]"
        return "[" + ", ".join("N" if d == -1 else str(d) for d in self.shape) + "]"


# -- routes -------------------------------------------------------------------------------------------
def route(agent: V2Served, config: ServerConfig, request: Request) -> Response:
    """The answer to a request under /v2 (the caller has checked the token, except for /v2/health/)."""
    path = request.path.rstrip("/") or "/"
    if path == "/v2":
        _allow(request, "GET")
        return json_response({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})
    if path in ("/v2/health/live", "/v2/health/ready"):
        _allow(request, "GET")
        return _ready(agent) if path.endswith("ready") else Response(200, b"", "text/plain")
    match = _MODEL.match(path)
    if not match:
        return error_response(404, f"no route {request.method} {request.path}; the v2 API is under /v2/models/<name>")
    if agent.serving is None:
        return _ready(agent)
    info = agent.model_info
    if match["name"] != info["name"]:
        return error_response(404, f"no model named {match['name']!r}; this agent serves {info['name']!r}")
    if match["version"] is not None and match["version"] != str(info["version"]):
        return error_response(
            404,
            f"{info['name']!r} has no version {match['version']!r} here; this agent serves version {info['version']}",
        )
    if match["verb"] == "infer":
        _allow(request, "POST")
        try:
            return _infer(agent, config, request)
        except InputError as exc:
            return error_response(400, str(exc))
        except AgentError as exc:
            return error_response(500, str(exc))
    _allow(request, "GET")
    return _ready(agent) if match["verb"] == "ready" else json_response(model_metadata(agent))


def _ready(agent: V2Served) -> Response:
    if agent.serving is None:
        return error_response(503, "no model is loaded yet")
    return Response(200, b"", "text/plain")


def _allow(request: Request, *methods: str) -> None:
    if request.method not in methods:
        raise HttpError(405, f"{request.path} takes {' or '.join(methods)}", [("Allow", ", ".join(methods))])


def model_metadata(agent: V2Served) -> dict[str, Any]:
    """The v2 model metadata of the model being served."""
    info = agent.model_info
    return {
        "name": info["name"],
        "versions": [str(info["version"])],
        "platform": PLATFORMS.get(agent.model_format, agent.model_format),
        "inputs": [meta.to_dict() for meta in model_inputs(agent.schema)],
        "outputs": [meta.to_dict() for meta in model_outputs(agent.spec)],
    }


# -- what the model takes and answers -----------------------------------------------------------------
def _per_object(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``build(obj)`` once per object: a schema and a spec live as long as their model, and describing
    them on every request cost a third of a batch-1 request's time in this module."""
    memo: dict[int, tuple[Any, Any]] = {}

    @functools.wraps(build)
    def cached(obj: Any) -> Any:
        hit = memo.get(id(obj))
        if hit is None or hit[0] is not obj:  # the object itself is kept, so its id is not reused meanwhile
            if len(memo) >= 8:  # models swapped many times: forget the old ones
                memo.clear()
            hit = memo[id(obj)] = (obj, build(obj))
        return hit[1]

    return cached


@_per_object
def model_inputs(schema: InputSchema) -> tuple[TensorMeta, ...]:
    """The model's inputs in v2 terms, for every layout of the input schema."""
    tensors = _tensors(schema)
    if tensors:
        # a model that decodes its own input (images, audio) also takes the encoded files, as BYTES [N]
        encoded = len(tensors) == 1 and getattr(schema, "preprocess", None) is not None
        return tuple(
            TensorMeta(
                t.name,
                datatype_of(t.dtype),
                (-1, *(-1 if d is None else int(d) for d in t.shape[1:])),
                (BYTES,) if encoded else (),
                encoded=encoded,
                parameters={"edgekit_encoded_items": True} if encoded else {},
            )
            for t in tensors
        )
    if schema.columns is not None:
        return tuple(
            TensorMeta(c.name, datatype_of(c.dtype), (-1, 1), DATATYPES if c.dtype == "any" else (), flat_ok=True)
            for c in schema.columns
        )
    return (TensorMeta(schema.input_name, datatype_of(schema.dtype), (-1, schema.width)),)


def _tensors(schema: InputSchema) -> tuple[Any, ...]:
    """The schema's tensor specs, whether it holds several (``tensors``) or one (``tensor``)."""
    tensors = getattr(schema, "tensors", None)
    if tensors:
        return tuple(tensors)
    tensor = getattr(schema, "tensor", None)
    return () if tensor is None else (tensor,)


@_per_object
def model_outputs(spec: OutputSpec) -> tuple[TensorMeta, ...]:
    """The outputs a request can get: a classifier's label and probabilities, a regressor's values."""
    if spec.task == REGRESSION:
        return (TensorMeta(spec.value_output or "value", "FP64", (-1, -1), role="values"),)
    label = TensorMeta(spec.label_output or "label", _label_datatype(spec.labels), (-1,), role="labels")
    if spec.probabilities_output is None:
        return (label,)
    # the classes' order of the probabilities' columns: a JSON list in a string (parameters hold no lists)
    order = {"edgekit_labels": json.dumps(list(spec.labels), default=str)} if spec.labels else {}
    classes = len(spec.labels) or -1
    return label, TensorMeta(spec.probabilities_output, "FP32", (-1, classes), role="probabilities", parameters=order)


def _label_datatype(labels: Sequence[Any]) -> str:
    if all(isinstance(c, bool) for c in labels) and labels:
        return "BOOL"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in labels):
        return "INT64"  # integer classes, or none known (the label is the argmax)
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in labels):
        return "FP64"
    return BYTES


# -- inference ----------------------------------------------------------------------------------------
def _infer(agent: V2Served, config: ServerConfig, request: Request) -> Response:
    doc, blob = split_body(request)
    infer = read_request(doc)
    schema, spec, name = agent.schema, agent.spec, agent.model_info["name"]
    offered = model_outputs(spec)
    _check_requested(infer, offered)
    try:
        rows = _model_rows(schema, config, infer, blob)
    except InputError:
        agent.monitor.record_error("bad_input")  # counted as v1 counts rows its schema check refuses
        raise
    result = agent.predict(rows)
    answer: dict[str, Any] = {"model_name": name, "model_version": str(result.model_version)}
    if infer.id is not None:
        answer["id"] = infer.id
    answer["parameters"] = {"edgekit_ids": ",".join(result.ids)}
    return encode_response(answer, _outputs(result, offered, infer), infer)


def _model_rows(schema: InputSchema, config: ServerConfig, infer: InferRequest, blob: memoryview) -> Any:
    """The request's inputs as ``Agent.predict`` takes them, checked against the model's metadata first:
    names, datatypes, shapes and the row limit are refused before a byte of tensor data is read."""
    expected = model_inputs(schema)
    rows = _check_declared(infer.inputs, expected)
    if rows > config.max_rows:
        raise HttpError(
            413,
            f"the request has {rows} rows, over the limit of {config.max_rows} ([server] max_rows); "
            "send smaller batches",
        )
    return _agent_rows(schema, expected, decode_inputs(infer.inputs, blob))


def _check_declared(inputs: Sequence[RequestInput], expected: Sequence[TensorMeta]) -> int:
    """The batch size, once every input is one the model takes, of its datatype and shape, and none is missing."""
    by_name = {meta.name: meta for meta in expected}
    takes = f"the model takes {_names(by_name)} (GET /v2/models/<name> lists them)"
    for item in inputs:
        if item.name not in by_name:
            raise InputError(f"input {item.name!r} is not one of the model's inputs", takes, column=item.name)
    missing = [n for n in by_name if n not in {i.name for i in inputs}]
    if missing:
        raise InputError(f"the request lacks the input(s) {_names(missing)}", takes, column=missing[0])
    for item in inputs:
        meta = by_name[item.name]
        if item.datatype != meta.datatype and item.datatype not in meta.accepts:
            raise InputError(
                f"input {item.name!r} is {item.datatype}, the model takes {meta.datatype}",
                f"send {item.name!r} as {meta.datatype}",
                column=item.name,
            )
        if not meta.fits(item.shape, item.datatype):
            raise InputError(
                f"input {item.name!r} has shape {list(item.shape)}, the model takes {list(meta.shape)}",
                f"send {item.name!r} with shape {meta.shape_to_send(item.datatype)} for N rows",
                column=item.name,
            )
    batches = {item.name: item.shape[0] for item in inputs}
    if len(set(batches.values())) > 1:
        shown = ", ".join(f"{n!r}: {b}" for n, b in list(batches.items())[:4])
        raise InputError(f"the inputs differ in batch size ({shown})", "send the same number of rows in every input")
    return next(iter(batches.values()))


def _check_requested(infer: InferRequest, offered: Sequence[TensorMeta]) -> None:
    names = {meta.name for meta in offered}
    for name in infer.outputs or ():
        if name not in names:
            raise InputError(
                f"the request asks for output {name!r}, which the model has not", f"ask for {_names(names)}"
            )


def _agent_rows(schema: InputSchema, expected: Sequence[TensorMeta], arrays: dict[str, np.ndarray]) -> Any:
    """What ``Agent.predict`` takes: the one array of a single-input model (or its encoded items, bytes
    from binary data and base64 strings from JSON, for the model's preprocessing), the columnar form
    (``{column: [values]}``, which ``schema.check`` checks cell by cell) of typed columns."""
    if schema.columns is not None and not _tensors(schema):
        return {meta.name: _column_values(meta.name, arrays[meta.name]) for meta in expected}
    if len(expected) == 1:
        array = arrays[expected[0].name]
        if array.dtype == object:
            return [item if isinstance(item, bytes) else {"b64": item} for item in array.ravel()]
        return array
    return {meta.name: arrays[meta.name] for meta in expected}


def _column_values(name: str, array: np.ndarray) -> list[Any]:
    flat = array.ravel()
    if flat.dtype != object:
        return flat.tolist()
    try:
        return [v.decode() if isinstance(v, bytes) else v for v in flat]
    except UnicodeDecodeError as exc:
        raise InputError(f"input {name!r} holds bytes that are not UTF-8 ({exc})", "send strings as UTF-8") from None


def _outputs(result: PredictResult, offered: Sequence[TensorMeta], infer: InferRequest) -> list[ResponseOutput]:
    """The outputs asked for (all, when none are named), in the order asked."""
    prediction = result.prediction
    rows = len(prediction.primary)
    made = {
        "values": lambda: prediction.values,
        "labels": lambda: prediction.labels,
        "probabilities": lambda: np.asarray(prediction.probabilities, dtype=np.float32).reshape(rows, -1),
    }
    by_name = {meta.name: meta for meta in offered}
    answered = []
    for name in infer.outputs or by_name:
        meta = by_name[name]
        data = made[meta.role]()
        if meta.role == "labels":
            data = _labels(data, meta.datatype)
        answered.append(ResponseOutput(name, meta.datatype, (rows,) if meta.role == "labels" else data.shape, data))
    return answered


def _labels(labels: np.ndarray, datatype: str) -> Any:
    if datatype == BYTES:
        return [v if isinstance(v, str) else str(v) for v in labels.tolist()]
    return np.asarray(labels, dtype={"INT64": np.int64, "BOOL": np.bool_, "FP64": np.float64}[datatype])


def _names(names: Any, limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
