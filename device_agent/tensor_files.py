"""Encoded tensor items and the files that hold them: bytes in, pixels, samples or arrays out.

Two parts, both shared by the host and the device:

* item codecs: ``open_image`` (Pillow, imported on first use: only image models need it; JPEG, PNG,
  BMP and GIF only, at most ``MAX_IMAGE_PIXELS``, checked from the header before any pixel is decoded;
  JPEGs are decoded at reduced size with ``draft`` and turned upright by their EXIF orientation),
  ``read_wav`` (the standard library's ``wave``: 8 to 32-bit integer PCM, downmixed to mono, read no
  further than the clip needs) and ``load_npy`` (never pickles; the header's shape, element type and
  length are checked against the model's input before anything is allocated).
  ``device_agent.preprocess`` builds its steps on them (and the log-mel spectrogram on ``spectrogram``).
* files and folders: ``read_items`` streams batches out of a folder (recursively, sorted, hidden files
  skipped), one file or an ``.npz``; ``count_items`` sizes a progress bar; ``read_labels`` reads
  ``--labels labels.txt``. Arrays (an ``.npz``, a ``.npy`` file given as the path) are the model's input
  as they are; encoded items (image, WAV and ``.npy`` files in a folder) go through the preprocessing.

This module never imports ``preprocess`` (that one imports this one): ``read_items`` takes any object
with the few members ``Preprocessing`` names.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tokenize
import wave
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

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
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF")  # Pillow's names: its other plugins (TIFF, WEBP, EPS...) are never tried
# A 12 MP phone photo passes; 40 MP is 120 MB of RGB. Pillow's own limit is process-wide and 89 MP (an error past
# 179 MP): a 493 KB PNG of 13000x13000 would decode to 694 MB.
MAX_IMAGE_PIXELS = 40_000_000
WAV_WIDTHS = (1, 2, 3, 4)  # bytes per sample: 8, 16, 24 and 32-bit integer PCM
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"BM", "BMP"), (b"GIF8", "GIF"))
_OTHER_IMAGE_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"))
_SMALLER_IMAGE = f"scale it down to at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels"
_NPY_FIX = "save it with numpy.save, numbers only"

# EXIF orientation -> the Pillow transpose that makes the picture upright (ImageOps.exif_transpose's table)
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270"}
_ORIENTATION.update({7: "TRANSVERSE", 8: "ROTATE_90"})
_EXIF_ORIENTATION_TAG = 0x0112


class Preprocessing(Protocol):
    """What ``read_items`` uses of a ``device_agent.preprocess.Preprocess``."""

    kind: str

    def batch(self, items: list[bytes], *, source: str = ..., names: Sequence[str] | None = ...) -> np.ndarray: ...


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
    if data[:4] == b"RIFF" and data[8:12] in (b"WAVE", b"WEBP"):
        return "found a WAV file" if data[8:12] == b"WAVE" else "found a WEBP image"
    for magic, name in _IMAGE_MAGIC + _OTHER_IMAGE_MAGIC:
        if data.startswith(magic):
            return f"found {'an' if name[0] in 'AEIOU' else 'a'} {name} image"
    return f"found bytes {bytes(data[:8])!r}..." if data else "found no bytes"


def open_image(data: bytes, *, mode: str, size: tuple[int, int], source: str, row: int | None = None) -> Any:
    """The decoded, upright image. ``size`` (width, height) is what it will be resized to. A JPEG is
    decoded straight at 1/2, 1/4 or 1/8 scale (``draft``) while that stays at least twice ``size``, as
    Pillow's ``thumbnail`` does: most of the saving, and the resize after it still has pixels to average
    (at 1x a 640x427 photo to 96x96 is 2.2 levels off a full decode on average, at 2x 0.8), and in
    ``mode`` ("L" decodes luma only). Only ``IMAGE_FORMATS`` are tried, and the header's size is checked
    against ``MAX_IMAGE_PIXELS`` before a pixel is decoded (Pillow's own limit is process-wide, and 4x ours)."""
    Image = pillow()
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        _check_pixels(image.size, source, row)
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        if image.format == "JPEG":
            stored = size[::-1] if orientation in (5, 6, 7, 8) else size  # draft sees the stored, unrotated image
            image.draft(mode if mode in ("L", "RGB") else None, (2 * stored[0], 2 * stored[1]))
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: past 89 MP
        raise InputError(f"{source} is too large to decode ({exc})", _SMALLER_IMAGE, row=row) from None
    except Image.UnidentifiedImageError:
        found = sniff(data)
        if data.startswith(tuple(magic for magic, _ in _IMAGE_MAGIC)):  # the right first bytes, then garbage
            raise InputError(f"{source} is a corrupt image ({found[6:]})", "send the whole file", row=row) from None
        raise InputError(
            f"{source} is not a JPEG, PNG, BMP or GIF image ({found})",
            "send the bytes of a .jpg, .png, .bmp or .gif file",
            row=row,
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{source} is a truncated or corrupt image ({exc})", "send the whole file", row=row) from None
    if orientation in _ORIENTATION:
        image = image.transpose(getattr(Image.Transpose, _ORIENTATION[orientation]))
    return image


def _check_pixels(size: tuple[int, int], source: str, row: int | None) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{source} is {width}x{height} pixels ({width * height / 1e6:.0f} MP), more than the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP an item may decode to",
            _SMALLER_IMAGE,
            row=row,
        )


def read_wav(
    data: bytes, *, source: str, row: int | None = None, max_frames: int | None = None
) -> tuple[np.ndarray, int]:
    """``(samples, sample_rate)``: mono float32 in [-1, 1) from an 8, 16, 24 or 32-bit integer PCM WAV.
    Stereo is averaged to mono, the friendlier answer for a microphone that records two channels. At most
    ``max_frames`` are read (the clip's length; a header may claim billions): a file is truncated when it
    holds fewer frames than its header says and than were to be read."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            _check_width(width, source, row)
            declared = wav.getnframes()
            expected = declared if max_frames is None else min(declared, max_frames)
            raw = wav.readframes(expected)
    except wave.Error as exc:
        raise _wav_error(exc, data, source, row) from None
    except (EOFError, struct.error):
        raise InputError(
            f"{source} is a truncated WAV (the header is cut short)", "send the whole file", row=row
        ) from None
    except RuntimeError:  # Python 3.11's wave.Chunk.seek past a chunk's end, with no message
        raise InputError(
            f"{source} is a corrupt WAV (a chunk's size runs past its end)", "send the whole file", row=row
        ) from None
    frame_bytes = channels * width
    got = len(raw) // frame_bytes
    if got < expected:
        raise InputError(
            f"{source} is a truncated WAV (its header says {declared} frames, it holds {got})",
            "send the whole file",
            row=row,
        )
    if got == 0:
        raise InputError(f"{source} is a WAV with no samples", "send a recording", row=row)
    samples = _pcm_to_float(raw[: got * frame_bytes], width)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples, rate


def _check_width(width: int, source: str, row: int | None) -> None:
    if width not in WAV_WIDTHS:  # ``wave`` takes any width up to 8191 bytes
        raise InputError(
            f"{source} is a WAV of {8 * width}-bit samples, read are 8, 16, 24 and 32-bit integer PCM",
            "save it as 16-bit PCM WAV",
            row=row,
        )


def _wav_error(exc: wave.Error, data: bytes, source: str, row: int | None) -> InputError:
    """``wave``'s refusals in the item's words: a float or compressed WAV, no channels, or not a WAV."""
    if "unknown format" in str(exc):
        return InputError(
            f"{source} is a WAV whose samples are not integer PCM ({exc}: float or compressed)",
            "save it as 16-bit PCM WAV",
            row=row,
        )
    if "# of channels" in str(exc):
        return InputError(f"{source} is a WAV with 0 channels", "send a mono or stereo recording", row=row)
    if "sample width" in str(exc):
        return InputError(f"{source} is a WAV with 0-bit samples", "save it as 16-bit PCM WAV", row=row)
    if sniff(data) == "found a WAV file":  # RIFF/WAVE, then chunks ``wave`` cannot use
        return InputError(f"{source} is a corrupt WAV ({exc})", "send the whole file", row=row)
    return InputError(f"{source} is not a WAV file ({sniff(data)})", "send the bytes of a .wav file", row=row)


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


def load_npy(data: bytes, spec: TensorSpec, *, source: str, row: int | None = None, batch: bool = False) -> np.ndarray:
    """The array in ``.npy`` bytes: one example of ``spec`` or a batch of one (with ``batch``, of any size).
    The header is checked first (``check_npy``), so a 100-byte item claiming a terabyte allocates nothing;
    object arrays are refused (unpickling a request would run its code)."""
    stream = io.BytesIO(data)
    check_npy(stream, len(data), spec, source=source, row=row, batch=batch)
    stream.seek(0)
    try:
        return np.load(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{source} is not a readable .npy array ({exc})", _NPY_FIX, row=row) from None


def check_npy(
    stream: BinaryIO, size: int, spec: TensorSpec, *, source: str, row: int | None = None, batch: bool = False
) -> tuple[int, ...]:
    """The shape in the ``.npy`` header at the start of ``stream`` (``size`` bytes long), checked before
    the data is read: numbers (not objects, strings or true/false), one example of ``spec`` or ``[1,
    *example]`` (with ``batch``, ``[n, *example]``), and as many bytes left as that takes."""
    shape, dtype = read_npy_header(stream, source=source, row=row)
    where = f"{source} {spec.name!r}"
    if dtype.kind == "b":
        raise InputError(f"{where} holds true/false", f"send numbers of type {spec.dtype}", row=row)
    if dtype.kind not in "iuf":
        raise InputError(f"{where} holds {dtype} values, not numbers", f"send numbers of type {spec.dtype}", row=row)
    example = list(spec.example_shape)
    if list(shape) not in (example, [1, *example]) and not (batch and list(shape[1:]) == example):
        raise _shape_error(spec, shape, source, row, batch)
    needed, left = math.prod(shape) * dtype.itemsize, size - stream.tell()
    if left < needed:
        raise InputError(
            f"{source} is a truncated .npy array (its header says {list(shape)} {dtype}: {needed} bytes, "
            f"it holds {left})",
            "send the whole file",
            row=row,
        )
    return shape


def read_npy_header(stream: BinaryIO, *, source: str, row: int | None = None) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` from a ``.npy`` header, nothing after it read; a garbled header is an ``InputError``."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"format version {version[0]}.{version[1]}")
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = reader(stream)
    except (ValueError, SyntaxError, tokenize.TokenError, EOFError, OSError) as exc:
        raise InputError(f"{source} is not a readable .npy array ({exc})", _NPY_FIX, row=row) from None
    return tuple(shape), dtype


def one_example(spec: TensorSpec, array: np.ndarray, *, source: str, row: int | None = None) -> np.ndarray:
    """``array`` checked as one example of ``spec`` (a batch of one is fine)."""
    if list(array.shape) not in (list(spec.example_shape), [1, *spec.example_shape]):
        raise _shape_error(spec, array.shape, source, row, False)
    try:
        return check_tensor(spec, array, source=source)[0]
    except InputError as exc:
        exc.row = row
        raise


def _shape_error(spec: TensorSpec, shape: Sequence[int], source: str, row: int | None, batch: bool) -> InputError:
    example, letters = list(spec.example_shape), spec.layout[1:]
    one = list(shape[1:]) if len(shape) == len(example) + 1 and (batch or shape[0] == 1) else list(shape)
    turned = letters and one != example and sorted(one) == sorted(example)
    batched = f"[N, {', '.join(map(str, example))}]"
    takes = f"a batch of shape {batched} or one example" if batch else f"one example of shape {example}"
    send = f"send a batch of shape {batched}" if batch else f"send an array of shape {example}"
    return InputError(
        f"{source} holds an array of shape {list(shape)}, the model takes {takes}",
        f"the dimensions are in another order: send {letters}" if turned else send,
        row=row,
    )


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
            rows = [
                one_example(spec, load_npy(b, spec, source=s), source=s) for b, s in zip(items, sources, strict=True)
            ]
            yield names, np.stack(rows)
        else:
            yield names, preprocess.batch(items, names=sources)


def count_items(path: str | Path, spec: TensorSpec | None = None) -> int:
    """How many examples ``read_items`` will yield, for a progress bar: files are counted, not read;
    an ``.npz`` or ``.npy`` is sized from its header (``spec`` tells a one-example ``.npy`` from a batch)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".npz", ".npy"):
        shape = _npz_header(path, spec, check=False)[1] if suffix == ".npz" else _npy_file_shape(path)
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
                f"give the model its preprocessing: --preprocess {TOML_EXAMPLE[found]} (convert and package take it)",
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
    array besides labels); its header checked first (``check_npy``: a batch, and no bigger than the file)."""
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as stream:
                check_npy(stream, os.fstat(stream.fileno()).st_size, spec, source=str(path), batch=True)
                stream.seek(0)
                return np.load(stream, allow_pickle=False)
        key, _ = _npz_header(path, spec, check=True)
        with np.load(path, allow_pickle=False) as arrays:
            return arrays[key]
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


def _npz_header(path: Path, spec: TensorSpec | None, *, check: bool) -> tuple[str, tuple[int, ...]]:
    """The chosen array's name and shape, from its ``.npy`` header inside the zip (the data not read);
    with ``check``, the header checked against ``spec`` as a batch."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
            key = _npz_key(path, names, None if spec is None else spec.name)
            info = archive.getinfo(key + ".npy")
            with archive.open(info) as member:
                source = f"{path} array {key!r}"
                if check and spec is not None:
                    return key, check_npy(member, info.file_size, spec, source=source, batch=True)
                return key, read_npy_header(member, source=source)[0]
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} is not a readable .npz ({exc})", "save it with numpy, numbers only") from None


def _npy_file_shape(path: Path) -> tuple[int, ...]:
    try:
        with path.open("rb") as stream:
            return read_npy_header(stream, source=str(path))[0]
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror})", "check its permissions") from None


def _array_batches(
    path: Path, array: np.ndarray, preprocess: Preprocessing | None, spec: TensorSpec, batch: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    if array.shape == spec.example_shape:
        array = array[np.newaxis]
    for start in range(0, max(len(array), 1), batch):
        part = array[start : start + batch]
        source = f"{path} [{start}:{start + len(part)}]"
        yield [f"{path.name}[{i}]" for i in range(start, start + len(part))], check_tensor(spec, part, source=source)
