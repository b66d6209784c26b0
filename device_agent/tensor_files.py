"""Encoded tensor items and the files that hold them: bytes in, pixels, samples or arrays out.

Three parts, all shared by the host and the device:

* item codecs: ``open_image`` (Pillow, imported on first use: only image models need it; JPEGs are
  decoded at reduced size with ``draft`` and turned upright by their EXIF orientation), ``read_wav``
  (the standard library's ``wave``: integer PCM, downmixed to mono) and ``load_npy`` (never pickles).
  ``device_agent.preprocess`` builds its steps on them.
* the log-mel spectrogram (``LogMel``) audio items become, window and filterbank computed once.
* files and folders: ``read_items`` streams batches out of a folder (recursively, sorted, hidden files
  skipped), one file or an ``.npz``, through the model's preprocessing; ``count_items`` sizes a
  progress bar; ``read_labels`` reads ``--labels labels.txt``.

This module never imports ``preprocess`` (that one imports this one): ``read_items`` takes any object
with the few members ``Preprocessing`` names.
"""

from __future__ import annotations

import io
import math
import os
import wave
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import InputError, SchemaError
from .tensors import TensorSpec, check_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUDIO_SUFFIXES = (".wav",)
TENSOR_SUFFIXES = (".npy",)
ACCEPTED = "images (.jpg .jpeg .png .bmp .gif), audio (.wav) or tensors (.npy)"
NPY_MAGIC = b"\x93NUMPY"
LABEL_KEYS = ("y", "labels", "label")
TOML_EXAMPLE = {"image": "image.toml", "audio": "audio.toml"}

# EXIF orientation -> the Pillow transpose that makes the picture upright (ImageOps.exif_transpose's table)
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270"}
_ORIENTATION.update({7: "TRANSVERSE", 8: "ROTATE_90"})
_EXIF_ORIENTATION_TAG = 0x0112


class Preprocessing(Protocol):
    """What ``read_items`` uses of a ``device_agent.preprocess.Preprocess``."""

    kind: str

    def batch(self, items: list[bytes], *, source: str = ..., names: Sequence[str] | None = ...) -> np.ndarray: ...

    def from_tensor(self, batch: np.ndarray, *, source: str = ...) -> np.ndarray: ...


# -- item codecs ------------------------------------------------------------------------------------------------


def pillow() -> Any:
    """``PIL.Image``, imported on first use so a device serving audio or sensor models needs no Pillow."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise SchemaError(
            "the model decodes images with Pillow, which is not installed", "pip install 'edgekit-ml[vision]'"
        ) from exc
    return Image


def sniff(data: bytes) -> str:
    """What the first bytes say an item is, for error messages ("found a PNG image")."""
    if data.startswith(NPY_MAGIC):
        return "found a .npy array"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "found a WAV file"
    for magic, name in ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"BM", "BMP"), (b"GIF8", "GIF")):
        if data.startswith(magic):
            return f"found a {name} image"
    return f"found bytes {bytes(data[:8])!r}..." if data else "found no bytes"


def open_image(data: bytes, *, mode: str, size: tuple[int, int], source: str, row: int | None = None) -> Any:
    """The decoded, upright image. ``size`` (width, height) is what it will be resized to. A JPEG is
    decoded straight at 1/2, 1/4 or 1/8 scale (``draft``) while that stays at least twice ``size``, as
    Pillow's ``thumbnail`` does: most of the saving, and the resize after it still has pixels to average
    (at 1x a 640x427 photo to 96x96 is 2.2 levels off a full decode on average, at 2x 0.8), and in
    ``mode`` ("L" decodes luma only)."""
    Image = pillow()
    try:
        image = Image.open(io.BytesIO(data))
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        if image.format == "JPEG":
            stored = size[::-1] if orientation in (5, 6, 7, 8) else size  # draft sees the stored, unrotated image
            image.draft(mode if mode in ("L", "RGB") else None, (2 * stored[0], 2 * stored[1]))
        image.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"{source} is too large to decode ({exc})", "send a smaller image", row=row) from None
    except Image.UnidentifiedImageError:
        found = sniff(data)
        if found.endswith(" image"):  # the right first bytes, then something Pillow cannot read
            raise InputError(f"{source} is a corrupt image ({found[6:]})", "send the whole file", row=row) from None
        raise InputError(
            f"{source} is not a JPEG or PNG image ({found})", "send the bytes of a .jpg or .png file", row=row
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{source} is a truncated or corrupt image ({exc})", "send the whole file", row=row) from None
    if orientation in _ORIENTATION:
        image = image.transpose(getattr(Image.Transpose, _ORIENTATION[orientation]))
    return image


def read_wav(data: bytes, *, source: str, row: int | None = None) -> tuple[np.ndarray, int]:
    """``(samples, sample_rate)``: mono float32 in [-1, 1) from an 8, 16, 24 or 32-bit integer PCM WAV.
    Stereo is averaged to mono, the friendlier answer for a microphone that records two channels."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            expected = wav.getnframes()
            raw = wav.readframes(expected)
    except wave.Error as exc:
        if "unknown format" in str(exc):
            raise InputError(
                f"{source} is a WAV whose samples are not integer PCM ({exc}: float or compressed)",
                "save it as 16-bit PCM WAV",
                row=row,
            ) from None
        raise InputError(
            f"{source} is not a WAV file ({sniff(data)})", "send the bytes of a .wav file", row=row
        ) from None
    except EOFError:
        raise InputError(
            f"{source} is a truncated WAV (the header is cut short)", "send the whole file", row=row
        ) from None
    frame_bytes = channels * width
    got = len(raw) // frame_bytes
    if got < expected:
        raise InputError(
            f"{source} is a truncated WAV (its header says {expected} frames, it holds {got})",
            "send the whole file",
            row=row,
        )
    if got == 0:
        raise InputError(f"{source} is a WAV with no samples", "send a recording", row=row)
    samples = _pcm_to_float(raw[: got * frame_bytes], width)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples, rate


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Integer PCM bytes as float32 in [-1, 1). WAV's 8-bit samples are unsigned, the others signed."""
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:  # no numpy int24: widen each little-endian triple to int32, keeping the sign in the top byte
        triples = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        wide = np.zeros((len(triples), 4), np.uint8)
        wide[:, 1:] = triples
        return wide.view("<i4")[:, 0].astype(np.float32) / float(1 << 31)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(raw, dtype).astype(np.float32) / float(1 << (8 * width - 1))


def load_npy(data: bytes, *, source: str, row: int | None = None) -> np.ndarray:
    """The array in ``.npy`` bytes; object arrays are refused (unpickling a request would run its code)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(
            f"{source} is not a readable .npy array ({exc})", "save it with numpy.save, numbers only", row=row
        ) from None


def one_example(spec: TensorSpec, array: np.ndarray, *, source: str, row: int | None = None) -> np.ndarray:
    """``array`` checked as one example of ``spec`` (a batch of one is fine)."""
    example = list(spec.example_shape)
    if list(array.shape) not in (example, [1, *example]):
        letters = spec.layout[1:]
        turned = sorted(array.shape) == sorted(example) and letters
        raise InputError(
            f"{source} holds an array of shape {list(array.shape)}, the model takes one example of shape {example}",
            f"the dimensions are in another order: send {letters}" if turned else f"send an array of shape {example}",
            row=row,
        )
    try:
        checked = check_tensor(spec, array, source=source)
    except InputError as exc:
        exc.row = row
        raise
    if len(checked) != 1:
        raise InputError(
            f"{source} holds {len(checked)} examples", "send one example per item (or one batch as a tensor)", row=row
        )
    return checked[0]


# -- the audio signal -------------------------------------------------------------------------------------------
# (here rather than in preprocess, which parses the settings, to keep both modules small)


class LogMel:
    """The log-mel spectrogram of ``[..., samples]``, with its window and filterbank computed once.
    Framing is a strided view, the FFT runs on every frame of every clip at once, the filterbank is one
    matmul. ``center`` pads with zeros, as librosa's ``pad_mode="constant"`` (its default since 0.10).
    In float64 until the log: numpy 2's float32 FFT is 3x slower (0.45 ms against 0.14 for 122 frames of
    512), and numpy 1 computes in float64 anyway, so a device on either gives the same numbers."""

    def __init__(self, settings: dict[str, Any], sample_rate: int) -> None:
        self.n_fft, self.hop, self.center = settings["n_fft"], settings["hop_length"], settings["center"]
        self.power, self.offset = settings["power"], settings["log_offset"]
        win = settings["win_length"]
        window = np.zeros(self.n_fft)  # periodic Hann, centered in n_fft as librosa pads it
        left = (self.n_fft - win) // 2
        window[left : left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
        self.window = window
        filters = mel_filters(
            sample_rate, self.n_fft, settings["n_mels"], settings["fmin"], settings["fmax"], settings["mel_scale"]
        )
        self.filters = np.ascontiguousarray(filters.T)  # [bins, mels]: frames @ filters

    def frames(self, samples: int, *, hop: int | None = None) -> int:
        padded = samples + (2 * (self.n_fft // 2) if self.center else 0)
        return 0 if padded < self.n_fft else 1 + (padded - self.n_fft) // (hop or self.hop)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.center:
            half = self.n_fft // 2
            samples = np.pad(samples, [(0, 0)] * (samples.ndim - 1) + [(half, half)])
        frames = np.lib.stride_tricks.sliding_window_view(samples, self.n_fft, axis=-1)[..., :: self.hop, :]
        spectrum = np.fft.rfft(frames * self.window, axis=-1)
        energy = spectrum.real**2 + spectrum.imag**2
        if self.power == 1.0:
            energy = np.sqrt(energy)
        mel = np.matmul(energy, self.filters)
        return np.log(mel + self.offset).astype(np.float32).swapaxes(-1, -2)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float, scale: str) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangles, as ``librosa.filters.mel``: Slaney's scale with area-normalized
    triangles (librosa's default) or HTK's scale with unit-height triangles (``htk=True, norm=None``: torchaudio's
    default). Both agree with librosa 0.11 to 1e-7 (tests/test_preprocess.py keeps its numbers)."""
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin, scale), _hz_to_mel(fmax, scale), n_mels + 2), scale)
    widths = np.diff(edges)
    ramps = edges[:, np.newaxis] - bins[np.newaxis, :]
    rising = -ramps[:-2] / widths[:-1, np.newaxis]
    falling = ramps[2:] / widths[1:, np.newaxis]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if scale == "slaney":
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, np.newaxis]
    return weights


_SLANEY_STEP = math.log(6.4) / 27.0  # Slaney's scale: linear to 1 kHz (15 mels), logarithmic above


def _hz_to_mel(hz: float, scale: str) -> float:
    if scale == "htk":
        return 2595.0 * math.log10(1.0 + hz / 700.0)
    return 15.0 + math.log(hz / 1000.0) / _SLANEY_STEP if hz >= 1000.0 else hz * 3.0 / 200.0


def _mel_to_hz(mels: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    return np.where(mels >= 15.0, 1000.0 * np.exp(_SLANEY_STEP * (mels - 15.0)), mels * 200.0 / 3.0)


# -- files and folders ------------------------------------------------------------------------------------------


def read_items(
    path: str | Path, preprocess: Preprocessing | None, spec: TensorSpec, *, batch: int = 64
) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(names, [n, *example_shape] array)`` batches from a folder, one image/WAV/.npy file, or an ``.npz``.

    A folder is listed (and every file's kind checked) before anything is decoded, so a stray file
    fails in a second, not after an hour; then ``batch`` files at a time are read and decoded, so a
    folder of 10,000 photos never sits in memory. Names are paths relative to the folder. An ``.npz``
    or ``.npy`` file given as ``path`` holds arrays that are the model's input as they are (checked,
    never normalized again, like a JSON tensor); ``.npy`` files in a folder are items, each prepared
    by the preprocessing (a raw sensor window gets its mean/std)."""
    path = Path(path)
    if batch < 1:
        raise InputError(f"batch size {batch} is not positive", "read at least one item at a time")
    if path.is_file() and path.suffix.lower() in (".npz", ".npy"):
        array = _tensor_file(path, spec)
        yield from _array_batches(path, array, preprocess, spec, batch)
        return
    files = _listing(path)
    base = path if path.is_dir() else path.parent
    _check_kinds(base, files, preprocess)
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        names, sources = [f.as_posix() for f in chunk], [str(base / f) for f in chunk]
        items = [_read_bytes(base / f) for f in chunk]
        if preprocess is None:  # only .npy files get here (_check_kinds)
            rows = [one_example(spec, load_npy(b, source=s), source=s) for b, s in zip(items, sources, strict=True)]
            yield names, np.stack(rows)
        else:
            yield names, preprocess.batch(items, names=sources)


def count_items(path: str | Path, spec: TensorSpec | None = None) -> int:
    """How many examples ``read_items`` will yield, for a progress bar: files are counted, not read;
    an ``.npz`` or ``.npy`` is sized from its header (``spec`` tells a one-example ``.npy`` from a batch)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".npz", ".npy"):
        shape = _npz_shape(path, spec) if suffix == ".npz" else np.load(path, mmap_mode="r").shape
        return 1 if spec is not None and tuple(shape) == spec.example_shape else int(shape[0]) if shape else 1
    return len(_listing(path))


def read_labels(path: str | Path) -> list[str]:
    """Class names for ``--labels labels.txt``, in output order: one per line, blank lines skipped.
    A repeated name is refused: two outputs with one name would make the reports lie."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SchemaError(f"labels file {path} does not exist", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"labels file {path} cannot be read ({exc})", "give a UTF-8 text file") from None
    labels, first_line = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        label = line.strip()
        if not label:
            continue
        if label in first_line:
            raise SchemaError(
                f"labels file {path} repeats {label!r} (lines {first_line[label]} and {number})",
                "give each class one line",
            )
        first_line[label] = number
        labels.append(label)
    if not labels:
        raise SchemaError(f"labels file {path} holds no labels", "write one class name per line, in output order")
    return labels


def _listing(path: Path) -> list[Path]:
    """The item files under ``path`` (relative, sorted; hidden files and folders skipped), or ``[path]``."""
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES + AUDIO_SUFFIXES + TENSOR_SUFFIXES:
            raise InputError(f"{path} is not an item file", f"give {ACCEPTED}, an .npz, or a folder of them")
        return [Path(path.name)]
    if not path.is_dir():
        raise InputError(f"{path} does not exist", "check the path")
    found = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            relative = Path(folder, name).relative_to(path)
            if relative.suffix.lower() not in IMAGE_SUFFIXES + AUDIO_SUFFIXES + TENSOR_SUFFIXES:
                raise InputError(f"{path / relative} is not an item file", f"keep only {ACCEPTED} in {path}")
            found.append(relative)
    return sorted(found, key=lambda p: p.parts)


def _check_kinds(root: Path, files: list[Path], preprocess: Preprocessing | None) -> None:
    """Every file's kind against the model's, by suffix, before any is read."""
    kind = None if preprocess is None else preprocess.kind
    for file in files:
        suffix = file.suffix.lower()
        found = "image" if suffix in IMAGE_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else None
        if found is None or found == kind:
            continue
        where = root / file
        if kind is None:
            raise InputError(
                f"{where} is {'an image' if found == 'image' else 'audio'} and needs preprocessing",
                f"package the model with --preprocess {TOML_EXAMPLE[found]}",
            )
        takes = {"image": "images", "audio": "audio (.wav)", "sensor": "sensor windows (.npy)"}[kind]
        raise InputError(
            f"{where} is {'an image' if found == 'image' else 'audio'}, the model takes {takes}",
            "give files of the model's kind",
        )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror})", "check its permissions") from None


def _tensor_file(path: Path, spec: TensorSpec) -> np.ndarray:
    """The array of an ``.npy``, or of an ``.npz`` (named after the input, else X or x, else its only
    array besides labels)."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as arrays:
            return arrays[_npz_key(path, list(arrays.files), spec.name)]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(
            f"{path} is not a readable {path.suffix} ({exc})", "save it with numpy, numbers only"
        ) from None


def _npz_key(path: Path, names: list[str], input_name: str | None) -> str:
    key = next((k for k in (input_name, "X", "x") if k in names), None)
    others = [k for k in names if k not in LABEL_KEYS]
    if key is None and len(others) != 1:
        raise InputError(
            f"{path} has arrays {names} and none is named {input_name or 'X'!r}",
            f"save the inputs as X (or {input_name!r}) and the labels as y",
        )
    return key or others[0]


def _npz_shape(path: Path, spec: TensorSpec | None) -> tuple[int, ...]:
    """The chosen array's shape from its ``.npy`` header inside the zip, without reading the data."""
    with zipfile.ZipFile(path) as archive:
        names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
        key = _npz_key(path, names, None if spec is None else spec.name)
        with archive.open(key + ".npy") as member:
            fmt = np.lib.format
            version = fmt.read_magic(member)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = reader(member)
    return tuple(shape)


def _array_batches(
    path: Path, array: np.ndarray, preprocess: Preprocessing | None, spec: TensorSpec, batch: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    if array.shape == spec.example_shape:
        array = array[np.newaxis]
    for start in range(0, max(len(array), 1), batch):
        part = array[start : start + batch]
        source = f"{path} [{start}:{start + len(part)}]"
        yield [f"{path.name}[{i}]" for i in range(start, start + len(part))], check_tensor(spec, part, source=source)
