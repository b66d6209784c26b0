"""An image model through the whole host chain and the agent: the digits CNN fixture, its PNGs read
through the preprocessing stored in the model, int8 from a folder of images, validation, a bundle with
class names, and the agent answering PNGs (v1 ``b64``, v2 with tritonclient, MQTT streaming, a folder
on the command line) exactly as the host computed them."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tritonhttp

from device_agent import Agent
from device_agent.bundle import read_bundle
from device_agent.preprocess import Preprocess
from device_agent.tensor_files import read_items
from edgekit.models.loading import load_model
from tests.agent_helpers import config_of, make_device
from tests.mqtt_helpers import OutputListener


def png_items(folder: Path, count: int, start: int = 0) -> tuple[list[Path], list[int]]:
    files = sorted(folder.glob("*.png"))[start : start + count]
    return files, [int(f.stem.split("_")[1]) for f in files]


def b64(path_or_bytes) -> dict:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return {"b64": base64.b64encode(data).decode()}


def post(port: int, body: dict, path: str = "/v1/models/cam:predict") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def served(digits_cnn, keypair, tmp_path_factory):
    config = make_device(tmp_path_factory.mktemp("cam"), digits_cnn.bundle, keypair[1], device_id="cam-1")
    with Agent(config_of(config)).start() as agent:
        yield agent, agent.server.server_address[1], config


def test_convert_stores_the_preprocessing_and_exposes_the_embedding(digits_cnn):
    model = load_model(digits_cnn.onnx)
    assert model.input.tensor.kind == "image" and model.input.preprocess == {
        "image": {"color": "L", "resize": "stretch", "interpolation": "bilinear", "scale": pytest.approx(1 / 255)}
        | {k: v for k, v in model.input.preprocess["image"].items() if k in ("mean", "std")}
    }
    assert model.output.embedding_output == "edgekit_embedding"
    X = np.load(digits_cnn.test)["X"][:5]
    prediction = model.predict(X)
    assert prediction.embedding.shape == (5, 64) and prediction.probabilities.shape == (5, 10)


def test_int8_from_a_folder_of_images_validates_within_half_a_point(digits_cnn, cli, tmp_path):
    """Calibration images read through the model's preprocessing; the int8 model is kept with --force
    (a 14k-parameter CNN is faster in float on a desktop CPU) and loses at most 0.5 points."""
    out = tmp_path / "cnn.int8.onnx"
    result = cli(
        "convert", digits_cnn.onnx, "--quantize", "int8", "--calibration", digits_cnn.images,
        "--eval", digits_cnn.test, "--per-channel", "--mode", "static", "--force", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantization"]["chosen"] != "float32"
    assert load_model(out).input.preprocess == load_model(digits_cnn.onnx).input.preprocess
    validated = cli("validate", out, "--reference", digits_cnn.model, "--data", digits_cnn.test, "--json")
    assert validated.exit_code == 0, validated.output
    doc = json.loads(validated.stdout)
    assert doc["accuracy_drop"] <= 0.005 and doc["agreement"] >= 0.99
    assert set(doc["speedup"]) == {"1", "16"}  # an image model is timed at batch 1 and 16, not 256


def test_the_bundle_carries_preprocessing_signals_and_class_names(digits_cnn, cli):
    bundle = read_bundle(digits_cnn.bundle)
    schema, spec = bundle.input_schema, bundle.output_spec
    assert bundle.manifest["schema"] == "edgekit.bundle/3" and schema.layout == "tensor"
    assert spec.labels == tuple(str(d) for d in range(10))
    signals = schema.tensor_signals()
    assert {"x.c0.values", "x.c0.mean", "x.sharpness", "embedding.0"} <= set(signals.names)
    baseline = bundle.baseline()
    assert [s.name for s in baseline.features] == list(signals.names) and baseline.rows == 594
    inspected = cli("inspect", digits_cnn.bundle)
    assert "image tensor 'x' float32 [N, 1, 8, 8] NCHW; preprocessing: image" in inspected.stdout


def test_the_agent_answers_pngs_as_the_host_computed_them(served, digits_cnn):
    """The PNG bytes decoded on the device give the host's probabilities for the test tensors: the
    preprocessing that was validated is the one that runs."""
    agent, port, _ = served
    files, labels = png_items(digits_cnn.images, 40)
    status, answer = post(port, {"instances": [b64(f) for f in files]})
    assert status == 200 and len(answer["predictions"]) == 40
    assert np.mean(np.asarray(answer["predictions"]) == np.asarray([str(label) for label in labels])) >= 0.95
    host_model = load_model(digits_cnn.onnx)
    X = next(read_items(files[0].parent, host_model.input.preprocessor(), host_model.input.tensor, batch=40))[1]
    host = host_model.predict(X).probabilities  # the host's folder reader: the PNGs as calibration reads them
    assert np.abs(np.asarray(answer["probabilities"]) - host).max() < 1e-5
    as_lists = post(port, {"instances": X[:3].tolist()})[1]
    as_inputs = post(port, {"inputs": {"x": X[:3].tolist()}})[1]
    assert as_lists["predictions"] == as_inputs["predictions"] == answer["predictions"][:3]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"instances": [{"b64": "@@@"}]}, ["item 0 is not valid base64", "encode the file with base64"]),
        ({"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}, ["item 0", "image"]),
        ({"instances": np.zeros((2, 8, 8, 1)).tolist()}, ["shape [2, 8, 8, 1]", "another order: send them as NCHW"]),
        ({"instances": np.zeros((1, 1, 4, 4)).tolist()}, ["shape [1, 1, 4, 4]", "[N, 1, 8, 8]"]),
        ({"instances": [[[["a"] * 8] * 8]]}, ["not numbers"]),
        ({"inputs": {"y": [[[[0.0] * 8] * 8]]}}, ["names inputs 'y'", "one input, 'x'"]),
    ],
)
def test_bad_images_and_tensors_get_a_400_that_names_the_problem(served, body, words):
    agent, port, _ = served
    status, answer = post(port, body)
    assert status == 400 and all(w in answer["error"] for w in words), answer


def test_a_truncated_png_is_refused_and_the_agent_keeps_serving(served, digits_cnn):
    agent, port, _ = served
    files, _ = png_items(digits_cnn.images, 2)
    data = files[0].read_bytes()
    status, answer = post(port, {"instances": [b64(files[1]), b64(data[: len(data) // 2])]})
    assert status == 400 and "item 1" in answer["error"]
    assert post(port, {"instances": [b64(files[1])]})[0] == 200


def test_a_payload_past_the_body_limit_is_refused_before_it_is_read(digits_cnn, keypair, tmp_path):
    config = make_device(tmp_path / "small", digits_cnn.bundle, keypair[1], server={"max_body_bytes": 4096})
    files, _ = png_items(digits_cnn.images, 40)
    with Agent(config_of(config)).start() as agent:
        status, answer = post(agent.server.server_address[1], {"instances": [b64(f) for f in files]})
    assert status == 413 and "max_body_bytes" in answer["error"]


def test_v2_with_tritonclient_answers_as_v1(served, digits_cnn):
    agent, port, _ = served
    X = np.load(digits_cnn.test)["X"][:4].astype(np.float32)
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port}")
    metadata = client.get_model_metadata("cam")
    assert metadata["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8], "parameters": {"edgekit_encoded_items": True}}
    ]
    tensor = tritonhttp.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=True)
    names = [o["name"] for o in metadata["outputs"]]
    result = client.infer(
        "cam", [tensor], outputs=[tritonhttp.InferRequestedOutput(n, binary_data=True) for n in names]
    )
    v1 = post(port, {"instances": X.tolist()})[1]
    probabilities = next(result.as_numpy(n) for n in names if result.as_numpy(n).dtype == np.float32)
    assert np.abs(probabilities - np.asarray(v1["probabilities"])).max() < 1e-5
    client.close()


def test_edge_agent_predict_reads_a_folder_of_images(served, digits_cnn):
    _, _, config = served
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", "predict", "--config", str(config), str(digits_cnn.images)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("item,prediction,p_0,") and len(lines) == 1 + len(list(digits_cnn.images.glob("*.png")))
    right = sum(line.split(",")[0].split("_")[1].split(".")[0] == line.split(",")[1] for line in lines[1:])
    assert right / (len(lines) - 1) >= 0.95


def test_a_closed_window_sketches_the_signals_and_is_not_drifted_on_clean_images(digits_cnn, keypair, tmp_path):
    """Clean test digits against the training baseline: every signal sketched once per image (the value
    histograms 64 times), and no drift; the same images brighter drift on the pixel moments and the embedding."""
    config = make_device(tmp_path / "dev", digits_cnn.bundle, keypair[1], window_rows=1000, http=False)
    files, _ = png_items(digits_cnn.images, 300)
    images = Preprocess.from_dict(read_bundle(digits_cnn.bundle).input_schema.preprocess, load_model(
        digits_cnn.onnx).input.tensor).batch([f.read_bytes() for f in files])  # fmt: skip
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        agent.predict(images)
        clean = agent.serving.monitor.flush()
        agent.predict(np.clip(images * 1.5, 0, 1))
        bright = agent.serving.monitor.flush()
    values = clean.profile.feature("x.c0.values")
    assert clean.rows == 300 and values.count == 300 * 64 and clean.profile.feature("x.sharpness").count == 300
    assert clean.drift["tested"] and not clean.drift["drifted"], clean.drift
    drifted = {name for name, d in bright.drift["features"].items() if d.get("drifted")}
    assert bright.drift["drifted"] and {"x.c0.mean", "x.c0.std", "embedding.0"} <= drifted, drifted


def test_streamed_images_over_mqtt_are_answered(digits_cnn, keypair, broker, fleet_name, tmp_path):
    config = make_device(
        tmp_path / "dev", digits_cnn.bundle, keypair[1], fleet=fleet_name, broker=broker.url, http=False
    )
    with open(config, "a") as handle:
        handle.write("streaming = true\n")
    listener = OutputListener(broker.port, fleet_name)
    files, labels = png_items(digits_cnn.images, 3)
    try:
        with Agent(config_of(config)).start() as agent:
            deadline = time.time() + 10
            while not agent.reporter.connected.is_set() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            body = {"request_id": "r1", "instances": [b64(f) for f in files]}
            listener.publish(json.dumps(body))
            assert listener.got.wait(10)
    finally:
        listener.close()
    answers = listener.answers
    assert answers[0]["request_id"] == "r1" and answers[0]["predictions"] == [str(label) for label in labels]


def test_one_implementation_decodes_on_both_sides(digits_cnn):
    """The host's PNG reader and the device's request decoder are the same Preprocess: the test tensors
    the fixture wrote are exactly what it makes of the PNGs."""
    schema = load_model(digits_cnn.onnx).input
    preprocess = Preprocess.from_dict(schema.preprocess, schema.tensor)
    files, _ = png_items(digits_cnn.images, 10)
    X = np.load(digits_cnn.test)["X"][[int(f.stem.split("_")[0]) for f in files]]
    # the PNGs hold round(v * 255 / 16): within half a grey level of the training tensors' v / 16
    assert np.abs(preprocess.batch([f.read_bytes() for f in files]) - X).max() <= 0.5 / 255 + 1e-7
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(files[0]).convert("RGB").save(buffer, format="JPEG", quality=100)
    assert np.abs(preprocess.decode(buffer.getvalue()) - X[0]).max() < 0.05  # JPEG of the same digit, gray


def test_flashing_an_image_model_installs_pillow_on_the_device(digits_cnn, bundle):
    from edgekit.local.flash import _extras_for

    assert _extras_for(read_bundle(digits_cnn.bundle)) == "agent,vision"
    assert _extras_for(read_bundle(bundle)) == "agent"


def test_package_refuses_preprocessing_other_than_the_models_own(digits_cnn, keypair, cli, tmp_path):
    """What was validated is what runs: a model converted with its preprocessing keeps it."""
    other = tmp_path / "other.toml"
    other.write_text('[image]\ncolor = "L"\nresize = "stretch"\nscale = 0.5\n')
    args = ["package", digits_cnn.onnx, "--name", "cam", "--version", "2", "--baseline", digits_cnn.test]
    result = cli(*args, "--preprocess", other, "--key", keypair[0], "-o", tmp_path / "b.edgebundle")
    assert result.exit_code == 2 and "differs from the preprocessing the model was converted" in result.stderr
    assert not (tmp_path / "b.edgebundle").exists()
    same = cli(*args, "--preprocess", digits_cnn.preprocess, "--key", keypair[0], "-o", tmp_path / "c.edgebundle")
    assert same.exit_code == 0, same.output
