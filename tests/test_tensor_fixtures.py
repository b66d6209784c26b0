"""The tensor fixtures (edgekit/local/tensor_fixtures.py): deterministic, accurate, the ONNX graph computes
what numpy computed, and the encoded files (PNG, JPEG, WAV, .npy) with their preprocessing tables give
exactly the tensors of the .npz files.

Each fixture is made once per session; the MobileNet (about 20 s) and its int8 check are slow.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest

from device_agent.preprocess import Preprocess
from device_agent.tensors import TensorSpec
from edgekit.local import tensor_onnx
from edgekit.local.tensor_fixtures import (
    KWS_LABELS,
    SENSOR_LABELS,
    make_digits_cnn,
    make_kws_cnn,
    make_mobilenet96,
    make_sensor_cnn,
    sample_image_crops,
)

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory) -> dict:
    return make_digits_cnn(tmp_path_factory.mktemp("digits_cnn"))


@pytest.fixture(scope="session")
def kws_cnn(tmp_path_factory) -> dict:
    return make_kws_cnn(tmp_path_factory.mktemp("kws_cnn"))


@pytest.fixture(scope="session")
def sensor_cnn(tmp_path_factory) -> dict:
    return make_sensor_cnn(tmp_path_factory.mktemp("sensor_cnn"))


@pytest.fixture(scope="session")
def mobilenet(tmp_path_factory) -> dict:
    return make_mobilenet96(tmp_path_factory.mktemp("mobilenet96"))


def _graph(path: str, example_shape: tuple[int, ...], classes: int, embedding: int):
    """The checks every fixture's graph passes; the model, for more."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == tensor_onnx.IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", tensor_onnx.OPSET)]
    (x,) = model.graph.input
    dims = x.type.tensor_type.shape.dim
    assert x.name == "x" and dims[0].dim_param == "N"
    assert tuple(d.dim_value for d in dims[1:]) == example_shape
    (out,) = model.graph.output
    assert out.name == "probabilities"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", classes]
    last, gemm = model.graph.node[-1], model.graph.node[-2]
    assert last.op_type == "Softmax" and gemm.op_type == "Gemm" and gemm.input[0] == "embedding"
    weight = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    assert list(weight.dims) == [embedding, classes]
    return model


def _npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        assert data["X"].dtype == np.float32 and data["y"].dtype == np.int64
        return data["X"], data["y"]


def _folder(path: str, ext: str, y: np.ndarray) -> list[Path]:
    files = sorted(Path(path).glob(f"*.{ext}"))
    assert [f.name for f in files] == [f"{i:04d}_{label}.{ext}" for i, label in enumerate(y)]
    return files


def _preprocess(path: str, spec: TensorSpec) -> Preprocess:
    return Preprocess.from_toml(path, spec)


# -- digits ---------------------------------------------------------------------------------------------------


def test_digits_cnn_is_accurate_and_its_onnx_computes_the_numpy_forward(digits_cnn):
    assert digits_cnn["accuracy"] >= 0.97
    assert digits_cnn["max_abs_diff"] < 1e-5
    assert digits_cnn["train_seconds"] < 20
    _graph(digits_cnn["model"], (1, 8, 8), 10, 64)
    X, y = _npz(digits_cnn["test"])
    probabilities = tensor_onnx.run(digits_cnn["model"], X)
    assert (probabilities.argmax(axis=1) == y).mean() == pytest.approx(digits_cnn["accuracy"])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_digits_cnn_data_files(digits_cnn):
    X_train, y_train = _npz(digits_cnn["train"])
    X, y = _npz(digits_cnn["test"])
    assert X_train.shape == (1203, 1, 8, 8) and X.shape == (594, 1, 8, 8) and len(y_train) == 1203
    assert X.min() == 0 and X.max() == 1 and set(np.unique(X * 16)) <= set(range(17))
    assert Path(digits_cnn["labels"]).read_text().split() == [str(d) for d in range(10)]


def test_digits_pngs_and_their_table_reproduce_the_test_tensors(digits_cnn):
    X, y = _npz(digits_cnn["test"])
    files = _folder(digits_cnn["images"], "png", y)
    from PIL import Image

    with Image.open(files[0]) as first:
        assert first.mode == "L" and first.size == (8, 8)
    spec = TensorSpec("x", "float32", (None, 1, 8, 8), "NCHW", "image")
    decoded = _preprocess(digits_cnn["preprocess"], spec).batch([f.read_bytes() for f in files])
    assert np.abs(decoded - X).max() <= 1 / 255 + 1e-6


def test_digits_cnn_is_deterministic(digits_cnn, tmp_path):
    again = make_digits_cnn(tmp_path)
    for key in ("model", "train", "test", "preprocess", "labels"):
        assert Path(again[key]).read_bytes() == Path(digits_cnn[key]).read_bytes(), key
    pngs = [sorted(Path(run["images"]).iterdir()) for run in (digits_cnn, again)]
    assert [p.read_bytes() for p in pngs[0]] == [p.read_bytes() for p in pngs[1]]


# -- keyword spotting -----------------------------------------------------------------------------------------


def test_kws_cnn_is_accurate_and_its_onnx_computes_the_numpy_forward(kws_cnn):
    assert kws_cnn["accuracy"] >= 0.95
    assert kws_cnn["max_abs_diff"] < 1e-5
    _graph(kws_cnn["model"], (1, 40, 49), len(KWS_LABELS), 32)
    X, y = _npz(kws_cnn["test"])
    assert X.shape == (len(KWS_LABELS) * 30, 1, 40, 49)
    assert (tensor_onnx.run(kws_cnn["model"], X).argmax(axis=1) == y).mean() >= 0.95


def test_kws_wavs_and_their_table_give_the_test_tensors(kws_cnn):
    X, y = _npz(kws_cnn["test"])
    files = _folder(kws_cnn["test_audio"], "wav", y)
    with wave.open(io.BytesIO(files[0].read_bytes())) as clip:
        assert (clip.getnchannels(), clip.getsampwidth(), clip.getframerate(), clip.getnframes()) == (
            1,
            2,
            16000,
            16000,
        )
    spec = TensorSpec("x", "float32", (None, 1, 40, 49), "NCHW", "audio")
    np.testing.assert_array_equal(_preprocess(kws_cnn["preprocess"], spec).batch([f.read_bytes() for f in files]), X)
    assert Path(kws_cnn["labels"]).read_text().split() == list(KWS_LABELS)
    assert len(list(Path(kws_cnn["train_audio"]).glob("*.wav"))) == len(_npz(kws_cnn["train"])[1])


# -- sensor windows -------------------------------------------------------------------------------------------


def test_sensor_cnn_uses_1d_convolutions_and_is_accurate(sensor_cnn):
    assert sensor_cnn["accuracy"] >= 0.95
    assert sensor_cnn["max_abs_diff"] < 1e-5
    model = _graph(sensor_cnn["model"], (3, 128), len(SENSOR_LABELS), 32)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(list(onnx.helper.get_attribute_value(a)) == [5] for n in convs for a in n.attribute
                         if a.name == "kernel_shape")  # fmt: skip
    assert any(n.op_type == "GlobalAveragePool" for n in model.graph.node)


def test_sensor_npy_files_are_the_test_windows(sensor_cnn):
    X, y = _npz(sensor_cnn["test"])
    X_train, _ = _npz(sensor_cnn["train"])
    assert X.shape[1:] == X_train.shape[1:] == (3, 128)
    files = _folder(sensor_cnn["windows"], "npy", y)
    np.testing.assert_array_equal(np.stack([np.load(f) for f in files]), X)
    spec = TensorSpec("x", "float32", (None, 3, 128), "NCW", "sensor")
    np.testing.assert_array_equal(_preprocess(sensor_cnn["preprocess"], spec).batch([f.read_bytes() for f in files]), X)
    assert Path(sensor_cnn["labels"]).read_text().split() == list(SENSOR_LABELS)


# -- sample crops ---------------------------------------------------------------------------------------------


def test_sample_image_crops_are_deterministic_rgb_uint8():
    crops = sample_image_crops(6, size=64, seed=3)
    assert crops.shape == (6, 64, 64, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops, sample_image_crops(6, size=64, seed=3))
    assert not np.array_equal(crops, sample_image_crops(6, size=64, seed=4))
    digits = sample_image_crops(4, size=32, seed=0, source="digits")
    assert digits.shape == (4, 32, 32, 3) and digits.dtype == np.uint8
    assert (digits[..., 0] == digits[..., 2]).all() and digits.max() > 200
    assert sample_image_crops(0).shape == (0, 96, 96, 3)
    with pytest.raises(ValueError):
        sample_image_crops(1, source="cifar")


# -- mobilenet96 (slow) ---------------------------------------------------------------------------------------

MOBILENET_SPEC = TensorSpec("x", "float32", (None, 3, 96, 96), "NCHW", "image")


@pytest.mark.slow
def test_mobilenet96_is_a_decisive_depthwise_separable_network(mobilenet):
    model = _graph(mobilenet["model"], (3, 96, 96), 10, 256)
    groups = [
        onnx.helper.get_attribute_value(a)
        for n in model.graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "group"
    ]
    assert sum(g > 1 for g in groups) >= 8  # the depthwise convolutions
    assert sum(n.op_type == "Clip" for n in model.graph.node) == len(groups)
    assert mobilenet["accuracy"] >= 0.95 and mobilenet["mean_margin"] >= 0.9
    assert mobilenet["max_abs_diff"] < 1e-5 and mobilenet["embedding_max_abs_diff"] < 1e-4
    assert 100e6 < mobilenet["macs"] < 1e9 and mobilenet["parameters"] == tensor_onnx.parameter_count(model)
    assert mobilenet["latency_ms_fp32"] > 0


@pytest.mark.slow
def test_mobilenet96_jpegs_and_their_table_give_the_test_tensors(mobilenet):
    X, y = _npz(mobilenet["test"])
    assert X.shape == (300, 3, 96, 96)
    files = _folder(mobilenet["test_images"], "jpg", y)
    preprocess = _preprocess(mobilenet["preprocess"], MOBILENET_SPEC)
    np.testing.assert_array_equal(preprocess.batch([f.read_bytes() for f in files]), X)
    from PIL import Image

    with Image.open(files[0]) as first:
        assert first.format == "JPEG" and first.size == (128, 128)
    assert len(Path(mobilenet["labels"]).read_text().split()) == 10
    assert len(list(Path(mobilenet["train_images"]).glob("*.jpg"))) == 400


@pytest.mark.slow
def test_mobilenet96_int8_agrees_with_fp32(mobilenet, tmp_path):
    """Static QDQ per-channel int8, calibrated on training crops: the same top-1 on ≥ 99 % of held-out crops."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    preprocess = _preprocess(mobilenet["preprocess"], MOBILENET_SPEC)
    files = sorted(Path(mobilenet["train_images"]).glob("*.jpg"))[::8]
    calibration = preprocess.batch([f.read_bytes() for f in files])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.feeds, None)

    int8 = tmp_path / "mobilenet96.int8.onnx"
    quantize_static(
        mobilenet["model"], str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    X, _ = _npz(mobilenet["test"])
    fp32 = tensor_onnx.run(mobilenet["model"], X).argmax(axis=1)
    assert (tensor_onnx.run(int8, X).argmax(axis=1) == fp32).mean() >= 0.99
