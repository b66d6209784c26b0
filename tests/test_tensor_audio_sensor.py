"""Audio and sensor models through the host chain and a real agent: keyword spotting on 16 kHz WAV clips
(a log-mel front end, int8 calibrated on WAV files) and a 1-D CNN on 3-axis accelerometer windows.

Each fixture model is converted with its preprocessing (``--preprocess``), validated against the
original, packaged with its files as the drift baseline and its class names, and served; the agent
then answers WAV and ``.npy`` files (v1 ``b64`` items), JSON tensors, binary v2 tensors from
tritonclient, and ``edge-agent predict`` over a folder. The image path (digits CNN) is
``tests/test_tensor_models.py``'s.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tritonhttp  # dev installs it: a missing install fails, never skips
from click.testing import CliRunner

from device_agent import Agent
from device_agent.bundle import read_bundle
from device_agent.cli import main as edge_agent
from device_agent.signing import load_public_key
from edgekit.cli import cli_for_tests
from edgekit.local.tensor_fixtures import make_kws_cnn, make_sensor_cnn
from tests.agent_helpers import config_of, make_device

pytestmark = pytest.mark.network  # the agents listen on loopback ports


@dataclass(frozen=True)
class Served:
    """One fixture model through convert, validate and package, and an agent serving its bundle."""

    paths: dict[str, Path]  # make_kws_cnn / make_sensor_cnn's files
    model: Path  # converted
    bundle: Path
    report: dict  # validate --json
    config: Path  # the agent's agent.toml
    port: int
    name: str
    public_key: Path


def edgekit(*args: object) -> str:
    """``edgekit`` in-process; its stdout, after checking it exited 0."""
    result = CliRunner().invoke(cli_for_tests(), [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def build_and_serve(directory: Path, make, name: str, baseline: str, keypair, *convert_options: str):
    """``make`` the fixture into ``directory``, convert, validate and package it, and yield a ``Served``.
    A convert option written ``<key>`` is the fixture's path of that key."""
    paths = {k: Path(v) for k, v in make(directory).items() if isinstance(v, str)}
    model, bundle = directory / f"{name}.onnx", directory / f"{name}-1.edgebundle"
    options = [paths[o[1:-1]] if o.startswith("<") else o for o in convert_options]
    edgekit("convert", paths["model"], "--preprocess", paths["preprocess"], *options, "-o", model)
    report = json.loads(edgekit("validate", model, "--reference", paths["model"], "--data", paths["test"], "--json"))
    edgekit(
        "package", model, "--name", name, "--version", 1, "--baseline", paths[baseline],
        "--labels", paths["labels"], "--key", keypair[0], "-o", bundle,
    )  # fmt: skip
    config = make_device(directory / "device", bundle, keypair[1], device_id=f"{name}-dev", window_rows=10_000)
    with Agent(config_of(config)).start() as agent:
        yield Served(paths, model, bundle, report, config, agent.server.server_address[1], name, keypair[1])


@pytest.fixture(scope="module")
def kws(tmp_path_factory, keypair):
    yield from build_and_serve(
        tmp_path_factory.mktemp("kws"), make_kws_cnn, "kws", "train_audio", keypair,
        "--quantize", "int8", "--calibration", "<train_audio>", "--eval", "<test>", "--force",
        "--mode", "static", "--per-channel", "--activation-type", "uint8",  # one configuration: no latency race
    )  # fmt: skip


@pytest.fixture(scope="module")
def sensor(tmp_path_factory, keypair):
    yield from build_and_serve(tmp_path_factory.mktemp("imu"), make_sensor_cnn, "imu", "windows", keypair)


# --- helpers ---------------------------------------------------------------------------------------


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def post(served: Served, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{served.port}/v1/models/{served.name}:predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def files_of(folder: Path, pattern: str) -> tuple[list[Path], list[int]]:
    """The folder's files, sorted, and the class each one's name carries (``<index>_<label>.<ext>``)."""
    files = sorted(folder.glob(pattern))
    return files, [int(f.stem.split("_")[1]) for f in files]


def rewrite_wav(data: bytes, *, rate: int | None = None, stereo: bool = False) -> bytes:
    """The same 16-bit samples written again: at another declared ``rate``, or in both channels of a stereo file."""
    with wave.open(io.BytesIO(data), "rb") as source:
        frames, source_rate = source.readframes(source.getnframes()), source.getframerate()
    samples = np.frombuffer(frames, "<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(2 if stereo else 1)
        out.setsampwidth(2)
        out.setframerate(rate or source_rate)
        out.writeframes(np.repeat(samples, 2).tobytes() if stereo else samples.tobytes())
    return buffer.getvalue()


def edge_agent_predict(served: Served, data: Path, capsys) -> list[str]:
    """``edge-agent predict --config agent.toml <data>``, in-process: its CSV lines."""
    capsys.readouterr()
    assert edge_agent(["predict", "--config", str(served.config), str(data)]) == 0
    return capsys.readouterr().out.splitlines()


# --- keyword spotting --------------------------------------------------------------------------------


def test_kws_int8_from_wav_files_validates_and_packages_with_audio_signals(kws):
    """convert calibrated int8 on the WAV folder (read through ``--preprocess``) and kept it (``--force``);
    validate passes against the float model; the bundle pins the log-mel settings and the class names,
    and its baseline (the WAV folder) sketches the audio signals and the embedding."""
    assert kws.report["passed"] is True and kws.report["accuracy_drop"] <= 0.01 and kws.report["agreement"] >= 0.98
    bundle = read_bundle(kws.bundle, load_public_key(kws.public_key))
    assert bundle.manifest["quantization"]["label"] == "static QDQ per-channel U8/S8 minmax"
    assert bundle.manifest["input"]["preprocess"]["audio"]["sample_rate"] == 16000
    assert bundle.output_spec.labels == tuple(kws.paths["labels"].read_text().split())
    names = [f.name for f in bundle.baseline().features]
    assert {"x.c0.mean", "x.rms", "x.spectral_centroid", "embedding.0"} <= set(names)


def test_kws_answers_wav_files_sent_as_b64(kws):
    """Every test clip as a base64 WAV in one request: the class names come back, right for ≥ 90 %."""
    files, truth = files_of(kws.paths["test_audio"], "*.wav")
    status, answer = post(kws, {"instances": [b64(f.read_bytes()) for f in files]})
    labels = kws.paths["labels"].read_text().split()
    assert status == 200, answer
    right = np.mean([got == labels[want] for got, want in zip(answer["predictions"], truth, strict=True)])
    assert right >= 0.9, right


def test_kws_downmixes_a_stereo_wav(kws):
    """``read_wav`` averages the channels: a stereo file with the clip in both answers as the mono one."""
    clip = sorted(kws.paths["test_audio"].glob("*.wav"))[3].read_bytes()
    status, answer = post(kws, {"instances": [b64(clip), b64(rewrite_wav(clip, stereo=True))]})
    assert status == 200, answer
    assert answer["predictions"][0] == answer["predictions"][1]
    assert np.allclose(answer["probabilities"][0], answer["probabilities"][1], atol=1e-6)


@pytest.mark.parametrize(
    ("item", "words"),
    [
        (lambda clip: rewrite_wav(clip, rate=44100), ("44100 Hz audio", "takes 16000 Hz", "resample it to 16000 Hz")),
        (lambda clip: clip[: len(clip) // 2], ("truncated WAV", "holds 7989", "send the whole file")),
        (lambda clip: b"ID3\x04not a wav at all", ("is not a WAV file", "send the bytes of a .wav file")),
        (lambda clip: b"\x89PNG\r\n\x1a\n" + clip[8:], ("is not a WAV file", "found a PNG image")),
    ],
    ids=["44.1 kHz", "truncated", "mp3", "png"],
)
def test_kws_refuses_a_bad_clip_with_a_400_naming_the_item_and_the_fix(kws, item, words):
    """A clip at another rate (never resampled silently), cut short, or not a WAV: 400, the item named,
    the problem and the fix said; the agent serves the next request."""
    clip = sorted(kws.paths["test_audio"].glob("*.wav"))[0].read_bytes()
    status, answer = post(kws, {"instances": [b64(clip), b64(item(clip))]})
    assert status == 400 and "request item 1" in answer["error"], answer
    assert all(word in answer["error"] for word in words), answer["error"]
    assert post(kws, {"instances": [b64(clip)]})[0] == 200


def test_kws_v2_from_tritonclient_answers_as_v1_wav(kws):
    """The test spectrogram of a clip ([1, 1, 40, 49] FP32, binary) and the clip's WAV file (BYTES [1]),
    each sent with tritonclient, get the label and probabilities the WAV gets over v1: one
    preprocessing, two protocols."""
    X = np.load(kws.paths["test"])["X"].astype(np.float32)
    clip = sorted(kws.paths["test_audio"].glob("*.wav"))[4].read_bytes()
    v1 = post(kws, {"instances": [b64(clip)]})[1]
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{kws.port}")
    try:
        metadata = client.get_model_metadata("kws")
        assert metadata["inputs"][0]["datatype"] == "FP32" and metadata["inputs"][0]["shape"] == [-1, 1, 40, 49]
        names = [o["name"] for o in metadata["outputs"]]
        spectrogram = tritonhttp.InferInput("x", [1, 1, 40, 49], "FP32").set_data_from_numpy(X[4:5], binary_data=True)
        wav = tritonhttp.InferInput("x", [1], "BYTES").set_data_from_numpy(np.array([clip], object), binary_data=True)
        answers = [_v2_answer(client, tensor, names) for tensor in (spectrogram, wav)]
    finally:
        client.close()
    for labels, probabilities in answers:
        assert labels == v1["predictions"]
        assert np.abs(probabilities - np.asarray(v1["probabilities"])).max() < 1e-5


def _v2_answer(client, tensor, names) -> tuple[list[str], np.ndarray]:
    """The labels and the probabilities of one tritonclient request, every output asked for in binary."""
    result = client.infer(
        "kws", [tensor], outputs=[tritonhttp.InferRequestedOutput(n, binary_data=True) for n in names]
    )
    outputs = [result.as_numpy(n) for n in names]
    labels = next(value for value in outputs if value.dtype == object)
    probabilities = next(value for value in outputs if value.dtype == np.float32 and value.shape[-1] == 6)
    return [v.decode() if isinstance(v, bytes) else v for v in labels.ravel()], probabilities


def test_edge_agent_predict_answers_a_folder_of_wav_files(kws, capsys):
    """One CSV line per WAV file, named in the ``item`` column, in the folder's sorted order."""
    files, truth = files_of(kws.paths["test_audio"], "*.wav")
    lines = edge_agent_predict(kws, kws.paths["test_audio"], capsys)
    labels = kws.paths["labels"].read_text().split()
    assert lines[0] == "item,prediction," + ",".join(f"p_{label}" for label in labels)
    rows = [line.split(",") for line in lines[1:]]
    assert [row[0] for row in rows] == [f.name for f in files]
    assert np.mean([row[1] == labels[want] for row, want in zip(rows, truth, strict=True)]) >= 0.9


# --- sensor windows ----------------------------------------------------------------------------------


def test_sensor_model_validates_and_packages_with_per_axis_signals(sensor):
    """The float model with its ``[sensor]`` table validates as the original; the bundle's baseline,
    read from the folder of ``.npy`` windows, sketches each axis (values, mean, std, activity)."""
    assert sensor.report["passed"] is True and sensor.report["agreement"] == 1.0
    bundle = read_bundle(sensor.bundle, load_public_key(sensor.public_key))
    assert "sensor" in bundle.manifest["input"]["preprocess"]
    assert bundle.output_spec.labels == ("idle", "walk", "run", "shake")
    names = {f.name for f in bundle.baseline().features}
    assert {f"x.c{c}.{s}" for c in range(3) for s in ("values", "mean", "std", "activity")} <= names


def test_sensor_answers_nested_list_windows_and_named_inputs(sensor):
    """Every test window as nested JSON lists ([N, 3, 128]): right for ≥ 90 %; the same windows under
    ``{"inputs": {"x": ...}}`` answer the same."""
    data = np.load(sensor.paths["test"])
    labels = sensor.paths["labels"].read_text().split()
    status, answer = post(sensor, {"instances": data["X"].tolist()})
    assert status == 200, answer
    assert np.mean(np.asarray(answer["predictions"]) == np.asarray(labels)[data["y"]]) >= 0.9
    status, named = post(sensor, {"inputs": {"x": data["X"][:20].tolist()}})
    assert status == 200 and named["predictions"] == answer["predictions"][:20], named


def test_sensor_answers_npy_files_sent_as_b64_as_their_json_tensors(sensor):
    """The ``.npy`` window files as base64 items answer what the same windows as JSON lists answer."""
    files, _ = files_of(sensor.paths["windows"], "*.npy")
    windows = np.stack([np.load(f) for f in files[:30]])
    status, from_files = post(sensor, {"instances": [b64(f.read_bytes()) for f in files[:30]]})
    assert status == 200, from_files
    from_json = post(sensor, {"instances": windows.tolist()})[1]
    assert from_files["predictions"] == from_json["predictions"]
    assert np.abs(np.asarray(from_files["probabilities"]) - np.asarray(from_json["probabilities"])).max() < 1e-6


def test_sensor_refuses_a_window_with_its_axes_swapped(sensor):
    """A [128, 3] window (time first) is refused with a 400 that says the dimensions are in another order."""
    window = np.load(sorted(sensor.paths["windows"].glob("*.npy"))[0])
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(window.T))
    status, answer = post(sensor, {"instances": [b64(buffer.getvalue())]})
    assert status == 400 and "shape [128, 3]" in answer["error"] and "another order" in answer["error"], answer


def test_edge_agent_predict_answers_a_folder_of_npy_windows(sensor, capsys):
    """One CSV line per ``.npy`` file, named in the ``item`` column."""
    files, truth = files_of(sensor.paths["windows"], "*.npy")
    lines = edge_agent_predict(sensor, sensor.paths["windows"], capsys)
    assert lines[0] == "item,prediction,p_idle,p_walk,p_run,p_shake" and len(lines) == 1 + len(files)
    rows = [line.split(",") for line in lines[1:]]
    assert [row[0] for row in rows] == [f.name for f in files]
    labels = ("idle", "walk", "run", "shake")
    assert np.mean([row[1] == labels[want] for row, want in zip(rows, truth, strict=True)]) >= 0.9
