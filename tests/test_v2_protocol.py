"""The Open Inference Protocol v2 on a real agent: Triton's own client, and raw HTTP for every refusal.

``tritonclient[http]`` is the reference client: what it sends (JSON or binary tensors, the
``Inference-Header-Content-Length`` framing, BYTES elements) is what Triton and KServe clients send.
Answers are compared with the v1 API's for the same rows: one model, two protocols, one answer.
"""

from __future__ import annotations

import http.client
import json
import re
import struct

import numpy as np
import pytest
import tritonclient.http as tritonhttp  # dev installs it: a missing install fails, never skips
from tritonclient.utils import InferenceServerException

from device_agent import Agent
from tests.agent_helpers import config_of, make_device

pytestmark = pytest.mark.network
MAX_ROWS = 100


# --- helpers ---------------------------------------------------------------------------------------


def start_agent(root, bundle, public_key, **server):
    config = make_device(root, bundle, public_key, window_rows=10_000, server={"max_rows": MAX_ROWS, **server})
    return Agent(config_of(config)).start(mqtt=False)


@pytest.fixture(scope="module")
def digits_agent(tmp_path_factory, bundle, keypair):
    agent = start_agent(tmp_path_factory.mktemp("v2digits"), bundle, keypair[1])
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def churn_agent(tmp_path_factory, churn, keypair):
    agent = start_agent(tmp_path_factory.mktemp("v2churn"), churn.bundle, keypair[1])
    yield agent
    agent.stop()


def port_of(agent) -> int:
    return agent.server.server_address[1]


def client_of(agent):
    return tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port_of(agent)}")


@pytest.fixture
def client(digits_agent):
    client = client_of(digits_agent)
    yield client
    client.close()


def raw(agent, method, path, body=b"", headers=None):
    """One request over http.client: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(agent), timeout=10)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def v1_predict(agent, instances):
    status, _, body = raw(agent, "POST", "/v1/models/digits:predict", {"instances": instances})
    assert status == 200, body
    return json.loads(body)


@pytest.fixture(scope="module")
def X(digits):
    return np.load(digits.test)["X"].astype(np.float32)


def input_name(agent) -> str:
    return agent.schema.input_name


def infer_input(name, array, *, binary):
    from tritonclient.utils import np_to_triton_dtype

    item = tritonhttp.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    return item.set_data_from_numpy(array, binary_data=binary)


def binary_body(header: dict, *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


# --- health and metadata -----------------------------------------------------------------------------


def test_health_server_and_model_metadata(digits_agent, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "3")
    assert not client.is_model_ready("digits", "4") and not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server["name"] == "edgekit-agent" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("digits")
    assert client.get_model_metadata("digits", "3") == meta
    assert meta["name"] == "digits" and meta["versions"] == ["3"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": input_name(digits_agent), "datatype": "FP32", "shape": [-1, 64]}]
    label, probabilities = meta["outputs"]
    assert label["datatype"] == "INT64" and label["shape"] == [-1]
    assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [-1, 10]
    assert json.loads(probabilities["parameters"]["edgekit_labels"]) == list(range(10))
    status, headers, body = raw(digits_agent, "GET", "/v2/health/live")
    assert status == 200 and body == b""


# --- inference ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_answers_as_v1_does(digits_agent, client, X, binary_in, binary_out):
    rows = X[:20]
    meta = client.get_model_metadata("digits")
    label, probabilities = (o["name"] for o in meta["outputs"])
    result = client.infer(
        "digits",
        [infer_input(input_name(digits_agent), rows, binary=binary_in)],
        outputs=[tritonhttp.InferRequestedOutput(n, binary_data=binary_out) for n in (label, probabilities)],
        request_id="req-7",
    )
    v1 = v1_predict(digits_agent, rows.tolist())
    assert result.as_numpy(label).dtype == np.int64 and result.as_numpy(label).tolist() == v1["predictions"]
    np.testing.assert_allclose(result.as_numpy(probabilities), v1["probabilities"], atol=1e-6)
    assert result.as_numpy(probabilities).shape == (20, 10)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "digits" and response["model_version"] == "3"
    ids = response["parameters"]["edgekit_ids"].split(",")
    assert len(ids) == 20 and len(set(ids) | set(v1["ids"])) == 40  # ids are per prediction, never reused


def test_default_outputs_are_binary_and_ids_take_feedback(digits_agent, client, X):
    result = client.infer("digits", [infer_input(input_name(digits_agent), X[:3], binary=True)])
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert len(names) == 2 and all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    ids = result.get_response()["parameters"]["edgekit_ids"].split(",")
    label = int(result.as_numpy(names[0])[0])
    status, _, body = raw(digits_agent, "POST", "/v1/models/digits:feedback", {"id": ids[0], "label": label})
    assert status == 200 and json.loads(body)["accepted"] == 1


def test_one_output_by_name_a_version_and_nested_json(digits_agent, client, X):
    meta = client.get_model_metadata("digits")
    label = meta["outputs"][0]["name"]
    result = client.infer(
        "digits",
        [infer_input(input_name(digits_agent), X[:1], binary=False)],
        model_version="3",
        outputs=[tritonhttp.InferRequestedOutput(label, binary_data=False)],
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == [label]
    assert result.as_numpy(label).tolist() == v1_predict(digits_agent, X[:1].tolist())["predictions"]
    with pytest.raises(InferenceServerException, match="serves version 3"):
        client.infer("digits", [infer_input(input_name(digits_agent), X[:1], binary=True)], model_version="4")
    nested = {
        "inputs": [{"name": input_name(digits_agent), "shape": [2, 64], "datatype": "FP32", "data": X[:2].tolist()}]
    }
    status, _, body = raw(digits_agent, "POST", "/v2/models/digits/infer", nested)
    assert (
        status == 200
        and json.loads(body)["outputs"][0]["data"] == v1_predict(digits_agent, X[:2].tolist())["predictions"]
    )


def test_binary_response_framing_over_raw_http(digits_agent, X):
    """The response a non-Triton client reads: JSON header, then the raw little-endian tensors."""
    name = input_name(digits_agent)
    header = {
        "inputs": [{"name": name, "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": 512}}],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_body(header, X[:2].astype("<f4").tobytes())
    status, response_headers, answer = raw(digits_agent, "POST", "/v2/models/digits/infer", body, headers)
    assert status == 200 and response_headers["content-type"] == "application/octet-stream"
    length = int(response_headers["inference-header-content-length"])
    doc = json.loads(answer[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
    assert sizes == [2 * 8, 2 * 10 * 4] and len(answer) == length + sum(sizes)
    labels = np.frombuffer(answer[length : length + 16], "<i8")
    assert labels.tolist() == v1_predict(digits_agent, X[:2].tolist())["predictions"]


# --- refusals ----------------------------------------------------------------------------------------

ROW = [0.0] * 64


def json_request(name="?", shape=(1, 64), datatype="FP32", data=ROW, **extra):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}], **extra}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda n: json_request(n, shape=(1, 63), data=[0.0] * 63), "has shape [1, 63], the model takes [-1, 64]"),
        (lambda n: json_request(n, datatype="FP64"), "is FP64, the model takes FP32"),
        (lambda n: json_request(n, datatype="FLOAT"), "has datatype 'FLOAT'"),
        (lambda n: json_request(n, data=[0.0] * 63), "has 63 values, its shape [1, 64] needs 64"),
        (lambda n: json_request(n, shape=(2, 64), data=[ROW, ROW[:-1]]), "nested unevenly"),
        (lambda n: json_request(n, data=["1"] * 64), "is FP32 but holds values that are not numbers"),
        (lambda n: json_request("pixels"), "input 'pixels' is not one of the model's inputs"),
        (lambda n: json_request(n, shape=(1, -64)), "has shape [1, -64]"),
        (lambda n: {"inputs": []}, "no 'inputs' list"),
        (lambda n: json_request(n, shape=(0, 64), data=[]), "has no rows"),
        (lambda n: {"inputs": [{"shape": [1, 64], "datatype": "FP32", "data": ROW}]}, "inputs[0] has no name"),
        (lambda n: {"inputs": [{"name": n, "shape": [1, 64], "datatype": "FP32"}]}, "has no data"),
        (lambda n: json_request(n, data=[float("nan")] * 64), "missing value"),
        (lambda n: json_request(n, outputs=[{"name": "logits"}]), "asks for output 'logits'"),
        (lambda n: json_request(n, parameters={"binary_data_output": "yes"}), "binary_data_output = 'yes'"),
        (
            lambda n: json_request(n, outputs=[{"name": "x", "parameters": {"classification": 3}}]),
            "'classification', which this server does not support",
        ),
    ],
)
def test_bad_json_requests_are_400_naming_the_field(digits_agent, make, message):
    status, _, body = raw(digits_agent, "POST", "/v2/models/digits/infer", make(input_name(digits_agent)))
    assert status == 400 and message in json.loads(body)["error"], body


def test_bad_binary_requests_are_400(digits_agent, X):
    name = input_name(digits_agent)
    data = X[:1].tobytes()

    def post(size, *tensors, header_length=None, shape=(1, 64)):
        header = {
            "inputs": [
                {"name": name, "shape": list(shape), "datatype": "FP32", "parameters": {"binary_data_size": size}}
            ]
        }
        body, headers = binary_body(header, *tensors)
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        status, _, answer = raw(digits_agent, "POST", "/v2/models/digits/infer", body, headers)
        return status, json.loads(answer).get("error")

    assert post(256, data) == (200, None)  # the good one, for contrast
    status, error = post(300, data)
    assert status == 400 and "binary_data_size 300, past the end of the body (256 bytes left)" in error
    status, error = post(252, data[:252])
    assert status == 400 and "has 252 bytes of binary data, its shape [1, 64] of FP32 needs 256" in error
    status, error = post(256, data, b"tail")
    assert status == 400 and "4 bytes after the last input's binary data" in error
    status, error = post(256, data, header_length=10**6)
    assert status == 400 and "Inference-Header-Content-Length: 1000000" in error
    status, error = post(256, data, header_length=5)
    assert status == 400 and "header is not JSON" in error
    nan = np.full((1, 64), np.nan, np.float32).tobytes()
    status, error = post(256, nan)
    assert status == 400 and "missing value" in error


def test_404_405_413_and_media_types(digits_agent, X):
    name = input_name(digits_agent)
    cases = [
        ("POST", "/v2/models/other/infer", "no model named 'other'; this agent serves 'digits'", 404),
        ("GET", "/v2/models/other", "no model named 'other'", 404),
        ("POST", "/v2/models/digits/versions/4/infer", "this agent serves version 3", 404),
        ("GET", "/v2/models/digits/versions/4/ready", "this agent serves version 3", 404),
        ("GET", "/v2/repository/index", "no route", 404),
        ("GET", "/v2/models/digits/infer", "takes POST", 405),
        ("POST", "/v2/models/digits", "takes GET", 405),
        ("DELETE", "/v2/health/live", "takes GET", 405),
    ]
    for method, path, message, code in cases:
        status, headers, body = raw(digits_agent, method, path, json_request(name) if method == "POST" else b"")
        assert status == code and message in json.loads(body)["error"], (path, body)
        if code == 405:
            assert headers["allow"] in ("GET", "POST")
    big = json_request(name, shape=(MAX_ROWS + 1, 64), data=[ROW] * (MAX_ROWS + 1))
    status, _, body = raw(digits_agent, "POST", "/v2/models/digits/infer", big)
    assert status == 413 and f"over the limit of {MAX_ROWS}" in json.loads(body)["error"]
    status, _, body = raw(
        digits_agent,
        "POST",
        "/v2/models/digits/infer",
        json.dumps(json_request(name)).encode(),
        {"Content-Type": "text/csv"},
    )
    assert status == 415
    status, _, body = raw(digits_agent, "POST", "/v2/models/digits/infer", b"\x1f\x8b", {"Content-Encoding": "gzip"})
    assert status == 415 and "uncompressed" in json.loads(body)["error"]
    status, _, body = raw(
        digits_agent, "POST", "/v2/models/digits/infer", b"{nope", {"Content-Type": "application/json"}
    )
    assert status == 400 and "not JSON" in json.loads(body)["error"]


# --- typed columns -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def churn_rows(churn, churn_agent):
    from device_agent.tabular import read_table

    table, _, _ = read_table(churn.test_csv, "label", columns=churn_agent.schema.columns)
    complete = [r for r in table.tolist() if not any(v is None or v != v for v in r)]  # v2 has no null string
    return complete[:25]


def column_array(values, datatype):
    if datatype == "BYTES":
        return np.array([[str(v).encode()] for v in values], dtype=object)
    dtypes = {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}
    return np.array(values, dtype=dtypes[datatype]).reshape(-1, 1)


@pytest.mark.parametrize("binary", [False, True])
def test_typed_columns_with_bytes_inputs(churn_agent, churn_rows, binary):
    client = client_of(churn_agent)
    try:
        meta = client.get_model_metadata("churn")
        columns = churn_agent.schema.columns
        assert [i["name"] for i in meta["inputs"]] == [c.name for c in columns]
        kinds = {i["name"]: i["datatype"] for i in meta["inputs"]}
        assert (
            kinds["country"] == "BYTES"
            and kinds["age"] == "FP64"
            and all(i["shape"] == [-1, 1] for i in meta["inputs"])
        )
        inputs = []
        for j, column in enumerate(columns):
            array = column_array([r[j] for r in churn_rows], kinds[column.name])
            inputs.append(infer_input(column.name, array, binary=binary))
        result = client.infer("churn", inputs)
        label, probabilities = (o["name"] for o in meta["outputs"])
        status, _, body = raw(churn_agent, "POST", "/v1/models/churn:predict", {"instances": churn_rows})
        v1 = json.loads(body)
        assert result.as_numpy(label).tolist() == v1["predictions"]
        np.testing.assert_allclose(result.as_numpy(probabilities), v1["probabilities"], atol=1e-6)
    finally:
        client.close()


def test_typed_columns_refusals(churn_agent, churn_rows):
    columns = churn_agent.schema.columns
    row = churn_rows[0]

    def request(skip=None, **override):
        inputs = []
        for j, column in enumerate(columns):
            if column.name == skip:
                continue
            datatype = "BYTES" if isinstance(row[j], str) else "INT64" if isinstance(row[j], int) else "FP64"
            item = {"name": column.name, "shape": [1, 1], "datatype": datatype, "data": [row[j]]}
            inputs.append({**item, **override.get(column.name, {})})
        status, _, body = raw(churn_agent, "POST", "/v2/models/churn/infer", {"inputs": inputs})
        return status, json.loads(body).get("error")

    assert request()[0] == 200
    status, error = request(skip="country")
    assert status == 400 and "lacks the input(s) 'country'" in error
    status, error = request(country={"datatype": "INT64", "data": [3]})
    assert status == 400 and "input 'country' is INT64, the model takes BYTES" in error
    status, error = request(country={"shape": [2, 1], "data": ["DE", "FR"]})
    assert status == 400 and "differ in batch size" in error
    status, error = request(country={"data": ["Atlantis"]})
    assert status == 200  # an unseen category is served (and sketched as one), as in v1
    status, error = request(age={"shape": [1], "data": [41]})
    assert status == 200  # [N] for [N, 1]


def test_short_bytes_tensor_is_named(churn_agent, churn_rows):
    columns = churn_agent.schema.columns
    row = churn_rows[0]
    inputs, blobs = [], []
    for j, column in enumerate(columns):
        if isinstance(row[j], str):
            blob = struct.pack("<I", 10) + row[j].encode()  # says 10 bytes, has fewer
            inputs.append(
                {
                    "name": column.name,
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
        else:
            datatype = "INT64" if isinstance(row[j], int) else "FP64"
            inputs.append({"name": column.name, "shape": [1, 1], "datatype": datatype, "data": [row[j]]})
    body, headers = binary_body({"inputs": inputs}, *blobs)
    status, _, answer = raw(churn_agent, "POST", "/v2/models/churn/infer", body, headers)
    assert status == 400 and "whole BYTES elements" in json.loads(answer)["error"]


# --- the token ---------------------------------------------------------------------------------------


def test_bearer_token_guards_everything_but_health(tmp_path, bundle, keypair, X):
    agent = start_agent(tmp_path / "dev", bundle, keypair[1], token="s3cret")
    client = client_of(agent)
    try:
        assert client.is_server_live() and client.is_server_ready()  # probes carry no token
        for path in ("/v2", "/v2/models/digits", "/v2/models/digits/ready"):
            assert raw(agent, "GET", path)[0] == 401
            assert raw(agent, "GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.infer("digits", [infer_input(input_name(agent), X[:1], binary=True)])
        auth = {"Authorization": "Bearer s3cret"}
        assert client.is_model_ready("digits", headers=auth)
        result = client.infer("digits", [infer_input(input_name(agent), X[:1], binary=True)], headers=auth)
        assert len(result.get_response()["outputs"]) == 2
    finally:
        client.close()
        agent.stop()


# --- outputs of other models, and the binary path's edges --------------------------------------------


def answer_of(spec, prediction, *, binary):
    """A response body for ``prediction`` as the agent would encode it, read back by Triton's client."""
    from device_agent.serving import PredictResult
    from device_agent.v2 import _outputs, model_outputs
    from device_agent.v2_codec import InferRequest, encode_response

    result = PredictResult("b00t", 0, prediction, 1, spec.labels)
    request = InferRequest(None, (), None, binary)
    response = encode_response({"model_name": "m"}, _outputs(result, model_outputs(spec), request), request)
    length = dict(response.headers).get("Inference-Header-Content-Length")
    return tritonhttp.InferResult.from_response_body(response.body, header_length=length and int(length))


@pytest.mark.parametrize("binary", [False, True])
def test_string_labels_are_bytes_and_regression_values_fp64(binary):
    from device_agent.outputs import OutputSpec, Prediction
    from device_agent.v2 import model_outputs

    spec = OutputSpec("classification", ("cat", "dög"), "label", "probabilities")
    assert [(m.name, m.datatype, m.shape) for m in model_outputs(spec)] == [
        ("label", "BYTES", (-1,)),
        ("probabilities", "FP32", (-1, 2)),
    ]
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    result = answer_of(spec, Prediction(np.array(["cat", "dög"], object), probabilities), binary=binary)
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()] == ["cat", "dög"]
    assert np.array_equal(result.as_numpy("probabilities"), probabilities)  # float32 bits survive JSON too
    spec = OutputSpec("regression", value_output="variable")
    values = np.array([[1.5, 0.1], [2.5, 1 / 3]])
    result = answer_of(spec, Prediction(values=values), binary=binary)
    assert result.as_numpy("variable").dtype == np.float64 and np.array_equal(result.as_numpy("variable"), values)


def test_an_aligned_binary_tensor_is_served_from_the_body_and_sketched(digits_agent, X):
    """A JSON header whose length keeps the tensor aligned: the rows reach the runtime, the monitor and
    the prediction log as a read-only view of the request body, and nothing downstream writes into them."""
    name = input_name(digits_agent)
    header = {
        "inputs": [{"name": name, "shape": [4, 64], "datatype": "FP32", "parameters": {"binary_data_size": 1024}}]
    }
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 16)
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    before = digits_agent.monitor.current()["rows"]
    status, _, body = raw(digits_agent, "POST", "/v2/models/digits/infer", head + X[:4].tobytes(), headers)
    assert status == 200, body
    digits_agent.monitor.process()
    digits_agent.log.flush()
    assert digits_agent.monitor.current()["rows"] >= before + 4


def test_refusals_are_counted_as_bad_input(digits_agent, X):
    name = input_name(digits_agent)
    digits_agent.monitor.flush()  # a window of this test's requests only
    raw(digits_agent, "POST", "/v2/models/digits/infer", json_request(name, datatype="FP64"))
    raw(digits_agent, "POST", "/v2/models/digits/infer", json_request(name, data=[None] * 64))
    raw(digits_agent, "POST", "/v2/models/digits/infer", json_request(name, data=X[0].tolist()))
    digits_agent.monitor.flush()
    assert digits_agent.last_summary["errors"] == {"bad_input": 2} and digits_agent.last_summary["rows"] == 1


@pytest.mark.parametrize(
    "item, blob, expected",
    [
        (
            {"datatype": "UINT8", "shape": [2, 2], "data": [[0, 255], [7, 8]]},
            b"",
            np.array([[0, 255], [7, 8]], np.uint8),
        ),
        ({"datatype": "INT16", "shape": [2], "parameters": {"binary_data_size": 4}}, b"\x01\x00\xff\xff", [1, -1]),
        ({"datatype": "FP16", "shape": [1], "parameters": {"binary_data_size": 2}}, np.float16(1.5).tobytes(), [1.5]),
        ({"datatype": "BOOL", "shape": [3], "data": [True, False, True]}, b"", [True, False, True]),
        ({"datatype": "FP64", "shape": [2], "data": [1, None]}, b"", [1.0, np.nan]),
        ({"datatype": "BYTES", "shape": [2], "data": ["a", "b"]}, b"", ["a", "b"]),
        ({"datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}, b"\1\0\0\0a\0\0\0\0", [b"a", b""]),
    ],
)
def test_codec_decodes_every_datatype(item, blob, expected):
    from device_agent.v2_codec import decode_inputs, read_request

    request = read_request({"inputs": [{"name": "t", **item}]})
    array = decode_inputs(request.inputs, memoryview(blob))["t"]
    assert array.shape == tuple(item["shape"])
    if array.dtype == object:
        assert array.tolist() == expected
    else:
        np.testing.assert_array_equal(array, np.asarray(expected, dtype=array.dtype))


@pytest.mark.parametrize(
    "item, message",
    [
        ({"datatype": "UINT8", "shape": [2], "data": [0, 300]}, "past UINT8's [0, 255]"),
        ({"datatype": "INT64", "shape": [2], "data": [1, 2.5]}, "not whole numbers"),
        ({"datatype": "BOOL", "shape": [1], "data": [1]}, "not true/false"),
        ({"datatype": "BYTES", "shape": [1], "data": [3]}, "not strings"),
        ({"datatype": "FP32", "shape": [1], "data": [True]}, "not numbers"),
    ],
)
def test_codec_refuses_values_that_do_not_fit(item, message):
    from device_agent.errors import InputError
    from device_agent.v2_codec import decode_inputs, read_request

    with pytest.raises(InputError, match=re.escape(message)):
        decode_inputs(read_request({"inputs": [{"name": "t", **item}]}).inputs, memoryview(b""))


def test_tensor_models_take_their_tensor_or_encoded_files():
    """A tensor schema, without an agent (the tensor bundles are built elsewhere): its metadata, and what
    a request becomes for ``Agent.predict``: the tensor itself, or encoded files for its preprocessing."""
    from device_agent.config import ServerConfig
    from device_agent.errors import InputError
    from device_agent.schema import InputSchema
    from device_agent.v2 import _model_rows, model_inputs
    from device_agent.v2_codec import read_request

    tensors = pytest.importorskip("device_agent.tensors")
    spec = tensors.TensorSpec("image", "uint8", (None, 3, 4, 4), "NCHW", "image")
    plain, decoding = InputSchema.of_tensor(spec), InputSchema.of_tensor(spec, preprocess={"image": {}})
    assert [m.to_dict() for m in model_inputs(plain)] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 3, 4, 4]}
    ]
    assert model_inputs(decoding)[0].to_dict()["parameters"] == {"edgekit_encoded_items": True}

    def rows(schema, blob=b"", **item):
        request = read_request({"inputs": [{"name": "image", **item}]})
        return _model_rows(schema, ServerConfig(), request, memoryview(blob))

    pixels = np.arange(96, dtype=np.uint8).reshape(2, 3, 4, 4)
    binary = {"datatype": "UINT8", "shape": [2, 3, 4, 4], "parameters": {"binary_data_size": 96}}
    assert np.array_equal(rows(plain, pixels.tobytes(), **binary), pixels)
    files = struct.pack("<I", 3) + b"jpg" + struct.pack("<I", 3) + b"png"
    encoded = {"datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(files)}}
    assert rows(decoding, files, **encoded) == [b"jpg", b"png"]
    assert rows(decoding, datatype="BYTES", shape=[1, 1], data=["aGk="]) == [{"b64": "aGk="}]
    with pytest.raises(InputError, match="is BYTES, the model takes UINT8"):
        rows(plain, files, **encoded)
    with pytest.raises(InputError, match=re.escape("with shape [N] or [N, 1]")):
        rows(decoding, datatype="BYTES", shape=[1, 2], data=["a", "b"])
    with pytest.raises(InputError, match=re.escape("with shape [N, 3, 4, 4]")):
        rows(plain, datatype="UINT8", shape=[1, 4, 4, 3], data=[0] * 48)
