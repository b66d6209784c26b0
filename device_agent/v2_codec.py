"""The Open Inference Protocol v2 on the wire: request bodies in, response bodies out.

This module knows the protocol and nothing of models: a request's JSON header and its binary
tensors (Triton's binary tensor data extension) become named numpy arrays, and named arrays become
a response body, JSON or JSON followed by raw tensors. :mod:`device_agent.v2` maps both to the agent.

Why the binary path is built the way it is: a request body is already one ``bytes`` object (waitress
read it whole), so each binary tensor is a ``np.frombuffer`` view of it, copied only when its
offset is not aligned for its element type (the JSON header's length decides that, and a runtime
reading a misaligned float is slow on x86 and may fault elsewhere). A request therefore holds its
body plus at most one copy of each tensor. BYTES tensors (4-byte little-endian length, then the
bytes) are the exception: they become Python objects, as typed columns need them anyway.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .wsgi import JSON_TYPES, HttpError, Request, Response

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES = "BYTES"
# element types by v2 datatype; BYTES (variable length) is handled apart
NUMERIC = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPES = (*NUMERIC, BYTES)
_OF_DTYPE = {dtype: name for name, dtype in NUMERIC.items()}
_UNSUPPORTED_PARAMETERS = ("shared_memory_region", "classification")
_LENGTH = struct.Struct("<I")


_DIGITS = re.compile(r"[0-9]+")


def datatype_of(dtype: Any) -> str:
    """The v2 datatype of a numpy or schema dtype ("float32" -> "FP32"; strings and objects -> BYTES)."""
    if dtype in ("string", "any", object):
        return BYTES
    return _OF_DTYPE.get(np.dtype(dtype), BYTES)


@dataclass(frozen=True)
class RequestInput:
    """One input as the JSON header declares it; its data is decoded by :func:`decode_inputs`."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None  # the JSON "data", when not binary
    binary_size: int | None = None

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class InferRequest:
    """A parsed request header: its id, inputs, and the outputs asked for (name -> as binary)."""

    id: Any
    inputs: tuple[RequestInput, ...]
    outputs: dict[str, bool] | None  # None: every output
    binary_output: bool  # the request's "binary_data_output": the default of outputs not named

    def binary(self, name: str) -> bool:
        return self.outputs.get(name, self.binary_output) if self.outputs else self.binary_output


@dataclass(frozen=True)
class ResponseOutput:
    """One output to answer: ``data`` is a numeric array, or a sequence of str for BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any


# -- requests ----------------------------------------------------------------------------------------
def split_body(request: Request) -> tuple[dict[str, Any], memoryview]:
    """The JSON header of an infer request and the binary tensors after it (empty without any)."""
    encoding = request.header("content-encoding").strip().lower()
    if encoding not in ("", "identity"):
        raise HttpError(415, f"the body is {encoding}-encoded; send it uncompressed")
    media = request.media_type
    if media not in JSON_TYPES and not media.endswith("+json") and media != "application/octet-stream":
        raise HttpError(415, f"the body is {media}; send JSON, or application/octet-stream with binary tensors")
    body = request.body
    length = request.header(HEADER_LENGTH.lower())
    if length:
        if not _DIGITS.fullmatch(length) or int(length) > len(body):  # str.isdigit() takes '²'
            raise HttpError(400, f"{HEADER_LENGTH}: {length} is not a length within the body of {len(body)} bytes")
        header, blob = body[: int(length)], memoryview(body)[int(length) :]
    else:
        header, blob = body, memoryview(b"")
    try:
        doc = json.loads(header or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        hint = f" (is {HEADER_LENGTH} right?)" if length else ""
        raise HttpError(400, f"the inference request header is not JSON{hint}: {exc}") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "the inference request must be a JSON object")
    return doc, blob


def read_request(doc: dict[str, Any]) -> InferRequest:
    """The request's fields checked for form (not yet against the model), or ``InputError`` naming the field."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("the request has no 'inputs' list", 'send {"inputs": [{"name", "shape", "datatype", "data"}]}')
    parsed = tuple(_read_input(item, i) for i, item in enumerate(inputs))
    names = [p.name for p in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"input {repeated[0]!r} is given more than once", "send each input once")
    parameters = _parameters(doc, "the request")
    outputs = doc.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise InputError("'outputs' is not a list", 'send [{"name": ..., "parameters": {"binary_data": true}}]')
    requested = None
    if outputs:
        requested = {}
        for i, item in enumerate(outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InputError(f"outputs[{i}] has no name", 'send {"name": "<output>"}')
            params = _parameters(item, f"output {item['name']!r}")
            requested[item["name"]] = _flag(params, "binary_data", f"output {item['name']!r}")
    return InferRequest(doc.get("id"), parsed, requested, _flag(parameters, "binary_data_output", "the request"))


def _read_input(item: Any, index: int) -> RequestInput:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InputError(f"inputs[{index}] has no name", 'send {"name", "shape", "datatype", "data"} for each input')
    name, where = item["name"], f"input {item['name']!r}"
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{where} has shape {shape!r}", "send the shape as a list of sizes, e.g. [1, 64]")
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise InputError(f"{where} has datatype {datatype!r}", f"use one of {', '.join(DATATYPES)}")
    size = _parameters(item, where).get("binary_data_size")
    if size is None and "data" not in item:
        raise InputError(f"{where} has no data", "send 'data', or binary data with parameters.binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InputError(f"{where} has binary_data_size {size!r}", "send the size of its binary data in bytes")
    return RequestInput(name, datatype, tuple(shape), item.get("data"), size)


def _parameters(doc: dict[str, Any], where: str) -> dict[str, Any]:
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"{where} has parameters that are not an object", 'send "parameters": {"name": value}')
    for key in _UNSUPPORTED_PARAMETERS:
        if key in params:
            raise InputError(f"{where} asks for {key!r}, which this server does not support", f"leave {key!r} out")
    return params


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"{where} has {key} = {value!r}", f"send {key} as true or false")
    return value


def decode_inputs(inputs: Sequence[RequestInput], blob: memoryview) -> dict[str, np.ndarray]:
    """Each input's data as an array of its shape: numeric arrays of the datatype's element type
    (views of the body where aligned), BYTES as object arrays of ``bytes`` (binary) or ``str`` (JSON)."""
    arrays, offset = {}, 0
    for item in inputs:
        if item.binary_size is None:
            arrays[item.name] = _from_json(item)
            continue
        end = offset + item.binary_size
        if end > len(blob):
            raise InputError(
                f"input {item.name!r} has binary_data_size {item.binary_size}, past the end of the body "
                f"({len(blob) - offset} bytes left)",
                f"send binary_data_size as the byte length of each input's data, in input order ({HEADER_LENGTH})",
            )
        arrays[item.name] = _from_binary(item, blob[offset:end])
        offset = end
    if offset != len(blob):
        raise InputError(
            f"the body has {len(blob) - offset} bytes after the last input's binary data",
            f"set {HEADER_LENGTH} to the JSON header's length and binary_data_size of every binary input",
        )
    return arrays


def _from_binary(item: RequestInput, data: memoryview) -> np.ndarray:
    if item.datatype == BYTES:
        return _bytes_elements(item, data)
    dtype = NUMERIC[item.datatype].newbyteorder("<")
    expected = item.elements * dtype.itemsize
    if len(data) != expected:
        raise InputError(
            f"input {item.name!r} has {len(data)} bytes of binary data, its shape {list(item.shape)} "
            f"of {item.datatype} needs {expected}",
            "send shape and binary_data_size that agree",
        )
    array = np.frombuffer(data, dtype=dtype).reshape(item.shape)
    if sys.byteorder != "little" or not array.flags.aligned:
        array = array.astype(NUMERIC[item.datatype])  # the one copy: native order, aligned for the runtime
    return array


def _bytes_elements(item: RequestInput, data: memoryview) -> np.ndarray:
    """BYTES binary data: each element a 4-byte little-endian length and that many bytes."""
    elements, position, end = [], 0, len(data)
    while position < end:
        if position + 4 > end:
            break
        (length,) = _LENGTH.unpack_from(data, position)
        position += 4
        if position + length > end:
            break
        elements.append(bytes(data[position : position + length]))
        position += length
    if position != end or len(elements) != item.elements:
        raise InputError(
            f"input {item.name!r} holds {len(elements)} whole BYTES elements in {end} bytes, "
            f"its shape {list(item.shape)} needs {item.elements}",
            "send each element as a 4-byte little-endian length followed by its bytes",
        )
    return _object_array(elements, item.shape)


def _from_json(item: RequestInput) -> np.ndarray:
    where = f"input {item.name!r}"
    try:
        array = np.asarray(item.data, dtype=object if item.datatype == BYTES else None)
    except ValueError:
        raise InputError(f"{where} data is nested unevenly", f"send {item.elements} values, flat or nested") from None
    if array.ndim > 1 and array.shape != item.shape:
        raise InputError(
            f"{where} data is nested as {list(array.shape)}, its shape is {list(item.shape)}",
            "nest the data as the shape says, or send it flat",
        )
    if array.size != item.elements:
        raise InputError(
            f"{where} has {array.size} values, its shape {list(item.shape)} needs {item.elements}",
            "send as many values as the shape holds",
        )
    if item.datatype == BYTES:
        flat = array.ravel()
        if not all(isinstance(v, str) for v in flat):
            raise InputError(f"{where} is BYTES but holds values that are not strings", "send strings")
        return flat.reshape(item.shape)
    return _numeric(array, item, where).reshape(item.shape)


def _numeric(array: np.ndarray, item: RequestInput, where: str) -> np.ndarray:
    """JSON values as the datatype's element type, converted only when nothing is lost."""
    dtype = NUMERIC[item.datatype]
    kind = array.dtype.kind
    if dtype.kind == "b":
        if kind != "b":
            raise InputError(f"{where} is BOOL but holds values that are not true/false", "send true or false")
        return array
    if kind == "O" and dtype.kind == "f":  # numbers and null: null is a missing value (NaN)
        flat = array.ravel()
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in flat):
            try:
                return np.array([np.nan if v is None else v for v in flat], dtype=dtype)
            except OverflowError:
                raise InputError(
                    f"{where} holds a number too large for {item.datatype}", "send smaller numbers"
                ) from None
    if kind not in "iuf" or (kind == "f" and dtype.kind in "iu"):
        what = "whole numbers" if dtype.kind in "iu" else "numbers"
        raise InputError(f"{where} is {item.datatype} but holds values that are not {what}", f"send {what}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InputError(
                f"{where} holds values in [{low}, {high}], past {item.datatype}'s [{info.min}, {info.max}]",
                f"send values in [{info.min}, {info.max}]",
            )
    return array.astype(dtype, copy=False)


def _object_array(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


# -- responses ---------------------------------------------------------------------------------------
def encode_response(doc: dict[str, Any], outputs: Sequence[ResponseOutput], request: InferRequest) -> Response:
    """The response body: ``doc`` with its ``outputs``; outputs asked for as binary follow the JSON
    header as raw little-endian bytes, with ``Inference-Header-Content-Length`` saying where."""
    described, blobs = [], []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if request.binary(output.name):
            blob = _binary(output)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(output)
        described.append(entry)
    header = json.dumps({**doc, "outputs": described}, separators=(",", ":")).encode()
    if not blobs:
        return Response(200, header, "application/json")
    return Response(200, b"".join([header, *blobs]), "application/octet-stream", [(HEADER_LENGTH, str(len(header)))])


def _binary(output: ResponseOutput) -> bytes | memoryview:
    if output.datatype == BYTES:
        encoded = [value.encode() if isinstance(value, str) else bytes(value) for value in output.data]
        return b"".join(_LENGTH.pack(len(e)) + e for e in encoded)
    array = np.ascontiguousarray(output.data, dtype=NUMERIC[output.datatype].newbyteorder("<"))
    return memoryview(array).cast("B")


def _json_data(output: ResponseOutput) -> list[Any]:
    if output.datatype == BYTES:
        return [v if isinstance(v, str) else bytes(v).decode("utf-8", "replace") for v in output.data]
    array = np.asarray(output.data).ravel()
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
        # through the shortest decimal that reads back as the same float32: JSON gets 0.1, not
        # 0.10000000149011612, and a client parsing into float32 gets the same bits
        return array.astype(str).astype(np.float64).tolist()
    return array.tolist()
