"""Tensor inputs: the spec, the one check every batch goes through, and what edgekit reads off an ONNX file."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent.agent import BACKLOG_BYTES, _backlog_rows
from device_agent.errors import InputError, SchemaError
from device_agent.outputs import OutputSpec
from device_agent.predlog import _input_json
from device_agent.runtimes.onnx import OnnxRuntime
from device_agent.schema import InputSchema
from device_agent.tensors import TensorSpec, check_tensor, guess_layout
from edgekit.errors import ModelLoadError
from edgekit.models.loading import OnnxModel, load_model

IMAGE = TensorSpec("x", "float32", (None, 3, 4, 4), "NCHW", "image")


def conv_model(shape, *, layout="NCHW", softmax=True, elem=TensorProto.FLOAT, batch="N") -> bytes:
    """A one-Conv network over ``shape`` (channels first, or last with a Transpose), Gemm to 3 classes."""
    rng = np.random.default_rng(0)
    channels = shape[0] if layout == "NCHW" else shape[-1]
    spatial = shape[1:] if layout == "NCHW" else shape[:-1]
    nodes, source = [], "x"
    if elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        source = "xf"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [source], ["xt"], perm=[0, 3, 1, 2]))
        source = "xt"
    nodes += [
        helper.make_node("Conv", [source, "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["scores"]),
    ]
    output = "scores"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1))
        output = "probabilities"
    inits = [
        numpy_helper.from_array(rng.normal(size=(2, channels, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(2 * int(np.prod(spatial)), 3)).astype(np.float32), "G"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", elem, [batch, *shape])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_spec_refuses_what_cannot_be_served():
    with pytest.raises(SchemaError, match="element type 'float64'.*export the model with one of float32"):
        TensorSpec("x", "float64", (None, 3, 4, 4))
    with pytest.raises(SchemaError, match=r"shape \[None, 3, None, 4\].*fixed sizes"):
        TensorSpec("x", "float32", (None, 3, None, 4))
    with pytest.raises(SchemaError, match="layout 'NHW' does not fit"):
        TensorSpec("x", "float32", (None, 3, 4, 4), "NHW")
    assert IMAGE.channels == 3 and IMAGE.spatial == (4, 4) and IMAGE.example_shape == (3, 4, 4)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((None, 3, 96, 96), "NCHW"), ((None, 96, 96, 3), "NHWC"), ((None, 3, 128), "NCW"), ((None, 128, 3), "NWC")],
)
def test_layouts_are_guessed_from_where_the_channels_are(shape, layout):
    assert guess_layout(shape) == layout


def test_the_check_names_shape_order_type_and_values():
    good = np.zeros((2, 3, 4, 4), np.float32)
    assert check_tensor(IMAGE, good) is good  # no copy on the common path
    assert check_tensor(IMAGE, good[0]).shape == (1, 3, 4, 4)  # one example is a batch of one
    assert check_tensor(IMAGE, good.tolist()).dtype == np.float32
    with pytest.raises(InputError, match=r"\[2, 4, 4, 3\].*another order: send them as NCHW, \[N, 3, 4, 4\]$"):
        check_tensor(IMAGE, np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(InputError, match=r"has shape \[2, 3, 4\], the model takes \[N, 3, 4, 4\]"):
        check_tensor(IMAGE, np.zeros((2, 3, 4)))
    bad = good.copy()
    bad[1, 2, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"NaN or infinity \(first at index \[1, 2, 3, 3\]\); send finite"):
        check_tensor(IMAGE, bad)
    with pytest.raises(InputError, match="not numbers"):
        check_tensor(IMAGE, [[["a"] * 4] * 4] * 3)
    with pytest.raises(InputError, match="nested unevenly"):
        check_tensor(IMAGE, [[1, 2], [3]])


def test_integer_tensors_convert_only_what_fits():
    spec = TensorSpec("x", "uint8", (None, 2, 2, 1), "NHWC", "image")
    assert check_tensor(spec, [[[[0], [255]], [[3], [4]]]]).dtype == np.uint8
    with pytest.raises(InputError, match=r"values in \[0, 300\], past uint8's \[0, 255\]"):
        check_tensor(spec, [[[[0], [300]], [[3], [4]]]])
    with pytest.raises(InputError, match="fractions, the model takes uint8"):
        check_tensor(spec, [[[[0.5], [1]], [[3], [4]]]])


def test_a_tensor_schema_round_trips_and_reads_requests():
    schema = InputSchema.of_tensor(IMAGE)
    again = InputSchema.from_dict(schema.to_dict())
    assert again == schema and again.layout == "tensor" and again.tensor == IMAGE
    batch = np.ones((2, 3, 4, 4), np.float32)
    assert check_tensor(IMAGE, batch).shape == schema.check({"x": batch.tolist()}).shape == (2, 3, 4, 4)
    with pytest.raises(InputError, match="names inputs 'y'.*the model has one input, 'x'"):
        schema.check({"y": batch.tolist()})
    with pytest.raises(InputError, match="encoded items.*no preprocessing.*--preprocess"):
        schema.check([{"b64": "aGVsbG8="}])


def test_onnx_tensor_inputs_are_read_with_layout_and_kind():
    model = OnnxModel.from_bytes(conv_model((3, 6, 6)))
    assert model.input.tensor == TensorSpec("x", "float32", (None, 3, 6, 6), "NCHW", "image")
    nhwc = OnnxModel.from_bytes(conv_model((6, 6, 3), layout="NHWC"))
    assert nhwc.input.tensor.layout == "NHWC"
    raw = OnnxModel.from_bytes(conv_model((1, 6, 6), elem=TensorProto.UINT8))
    assert raw.input.tensor.dtype == "uint8"
    assert model.predict(np.zeros((5, 3, 6, 6), np.float32)).labels.shape == (5,)


def test_a_network_exported_without_softmax_is_a_classifier_of_logits():
    model = OnnxModel.from_bytes(conv_model((3, 6, 6), softmax=False))
    assert model.output.task == "classification" and model.output.logits
    prediction = model.predict(np.random.default_rng(1).normal(size=(4, 3, 6, 6)).astype(np.float32))
    assert np.allclose(prediction.probabilities.sum(axis=1), 1.0)
    assert OutputSpec.from_dict(model.output.to_dict()) == model.output


def test_inputs_with_open_sizes_are_refused_with_the_export_fix():
    data = conv_model((3, 6, 6))
    import onnx

    proto = onnx.load_model_from_string(data)
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(ModelLoadError, match=r"shape \[\?, 3, \?, 6\].*fixed input sizes"):
        OnnxModel.from_bytes(proto.SerializeToString())


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_exported_with_a_fixed_batch_serves_any_batch(batch):
    runtime = OnnxRuntime()
    runtime.load(conv_model((3, 6, 6), batch=batch))
    X = np.random.default_rng(2).normal(size=(7, 3, 6, 6)).astype(np.float32)
    together = runtime.predict(X)["probabilities"]  # 7 rows: slices of the fixed batch, the last one padded
    apart = np.concatenate(
        [runtime.predict(np.repeat(X[i : i + 1], batch, axis=0))["probabilities"][:1] for i in range(7)]
    )
    assert together.shape == (7, 3) and np.allclose(together, apart, atol=1e-6)


def test_waiting_tensors_are_bounded_in_bytes_not_rows():
    schema = InputSchema.of_tensor(TensorSpec("x", "float32", (None, 3, 96, 96), "NCHW", "image"))
    rows = _backlog_rows(100_000, schema)
    assert rows * 3 * 96 * 96 * 4 <= BACKLOG_BYTES < (rows + 1) * 3 * 96 * 96 * 4
    assert _backlog_rows(100_000, InputSchema("X", ("a", "b"))) == 100_000


def test_the_prediction_log_keeps_a_tensor_as_its_bytes():
    import base64
    import json

    tensor = np.arange(48, dtype=np.float32).reshape(3, 4, 4)
    doc = json.loads(_input_json(tensor))
    restored = np.frombuffer(base64.b64decode(doc["b64"]), dtype=doc["dtype"]).reshape(doc["shape"])
    assert np.array_equal(restored, tensor)
    assert json.loads(_input_json(np.array([1.5, 2.0]))) == [1.5, 2.0]
    frame = json.loads(_input_json(np.zeros((3, 96, 96), np.float32)))  # a camera frame is named, not kept
    assert frame == {"dtype": "float32", "shape": [3, 96, 96], "omitted": "over 16 KB"}


def test_encoded_items_past_the_batch_bytes_are_refused_before_decoding():
    """5,000 one-pixel PNGs are 500 KB of JSON but would decode into 2.9 GB of 224x224x3 float32."""
    from device_agent.tensors import MAX_BATCH_BYTES

    spec = TensorSpec("x", "float32", (None, 3, 224, 224), "NCHW", "image")
    schema = InputSchema.of_tensor(spec, preprocess={"image": {}})
    most = MAX_BATCH_BYTES // spec.example_bytes
    with pytest.raises(InputError, match=f"holds {most + 1} items.*send at most {most} items a request"):
        schema.check([{"b64": ""}] * (most + 1), source="request")


def test_numbers_only_complex_or_dates_are_refused():
    with pytest.raises(InputError, match="not numbers"):
        check_tensor(IMAGE, np.zeros((1, 3, 4, 4), np.complex64))
    with pytest.raises(InputError, match="not numbers"):
        check_tensor(IMAGE, np.zeros((1, 3, 4, 4), "datetime64[s]"))


def test_json_nested_too_deeply_is_a_400():
    from device_agent.wsgi import HttpError, Request

    request = Request("POST", "/", {}, {"content-type": "application/json"}, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(HttpError, match="nested too deeply") as caught:
        request.json_object()
    assert caught.value.status == 400


def test_a_v2_header_length_of_unicode_digits_is_a_400():
    from device_agent.v2_codec import split_body
    from device_agent.wsgi import HttpError, Request

    headers = {"content-type": "application/octet-stream", "inference-header-content-length": "²"}
    with pytest.raises(HttpError, match="is not a length") as caught:
        split_body(Request("POST", "/v2/models/m/infer", {}, headers, b"{}"))
    assert caught.value.status == 400


def test_a_network_of_values_is_served_as_a_regressor_with_task(tmp_path, cli):
    source = tmp_path / "scores.onnx"
    source.write_bytes(conv_model((3, 6, 6), softmax=False))
    out = tmp_path / "values.onnx"
    assert cli("convert", source, "--task", "regression", "-o", out).exit_code == 0
    model = load_model(out)
    assert model.output.task == "regression" and model.output.value_output == "scores"
    assert model.predict(np.zeros((2, 3, 6, 6), np.float32)).values.shape == (2, 3)
    refused = cli("convert", source, "--task", "regression", "-o", out, "--embedding", "none")
    assert refused.exit_code == 0  # converting a converted regressor keeps it one
    bad = tmp_path / "bad.onnx"
    result = cli("convert", tmp_path / "values.onnx", "--task", "classification", "-o", bad)
    assert result.exit_code == 2 and "cannot be read as classification" in result.stderr
