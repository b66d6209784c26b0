"""The tensor-model fixtures as .tflite files from the CLI to the agent: the digits CNN (PNGs) and the keyword
spotter (WAVs) converted float32 and int8, validated against their ONNX model, packaged, and served by the
agent with LiteRT in NHWC: v1 encoded items one at a time and 32 at a time, v1 nested lists in the bundle's
layout (the ONNX model's NCHW refused by name), v2 with tritonclient, all answering as the ONNX model does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
tritonhttp = pytest.importorskip("tritonclient.http")

from device_agent import Agent  # noqa: E402
from device_agent.bundle import read_bundle  # noqa: E402
from device_agent.preprocess import Preprocess  # noqa: E402
from edgekit.models.loading import load_model  # noqa: E402
from tests.agent_helpers import config_of, make_device  # noqa: E402
from tests.conftest import Cli  # noqa: E402
from tests.test_tensor_models import b64, post  # noqa: E402

CASES = [("digits", "float"), ("digits", "int8"), ("kws", "float"), ("kws", "int8")]
BATCH = 32


@dataclass(frozen=True)
class Source:
    """One fixture as the CLI takes it: its ONNX model (preprocessing stored), encoded items, data files."""

    name: str
    onnx: Path
    items: Path  # a folder of PNGs or WAVs: calibration, baseline, and what the agent is sent
    suffix: str
    test: Path  # .npz of tensors in the ONNX model's layout, labelled
    labels: Path
    preprocess: Path
    kind: str  # the tensor's kind, as `edgekit inspect` prints it


@dataclass(frozen=True)
class Built:
    """A .tflite made from ``source`` by `edgekit convert`, its reports, and the bundle that carries it."""

    source: Source
    precision: str
    model: Path
    converted: dict
    validated: dict
    bundle: Path
    inspected: str


@pytest.fixture(scope="module")
def kws(tmp_path_factory) -> Source:
    """The keyword spotter, converted to ONNX with its ``[audio]`` preprocessing stored and its embedding exposed."""
    from edgekit.build.convert import convert_model
    from edgekit.local.tensor_fixtures import make_kws_cnn

    directory = tmp_path_factory.mktemp("kws")
    paths = make_kws_cnn(directory)
    onnx = directory / "kws.onnx"
    convert_model(paths["model"], str(onnx), preprocess=paths["preprocess"])
    return Source(
        "kws", onnx, Path(paths["test_audio"]), "wav", Path(paths["test"]), Path(paths["labels"]),
        Path(paths["preprocess"]), "audio",
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits(digits_cnn) -> Source:
    cnn = digits_cnn
    return Source("digits", cnn.onnx, cnn.images, "png", cnn.test, cnn.labels, cnn.preprocess, "image")


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def built(request, keypair, tmp_path_factory) -> Built:
    """convert (int8: calibrated on the item folder, searched with --eval, kept with --force), validate, package."""
    name, precision = request.param
    source: Source = request.getfixturevalue(name)
    cli, directory = Cli(), tmp_path_factory.mktemp(f"{name}-{precision}")
    model = directory / f"{name}.{precision}.tflite"
    quantize = ["--quantize", "int8", "--calibration", source.items, "--eval", source.test, "--force"]
    result = cli("convert", source.onnx, "--target", "tflite", *(quantize if precision == "int8" else []),
                 "-o", model, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    converted = json.loads(result.stdout)
    report = directory / "validate.json"
    limits = ["--max-accuracy-drop", 0.01, "--min-agreement", 0.99]
    result = cli("validate", model, "--reference", source.onnx, "--data", source.test, *limits, "--json")
    assert result.exit_code == 0, result.stderr
    report.write_text(result.stdout)
    bundle = directory / f"{name}-1.edgebundle"
    extra = ["--preprocess", source.preprocess] if name == "kws" else []  # the same table as the one stored
    result = cli("package", model, "--name", "cam", "--version", 1, "--baseline", source.items, "--labels",
                 source.labels, *extra, "--report", report, "--key", keypair[0], "-o", bundle)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    inspected = cli("inspect", bundle, "--pubkey", keypair[1])
    assert inspected.exit_code == 0, inspected.stderr
    return Built(source, precision, model, converted, json.loads(report.read_text()), bundle, inspected.stdout)


@pytest.fixture(scope="module")
def served(built, keypair, tmp_path_factory):
    config = make_device(tmp_path_factory.mktemp("device"), built.bundle, keypair[1], device_id="cam-1")
    with Agent(config_of(config)).start() as agent:
        assert agent.serving.runtime.name == "ai-edge-litert"  # LiteRT, not onnxruntime, runs the .tflite
        yield agent, agent.server.server_address[1]


def _items(source: Source) -> list[Path]:
    return sorted(source.items.glob(f"*.{source.suffix}"))


def _onnx_answers(source: Source, files: list[Path]) -> np.ndarray:
    """The ONNX model's probabilities for the encoded items, prepared by the preprocessing it stores (NCHW)."""
    model = load_model(source.onnx)
    preprocess = Preprocess.from_dict(model.input.preprocess, model.input.tensor)
    return model.predict(preprocess.batch([f.read_bytes() for f in files])).probabilities


def _class_names(source: Source) -> np.ndarray:
    return np.asarray(source.labels.read_text().split())


def test_convert_validate_and_package_keep_the_nhwc_layout(built):
    """The int8 .tflite is within the search's limits (and chosen, forced); validation against the ONNX model
    passes (float32 within 1e-4); the bundle's input schema and `edgekit inspect` say NHWC, with the
    preprocessing the ONNX model stored."""
    source, validated = built.source, built.validated
    assert validated["passed"] and validated["agreement"] >= (1.0 if built.precision == "float" else 0.99)
    if built.precision == "float":
        assert validated["max_abs_diff"] <= 1e-4
    else:
        search = built.converted["quantization"]
        assert search["chosen"].startswith("tflite int8") and all(t["within_limit"] for t in search["trials"])
    bundle = read_bundle(built.bundle)
    tensor, onnx_tensor = bundle.input_schema.tensor, load_model(source.onnx).input.tensor
    assert tensor.layout == "NHWC" and tensor.shape == (None, *onnx_tensor.shape[2:], onnx_tensor.shape[1])
    assert bundle.input_schema.preprocess == load_model(source.onnx).input.preprocess
    shape = ", ".join(str(d) for d in tensor.shape[1:])
    assert f"{source.kind} tensor 'x' float32 [N, {shape}] NHWC; preprocessing: {source.kind}" in built.inspected


def test_v1_answers_one_item_and_batches_of_32_as_the_onnx_model(served, built):
    """Every PNG or WAV of the fixture's folder, sent as base64 one at a time (the first) and 32 at a time
    (all), is answered with the ONNX model's class on at least 99 % of them (float32: all, within 1e-4)."""
    _, port = served
    files = _items(built.source)
    expected = _onnx_answers(built.source, files)
    names = _class_names(built.source)
    status, one = post(port, {"instances": [b64(files[0])]})
    assert status == 200 and one["predictions"] == [names[expected[0].argmax()]]
    probabilities = []
    for start in range(0, len(files), BATCH):
        status, answer = post(port, {"instances": [b64(f) for f in files[start : start + BATCH]]})
        assert status == 200, answer
        probabilities.extend(answer["probabilities"])
    probabilities = np.asarray(probabilities)
    assert np.mean(probabilities.argmax(1) == expected.argmax(1)) >= (1.0 if built.precision == "float" else 0.99)
    if built.precision == "float":
        assert np.abs(probabilities - expected).max() <= 1e-4


def test_v1_nested_lists_are_taken_in_the_bundles_layout_only(served, built):
    """Tensors sent as nested lists are NHWC, the .tflite's layout (the items as the bundle's preprocessing
    makes them are answered as the encoded items); the ONNX model's NCHW is refused with a 400 that names
    the NHWC layout."""
    _, port = served
    files = _items(built.source)[:4]
    schema = read_bundle(built.bundle).input_schema
    nhwc = Preprocess.from_dict(schema.preprocess, schema.tensor).batch([f.read_bytes() for f in files])
    status, answer = post(port, {"instances": nhwc.tolist()})
    assert status == 200, answer
    encoded = post(port, {"instances": [b64(f) for f in files]})[1]
    assert np.abs(np.asarray(answer["probabilities"]) - np.asarray(encoded["probabilities"])).max() < 1e-6
    status, refused = post(port, {"instances": nhwc.transpose(0, 3, 1, 2).tolist()})
    assert status == 400 and "another order: send them as NHWC" in refused["error"], refused


def test_v2_with_tritonclient_answers_as_v1(served, built):
    """The v2 route's metadata gives the bundle's NHWC shape; binary FP32 in that shape, one example and a
    batch of 32, gets v1's answer to the same tensors as nested lists."""
    _, port = served
    X = np.ascontiguousarray(np.load(built.source.test)["X"][:BATCH].transpose(0, 2, 3, 1), np.float32)
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        metadata = client.get_model_metadata("cam")
        assert metadata["inputs"][0]["shape"] == [-1, *X.shape[1:]]
        names = [o["name"] for o in metadata["outputs"]]
        for rows in (X[:1], X):
            tensor = tritonhttp.InferInput("x", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows, binary_data=True)
            outputs = [tritonhttp.InferRequestedOutput(n, binary_data=True) for n in names]
            result = client.infer("cam", [tensor], outputs=outputs)
            v1 = post(port, {"instances": rows.tolist()})[1]
            probabilities = next(result.as_numpy(n) for n in names if result.as_numpy(n).dtype == np.float32)
            assert probabilities.shape == (len(rows), len(_class_names(built.source)))
            assert np.abs(probabilities - np.asarray(v1["probabilities"])).max() < 1e-6
    finally:
        client.close()
