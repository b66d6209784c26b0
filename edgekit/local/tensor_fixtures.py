"""Tensor reference models and data (images, audio, sensor windows), made deterministically.

Nothing is downloaded and no deep-learning framework is used: the data come from datasets
scikit-learn ships or are synthesised (``tensor_data``), the small networks are trained with numpy
(``numpy_cnn``) on one BLAS thread with fixed seeds, and every model is written with ``onnx.helper``
(``tensor_onnx``: opset 17, a dynamic batch "N", input "x", the classifier's input "embedding",
output "probabilities" from a Softmax). Encoded items (PNG, JPEG, WAV) become tensors through
``device_agent.preprocess``, with the TOML table written beside them, so the ``.npz`` tensors are what
the device computes from those files. Same library versions, same bytes (the ``.npz`` files are
written without timestamps); float rounding of the BLAS kernels may differ between CPUs.

- ``make_digits_cnn``: a CNN on scikit-learn's 8x8 digits, ``[N, 1, 8, 8]``, the test images as PNGs.
- ``make_mobilenet96``: a MobileNet-class network ``[N, 3, 96, 96]``, its classifier fitted on JPEG
  crops of the sample photographs (``mobilenet96``).
- ``make_kws_cnn``: keyword spotting on synthetic 1 s clips (WAV) through a log-mel ``[N, 1, 40, 49]``.
- ``make_sensor_cnn``: a 1-D CNN on synthetic accelerometer windows ``[N, 3, 128]``, and ``.npy`` files.
- ``sample_image_crops`` (from ``tensor_data``): raw RGB crops for drift tests and benches.

Each ``make_*`` writes into ``directory`` and returns the paths written (strings) and what it
measured (accuracy, ``max_abs_diff`` between onnxruntime and the numpy forward, parameters, MACs).
Files of a folder are named ``<index>_<label>.<ext>``: the row of the ``_test.npz`` and the class
number (the line of the labels file, from 0).
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.preprocess import Preprocess
from device_agent.tensors import TensorSpec
from edgekit import tomlfile
from edgekit.errors import require
from edgekit.local import mobilenet96
from edgekit.local import numpy_cnn as nn
from edgekit.local import tensor_data as data
from edgekit.local import tensor_onnx as onnx_io
from edgekit.local.tensor_data import KWS_LABELS, SENSOR_LABELS, sample_image_crops

__all__ = [
    "TENSOR_FIXTURES",
    "make_digits_cnn",
    "make_kws_cnn",
    "make_mobilenet96",
    "make_sensor_cnn",
    "make_tensor_fixtures",
    "sample_image_crops",
]

SEED = 0
DIGITS_TRAINING = nn.TrainConfig(epochs=25, batch_size=32, lr=3e-3, seed=SEED)
KWS_TRAINING = nn.TrainConfig(epochs=12, batch_size=32, lr=5e-3, seed=SEED)
SENSOR_TRAINING = nn.TrainConfig(epochs=30, batch_size=32, lr=5e-3, seed=SEED)
DIGITS_IMAGE = {"color": "L", "resize": "stretch", "scale": 1 / 255}
MOBILENET_IMAGE = {
    "color": "RGB",
    "resize": "crop",
    "scale": 1 / 255,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
KWS_AUDIO = {
    "sample_rate": data.SAMPLE_RATE,
    "clip_seconds": 1.0,
    "n_mels": 40,
    "n_fft": 512,
    "win_length": 400,
    "hop_length": 320,
    "center": False,
    # device_agent.preprocess's defaults, written out: the fixture's tensors do not follow a change of default
    "fmin": 0.0,
    "fmax": 8000.0,
    "power": 2.0,
    "log_offset": 1e-6,
    "mel_scale": "slaney",
}
# crops per class: train (fits the classifier) and test (held out), and how many calibrate the batch norms
MOBILENET_CROPS = (40, 30)
MOBILENET_CALIBRATION = 40
KWS_CLIPS = (80, 30)  # clips per class
SENSOR_WINDOWS = (150, 60)  # windows per class


def _directory(directory: str | Path) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _savez(path: Path, **arrays: np.ndarray) -> str:
    """``np.savez`` without its timestamps, so the same arrays make the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
    return str(path)


def _write_folder(folder: Path, items: list[bytes], labels: np.ndarray, ext: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"*.{ext}"):
        old.unlink()  # a rerun with fewer items leaves no stale files
    for index, (item, label) in enumerate(zip(items, labels, strict=True)):
        (folder / f"{index:04d}_{int(label)}.{ext}").write_bytes(item)
    return str(folder)


def _write_labels(path: Path, labels: tuple[str, ...]) -> str:
    path.write_text("".join(f"{label}\n" for label in labels))
    return str(path)


def _write_toml(path: Path, table: str, values: dict[str, Any], comment: str) -> str:
    return str(tomlfile.write(path, {table: values}, comment=comment))


def _fit(net: nn.Sequential, split: tuple[np.ndarray, ...], config: nn.TrainConfig, model_path: Path) -> dict:
    """Train ``net`` on one BLAS thread, write it as ONNX, and measure it against the numpy forward."""
    from threadpoolctl import threadpool_limits

    X_train, y_train, X_test, y_test = split
    with threadpool_limits(limits=1):
        trained = nn.train(net, X_train, y_train, config)
        expected = net.probabilities(X_test)
        train_accuracy = nn.accuracy(net, X_train, y_train)
    model = onnx_io.sequential_to_onnx(net, (None, *X_train.shape[1:]), name=model_path.stem)
    onnx_io.save(model, model_path)
    got = onnx_io.run(model_path, X_test)
    return {
        "accuracy": float((got.argmax(axis=1) == y_test).mean()),
        "train_accuracy": train_accuracy,
        "max_abs_diff": float(np.abs(got - expected).max()),
        "train_seconds": round(trained["seconds"], 2),
        "final_loss": trained["loss"],
        "parameters": net.count(),
        "macs": onnx_io.count_macs(model),
    }


# -- digits -----------------------------------------------------------------------------------------------


def _digits_split() -> tuple[np.ndarray, ...]:
    """The split of ``fixtures.make_fixtures``' digits (a stratified third held out), as ``[N, 1, 8, 8]`` / 16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.images[:, np.newaxis] / 16).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target.astype(np.int64), test_size=0.33, random_state=SEED, stratify=digits.target
    )
    return X_train, y_train, X_test, y_test


def _digits_net() -> nn.Sequential:
    rng = np.random.default_rng(SEED)
    return nn.Sequential(
        [
            nn.Conv2d(1, 16, 3, pad=1, rng=rng),
            nn.ReLU(),
            nn.MaxPool2(),
            nn.Conv2d(16, 32, 3, pad=1, rng=rng),
            nn.ReLU(),
            nn.MaxPool2(),
            nn.Flatten(),
            nn.Dense(32 * 2 * 2, 64, rng=rng),
            nn.ReLU(),
            nn.Dense(64, 10, rng=rng),
        ]
    )


def make_digits_cnn(directory: str | Path) -> dict[str, Any]:
    """A CNN on scikit-learn's digits: "x" ``[N, 1, 8, 8]`` (values v / 16) -> "probabilities" ``[N, 10]``.

    Writes ``digits_cnn.onnx``, ``digits_cnn_train.npz`` and ``digits_cnn_test.npz`` (X float32, y
    int64), ``digits_png/`` (the test images as 8-bit gray PNGs, pixel ``round(v * 255 / 16)``),
    ``digits_labels.txt`` and ``digits_image.toml`` (the PNGs' preprocessing: gray, stretch, / 255)."""
    pil = require("PIL.Image", "vision")
    start, directory = time.perf_counter(), _directory(directory)
    split = _digits_split()
    X_train, y_train, X_test, y_test = split
    facts = _fit(_digits_net(), split, DIGITS_TRAINING, directory / "digits_cnn.onnx")
    pngs = []
    for image in np.round(X_test[:, 0] * 255).astype(np.uint8):  # v / 16 * 255 = v * 255 / 16
        buffer = io.BytesIO()
        pil.fromarray(image).save(buffer, format="PNG")  # uint8 HxW: mode L
        pngs.append(buffer.getvalue())
    comment = "The PNGs of digits_png/ as the model's input: 8-bit gray, 8x8, pixel / 255.\n"
    comment += "The model was trained on v / 16 (v in 0..16); a PNG pixel is round(v * 255 / 16)."
    paths = {
        "model": str(directory / "digits_cnn.onnx"),
        "train": _savez(directory / "digits_cnn_train.npz", X=X_train, y=y_train),
        "test": _savez(directory / "digits_cnn_test.npz", X=X_test, y=y_test),
        "images": _write_folder(directory / "digits_png", pngs, y_test, "png"),
        "labels": _write_labels(directory / "digits_labels.txt", tuple(str(d) for d in range(10))),
        "preprocess": _write_toml(directory / "digits_image.toml", "image", DIGITS_IMAGE, comment),
    }
    return {**paths, **facts, "seconds": round(time.perf_counter() - start, 2)}


# -- mobilenet96 ------------------------------------------------------------------------------------------


def _crop_files(per_class: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """128x128 JPEG crops (quality 90) of the 10 classes of ``tensor_data.region_crops``."""
    crops, labels = data.region_crops(per_class, seed=seed, size=128)
    return [data.encode_image(crop, "JPEG", quality=90) for crop in crops], labels


def _mobilenet_classifier(preprocess: Preprocess, train: list[bytes], y_train: np.ndarray):
    """The body calibrated on the first training crops, the classifier fitted on all of their embeddings
    (onnxruntime's: fast); and how far those are from the numpy forward's."""
    from threadpoolctl import threadpool_limits

    X_train = preprocess.batch(train)
    with threadpool_limits(limits=1):
        net = mobilenet96.build(X_train[:MOBILENET_CALIBRATION], seed=SEED)
        embeddings = onnx_io.run(mobilenet96.to_onnx(net).SerializeToString(), X_train, "embedding")
        diff = float(np.abs(embeddings[:16] - mobilenet96.embed(net, X_train[:16])).max())
        mobilenet96.fit_head(net, embeddings, y_train)
    return net, diff


def make_mobilenet96(directory: str | Path) -> dict[str, Any]:
    """A MobileNet-class network (``mobilenet96``): "x" ``[N, 3, 96, 96]`` (RGB, / 255, ImageNet mean
    and std) -> "embedding" ``[N, 256]`` -> "probabilities" ``[N, 10]``, the classifier fitted on crops.

    Writes ``mobilenet96.onnx``, ``mobilenet96_crops_train/`` and ``mobilenet96_crops_test/`` (128x128
    JPEGs), ``mobilenet96_image.toml`` (their preprocessing: RGB, resize and centre-crop to 96, / 255,
    mean, std), ``mobilenet96_test.npz`` (the test crops through it) and ``mobilenet96_labels.txt``.
    Measures the held-out accuracy, the mean top-1 margin (first minus second probability) and the
    fp32 batch-1 latency on one onnxruntime thread."""
    start, directory = time.perf_counter(), _directory(directory)
    spec = TensorSpec("x", "float32", (None, 3, mobilenet96.SIZE, mobilenet96.SIZE), "NCHW", "image")
    preprocess = Preprocess.from_dict({"image": MOBILENET_IMAGE}, spec)
    train, y_train = _crop_files(MOBILENET_CROPS[0], seed=SEED + 1)
    test, y_test = _crop_files(MOBILENET_CROPS[1], seed=SEED + 2)
    net, embedding_diff = _mobilenet_classifier(preprocess, train, y_train)
    model = mobilenet96.to_onnx(net)
    model_path = directory / "mobilenet96.onnx"
    onnx_io.save(model, model_path)
    X_test = preprocess.batch(test)
    got = onnx_io.run(model_path, X_test)
    top2 = np.sort(got, axis=1)[:, -2:]
    comment = "The JPEGs of mobilenet96_crops_*/ as the model's input: RGB, the short side to 96 and the centre\n"
    comment += "cut out (bilinear), pixel / 255, then ImageNet's mean and std per channel; NCHW."
    paths = {
        "model": str(model_path),
        "train_images": _write_folder(directory / "mobilenet96_crops_train", train, y_train, "jpg"),
        "test_images": _write_folder(directory / "mobilenet96_crops_test", test, y_test, "jpg"),
        "test": _savez(directory / "mobilenet96_test.npz", X=X_test, y=y_test),
        "labels": _write_labels(directory / "mobilenet96_labels.txt", data.CROP_LABELS),
        "preprocess": _write_toml(directory / "mobilenet96_image.toml", "image", MOBILENET_IMAGE, comment),
    }
    facts = {
        "accuracy": float((got.argmax(axis=1) == y_test).mean()),
        "mean_margin": float((top2[:, 1] - top2[:, 0]).mean()),
        "max_abs_diff": float(np.abs(got[:16] - mobilenet96.probabilities(net, X_test[:16])).max()),
        "embedding_max_abs_diff": embedding_diff,
        "parameters": onnx_io.parameter_count(model),
        "macs": onnx_io.count_macs(model),
        "latency_ms_fp32": round(onnx_io.latency_ms(model_path, X_test[0]), 3),
    }
    return {**paths, **facts, "seconds": round(time.perf_counter() - start, 2)}


# -- keyword spotting -------------------------------------------------------------------------------------


def _wav_files(per_class: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    for _ in range(per_class):
        for label, name in enumerate(KWS_LABELS):
            clips.append(data.wav_bytes(data.audio_clip(name, rng)))
            labels.append(label)
    return clips, np.asarray(labels, np.int64)


def _kws_net(X_train: np.ndarray) -> nn.Sequential:
    """Three conv stages on the log-mel, the training set's mean and spread folded in as the first layer."""
    rng = np.random.default_rng(SEED)
    mean, std = float(X_train.mean()), float(X_train.std())
    return nn.Sequential(
        [
            nn.Affine(1 / std, -mean / std),
            nn.Conv2d(1, 8, 3, pad=1, rng=rng),
            nn.ReLU(),
            nn.MaxPool2(),
            nn.Conv2d(8, 16, 3, pad=1, rng=rng),
            nn.ReLU(),
            nn.MaxPool2(),
            nn.Conv2d(16, 32, 3, pad=1, rng=rng),
            nn.ReLU(),
            nn.GlobalAvgPool(),
            nn.Dense(32, 32, rng=rng),
            nn.ReLU(),
            nn.Dense(32, len(KWS_LABELS), rng=rng),
        ]
    )


def make_kws_cnn(directory: str | Path) -> dict[str, Any]:
    """Keyword spotting on synthetic 1 s, 16 kHz clips of six kinds (``tensor_data.KWS_LABELS``):
    "x" ``[N, 1, 40, 49]`` (a log-mel spectrogram: 40 bands, 49 frames) -> "probabilities" ``[N, 6]``.

    Writes ``kws_cnn.onnx``, ``kws_wav_train/`` and ``kws_wav_test/`` (16-bit mono WAV),
    ``kws_audio.toml`` (the ``[audio]`` table that makes the spectrogram, run by ``device_agent.preprocess``),
    ``kws_train.npz`` and ``kws_test.npz`` (the clips through it) and ``kws_labels.txt``."""
    start, directory = time.perf_counter(), _directory(directory)
    spec = TensorSpec("x", "float32", (None, 1, 40, 49), "NCHW", "audio")
    preprocess = Preprocess.from_dict({"audio": KWS_AUDIO}, spec)
    train, y_train = _wav_files(KWS_CLIPS[0], seed=SEED + 1)
    test, y_test = _wav_files(KWS_CLIPS[1], seed=SEED + 2)
    X_train, X_test = preprocess.batch(train), preprocess.batch(test)
    model_path = directory / "kws_cnn.onnx"
    facts = _fit(_kws_net(X_train), (X_train, y_train, X_test, y_test), KWS_TRAINING, model_path)
    comment = "The WAVs of kws_wav_*/ as the model's input: 1 s at 16 kHz, a log-mel of 40 bands and 49 frames\n"
    comment += "(25 ms Hann windows every 20 ms, not centred), Slaney's mel scale, log(power + 1e-6)."
    paths = {
        "model": str(model_path),
        "train_audio": _write_folder(directory / "kws_wav_train", train, y_train, "wav"),
        "test_audio": _write_folder(directory / "kws_wav_test", test, y_test, "wav"),
        "train": _savez(directory / "kws_train.npz", X=X_train, y=y_train),
        "test": _savez(directory / "kws_test.npz", X=X_test, y=y_test),
        "labels": _write_labels(directory / "kws_labels.txt", KWS_LABELS),
        "preprocess": _write_toml(directory / "kws_audio.toml", "audio", KWS_AUDIO, comment),
    }
    return {**paths, **facts, "seconds": round(time.perf_counter() - start, 2)}


# -- sensor windows ---------------------------------------------------------------------------------------


def _windows(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    windows, labels = [], []
    for _ in range(per_class):
        for label, name in enumerate(SENSOR_LABELS):
            windows.append(data.sensor_window(name, rng))
            labels.append(label)
    return np.stack(windows), np.asarray(labels, np.int64)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def make_sensor_cnn(directory: str | Path) -> dict[str, Any]:
    """A 1-D CNN on synthetic accelerometer windows (idle, walk, run, shake; 128 samples at 50 Hz, in g):
    "x" ``[N, 3, 128]`` (NCW) -> two Conv (kernel 5) + ReLU -> GlobalAveragePool -> "embedding" ``[N, 32]``
    -> Gemm -> "probabilities" ``[N, 4]``.

    Writes ``sensor_cnn.onnx``, ``sensor_train.npz``, ``sensor_test.npz``, ``sensor_npy/`` (each test
    window as one ``[3, 128]`` float32 ``.npy``), ``sensor_window.toml`` (a ``[sensor]`` table without
    normalisation: the model takes raw g) and ``sensor_labels.txt``."""
    start, directory = time.perf_counter(), _directory(directory)
    X_train, y_train = _windows(SENSOR_WINDOWS[0], seed=SEED + 1)
    X_test, y_test = _windows(SENSOR_WINDOWS[1], seed=SEED + 2)
    rng = np.random.default_rng(SEED)
    net = nn.Sequential(
        [
            nn.Conv1d(3, 16, 5, pad=2, rng=rng),
            nn.ReLU(),
            nn.Conv1d(16, 32, 5, pad=2, rng=rng),
            nn.ReLU(),
            nn.GlobalAvgPool(),
            nn.Dense(32, len(SENSOR_LABELS), rng=rng),
        ]
    )
    model_path = directory / "sensor_cnn.onnx"
    facts = _fit(net, (X_train, y_train, X_test, y_test), SENSOR_TRAINING, model_path)
    paths = {
        "model": str(model_path),
        "train": _savez(directory / "sensor_train.npz", X=X_train, y=y_train),
        "test": _savez(directory / "sensor_test.npz", X=X_test, y=y_test),
        "windows": _write_folder(directory / "sensor_npy", [_npy_bytes(w) for w in X_test], y_test, "npy"),
        "labels": _write_labels(directory / "sensor_labels.txt", SENSOR_LABELS),
        "preprocess": _write_toml(
            directory / "sensor_window.toml", "sensor", {}, "The .npy windows of sensor_npy/ as they are (g)."
        ),
    }
    return {**paths, **facts, "seconds": round(time.perf_counter() - start, 2)}


TENSOR_FIXTURES: dict[str, Callable[[str | Path], dict[str, Any]]] = {
    "digits_cnn": make_digits_cnn,
    "mobilenet96": make_mobilenet96,
    "kws_cnn": make_kws_cnn,
    "sensor_cnn": make_sensor_cnn,
}


def make_tensor_fixtures(directory: str | Path, names: tuple[str, ...] = tuple(TENSOR_FIXTURES)) -> dict[str, dict]:
    """Each named tensor fixture made into ``directory``: its paths and facts by name."""
    return {name: TENSOR_FIXTURES[name](directory) for name in names}
