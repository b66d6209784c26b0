"""Preprocessing that travels with a tensor model: images, audio, sensor windows, and the files holding them.

Pictures are scikit-learn's two sample photos, encoded here with Pillow; audio is synthesized. Every
refusal is checked for both halves of its message: the problem and the fix.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import struct
import subprocess
import sys
import warnings
import wave
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_agent.errors import InputError, SchemaError
from device_agent.preprocess import Preprocess, log_mel
from device_agent.schema import InputSchema
from device_agent.tensor_files import MAX_IMAGE_PIXELS, count_items, read_items, read_labels, read_wav
from device_agent.tensors import TensorSpec

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000


@cache
def photo() -> np.ndarray:
    """A 214x320 RGB photo, read-only: China, the first of ``sklearn.datasets.load_sample_images()``, read
    from scikit-learn's folder without importing it (3 s)."""
    sklearn = Path(importlib.util.find_spec("sklearn").origin).parent
    with Image.open(sklearn / "datasets" / "images" / "china.jpg") as picture:
        array = np.ascontiguousarray(np.asarray(picture.convert("RGB"))[::2, ::2])
    array.setflags(write=False)
    return array


def encode(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def image_spec(shape=(None, 3, 32, 32), layout="NCHW", dtype="float32") -> TensorSpec:
    return TensorSpec("pixels", dtype, shape, layout, "image")


def image_prep(table=None, **spec) -> Preprocess:
    return Preprocess.from_dict({"image": dict(table or {})}, image_spec(**spec))


def tone(hz: float = 1000.0, seconds: float = 1.0, rate: int = RATE) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)


def wav(samples: np.ndarray, rate: int = RATE, width: int = 2) -> bytes:
    """WAV bytes of ``samples`` in [-1, 1]: shape [n] (mono) or [n, channels]."""
    x = np.asarray(samples, np.float64)
    channels = 1 if x.ndim == 1 else x.shape[1]
    top = 2 ** (8 * width - 1) - 1
    if width == 1:
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = np.round(x * top).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        raw = np.round(x * top).astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(raw)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def audio_spec(shape=(None, 1, 40, 122), layout="NCHW") -> TensorSpec:
    return TensorSpec("mel", "float32", shape, layout, "audio")


def audio_prep(table=None, spec=None) -> Preprocess:
    doc = {"sample_rate": RATE, "clip_seconds": 1.0, **(table or {})}
    return Preprocess.from_dict({"audio": doc}, spec or audio_spec())


def refused(error: type[Exception], call, *fragments: str) -> Exception:
    """``call()`` raises ``error`` whose message has a problem and a fix ("problem; fix") and every fragment."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "; " in message, message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# -- images -----------------------------------------------------------------------------------------------------


def test_decoding_a_png_is_from_array_of_its_pixels():
    prep = image_prep({"mean": [0.5, 0.4, 0.3], "std": 0.25})
    decoded = prep.decode(encode(photo()))
    assert decoded.shape == (3, 32, 32) and decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, prep.from_array(photo()))


def test_jpeg_decoded_at_reduced_size_stays_close_to_the_full_picture():
    prep = image_prep()
    drafted = prep.decode(encode(photo(), "JPEG", quality=95))
    assert np.abs(drafted - prep.from_array(photo())).mean() < 0.01


def test_nchw_and_nhwc_hold_the_same_pixels():
    data = encode(photo())
    nchw = image_prep().decode(data)
    nhwc = image_prep(shape=(None, 32, 32, 3), layout="NHWC").decode(data)
    np.testing.assert_array_equal(nchw.transpose(1, 2, 0), nhwc)
    assert 0.0 <= nchw.min() and nchw.max() <= 1.0


def test_bgr_reverses_the_channels():
    data = encode(photo())
    np.testing.assert_array_equal(image_prep({"color": "BGR"}).decode(data), image_prep().decode(data)[::-1])


def test_gray_is_luma_with_or_without_a_channel_axis():
    data = encode(photo())
    rgb = image_prep().decode(data)
    gray = image_prep(shape=(None, 1, 32, 32)).decode(data)
    assert image_prep(shape=(None, 1, 32, 32)).to_dict()["image"]["color"] == "L"
    assert np.abs(gray[0] - np.tensordot([0.299, 0.587, 0.114], rgb, axes=1)).max() < 2.5 / 255
    no_axis = image_prep(shape=(None, 32, 32), layout="NHW").decode(data)
    np.testing.assert_array_equal(no_axis, gray[0])


def test_scale_mean_and_std_apply_per_channel():
    data = encode(photo())
    raw = image_prep(dtype="uint8").decode(data).astype(np.float32)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalized = image_prep({"mean": mean, "std": std}).decode(data)
    expected = (raw / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(normalized, expected, atol=1e-5)
    scaled = image_prep({"scale": 1.0, "mean": 127.5, "std": 127.5}).decode(data)
    np.testing.assert_allclose(scaled, raw / 127.5 - 1, atol=1e-5)


def test_uint8_input_takes_the_raw_pixels():
    prep = image_prep(shape=(None, 32, 32, 3), layout="NHWC", dtype="uint8")
    assert prep.to_dict() == {"image": {"color": "RGB", "resize": "crop", "interpolation": "bilinear"}}
    decoded = prep.decode(encode(photo()))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, prep.from_array(photo()))
    exact = Image.fromarray(photo()).resize((32, 32), Image.Resampling.BILINEAR, box=(53.0, 0.0, 267.0, 214.0))
    assert np.abs(decoded.astype(int) - np.asarray(exact)).max() <= 4  # a picture 6x the size is halved first


def stripes() -> np.ndarray:
    """100 high, 300 wide: a red, a green and a blue third."""
    picture = np.zeros((100, 300, 3), np.uint8)
    for i in range(3):
        picture[:, 100 * i : 100 * (i + 1), i] = 255
    return picture


def test_crop_keeps_the_center_and_stretch_squeezes_the_whole():
    data = encode(stripes())
    cropped = image_prep(dtype="uint8", shape=(None, 3, 30, 30)).decode(data)
    inside = cropped[:, :, 1:-1]  # bilinear reaches a little past the box at the edges
    assert (inside[1] == 255).all() and (inside[[0, 2]] == 0).all()
    stretched = image_prep({"resize": "stretch"}, dtype="uint8", shape=(None, 3, 30, 30)).decode(data)
    assert (
        stretched[0, :, :8].min() == 255 and stretched[1, :, 12:18].min() == 255 and stretched[2, :, -8:].min() == 255
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_turns_the_picture_upright(fmt):
    upright = np.ascontiguousarray(photo()[:, :160])  # taller than wide once turned
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise: show it turned back clockwise
    data = encode(
        np.ascontiguousarray(np.rot90(upright, 1)), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {})
    )
    prep = image_prep({"resize": "stretch"}, shape=(None, 3, 48, 24))
    expected = prep.from_array(upright)
    if fmt == "PNG":
        np.testing.assert_array_equal(prep.decode(data), expected)
    else:
        assert np.abs(prep.decode(data) - expected).mean() < 0.02


@pytest.mark.parametrize(
    ("fmt", "array"),
    [
        ("PNG", lambda: np.asarray(Image.fromarray(photo()).convert("L"))),
        ("PNG", lambda: np.dstack([photo(), np.full(photo().shape[:2], 128, np.uint8)])),
        ("BMP", photo),
        ("GIF", lambda: np.ascontiguousarray(photo()[:64, :64])),
    ],
)
def test_gray_transparent_bmp_and_gif_pictures_decode(fmt, array):
    decoded = image_prep().decode(encode(array(), fmt))
    assert decoded.shape == (3, 32, 32) and np.isfinite(decoded).all()


@pytest.mark.parametrize(("fmt", "found"), [("TIFF", "a TIFF"), ("WEBP", "a WEBP"), ("EPS", "an EPS")])
def test_only_jpeg_png_bmp_and_gif_are_decoded(fmt, found):
    """Pillow decodes dozens of formats, each a parser an item could reach; a model's items take four."""
    refused(
        InputError,
        lambda: image_prep().decode(encode(photo(), fmt)),
        f"item is not a JPEG, PNG, BMP or GIF image (found {found} image)",
        "send the bytes of a .jpg, .png, .bmp or .gif file",
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` RGB, followed by one row of pixels: all a picture past
    the limit shows before it is decoded (a 13000x13000 one compresses to 493 KB and decodes to 694 MB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    first_row = zlib.compress(b"\0" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", first_row) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("size", "fragments"),
    [
        ((8000, 6000), ("item is 8000x6000 pixels (48 MP), more than the 40 MP an item may decode to",)),
        ((10000, 10000), ("item is too large to decode", "100000000 pixels")),  # Pillow's warning, an error here
        ((50000, 50000), ("item is too large to decode", "2500000000 pixels")),  # Pillow's error
    ],
)
def test_a_picture_past_max_image_pixels_is_refused_before_it_is_decoded(size, fragments):
    pillow_limit = Image.MAX_IMAGE_PIXELS
    refused(InputError, lambda: image_prep().decode(png_header(*size)), *fragments, "at most 40 megapixels")
    with warnings.catch_warnings():  # as on a device, where Pillow's warning is only a warning
        warnings.simplefilter("ignore")
        refused(InputError, lambda: image_prep().decode(png_header(*size)), "at most 40 megapixels")
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # ours is per item, not Pillow's process-wide one


def test_a_12_megapixel_photo_is_decoded():
    assert MAX_IMAGE_PIXELS >= 4000 * 3000
    decoded = image_prep().decode(encode(np.zeros((3000, 4000), np.uint8)))
    assert decoded.shape == (3, 32, 32) and (decoded == 0).all()


def test_an_npy_item_is_a_preprocessed_tensor():
    tensor = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    batch = image_prep().batch([npy(tensor), encode(photo())])
    np.testing.assert_array_equal(batch[0], tensor)
    refused(InputError, lambda: image_prep().batch([encode(photo()), npy(tensor[:2])]), "request item 1", "send")


def test_bad_image_items_are_named_by_index():
    prep = image_prep()
    good = encode(photo())
    error = refused(
        InputError,
        lambda: prep.batch([good, good, good, b"hello, world"]),
        "request item 3 is not a JPEG, PNG, BMP or GIF image (found bytes b'hello, w'",
        "send the bytes of a .jpg, .png, .bmp or .gif file",
    )
    assert error.row == 3
    jpeg = encode(photo(), "JPEG")
    refused(InputError, lambda: prep.decode(jpeg[: len(jpeg) // 2]), "item is a truncated or corrupt image", "whole")
    refused(InputError, lambda: prep.decode(wav(tone())), "is not a JPEG, PNG, BMP or GIF image (found a WAV file)")
    refused(InputError, lambda: prep.batch([good, "text"]), "request item 1 is a str, not bytes", "file's bytes")
    refused(InputError, lambda: prep.batch([]), "request has no items", "send at least one")
    refused(InputError, lambda: prep.from_array(photo().astype(np.float32)), "float32", "uint8 picture")


@pytest.mark.parametrize(
    ("table", "spec", "fragments"),
    [
        ({"interpolaton": "nearest"}, {}, ("unknown key 'interpolaton'", "did you mean 'interpolation'?")),
        ({"color": "CMYK"}, {}, ('[image] color = \'CMYK\' is not one of "RGB", "BGR", "L"', 'set color = "RGB"')),
        ({"color": "L"}, {}, ('[image] color = "L" makes 1 channel(s)', "takes 3", 'set color = "L" for 1 channel')),
        ({"color": "RGB"}, {"shape": (None, 1, 32, 32)}, ("makes 3 channel(s)", "takes 1", "set color")),
        ({"resize": "fit"}, {}, ("[image] resize = 'fit' is not one of", 'set resize = "crop"')),
        ({"scale": "1/255"}, {}, ("[image] scale = '1/255' is not a number", "scale = 0.0039")),
        ({"mean": [0.5, 0.5]}, {}, ("[image] mean has 2 values, the input has 3 channels", "give 3 numbers or one")),
        ({"std": [1, 0, 1]}, {}, ("[image] std = [1, 0, 1] is not positive numbers", "give 3 positive numbers")),
        ({"scale": 1.0}, {"dtype": "uint8"}, ("[image] scale does not apply", "raw uint8", "remove scale")),
        ({}, {"dtype": "int8"}, ("takes int8", "export the model with a float32 or uint8 input")),
        ({}, {"shape": (None, 3, 500), "layout": "NCW"}, ("is not an image (layout NCW)", "use [sensor]")),
    ],
)
def test_image_tables_that_do_not_fit_are_refused(table, spec, fragments):
    refused(SchemaError, lambda: image_prep(table, **spec), *fragments)


@pytest.mark.parametrize(
    ("doc", "fragments"),
    [
        ([], ("preprocessing is a list, not a table", "write one table: [image], [audio] or [sensor]")),
        ({}, ("preprocessing has no table", "write one table")),
        ({"image": {}, "audio": {}}, ("has [image] and [audio]", "the one for this model's input")),
        ({"video": {}}, ("unknown table [video]", "[image], [audio] or [sensor]")),
        ({"color": "RGB"}, ("key 'color' is outside any table", "put it under its table")),
    ],
)
def test_documents_without_one_known_table_are_refused(doc, fragments):
    refused(SchemaError, lambda: Preprocess.from_dict(doc, image_spec()), *fragments)


def test_from_toml_names_the_file(tmp_path):
    good = tmp_path / "image.toml"
    good.write_text('[image]\ncolor = "BGR"\nmean = [0.5, 0.5, 0.5]\nstd = 0.5\n')
    assert Preprocess.from_toml(good, image_spec()).to_dict()["image"]["std"] == [0.5, 0.5, 0.5]
    refused(SchemaError, lambda: Preprocess.from_toml(tmp_path / "no.toml", image_spec()), "no.toml does not exist")
    broken = tmp_path / "broken.toml"
    broken.write_text("[image\n")
    refused(SchemaError, lambda: Preprocess.from_toml(broken, image_spec()), "broken.toml is not valid TOML", "fix")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[image]\ncolour = "RGB"\n')
    refused(SchemaError, lambda: Preprocess.from_toml(wrong, image_spec()), "wrong.toml: [image] has an unknown key")


def test_importing_preprocessing_loads_no_pillow():
    code = "import sys, device_agent.preprocess, device_agent.tensor_files; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"


# -- audio ------------------------------------------------------------------------------------------------------


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    """Slaney's mel scale, written out again here so the test does not check the code with itself."""
    return np.where(mel < 15, mel * 200 / 3, 1000 * np.exp((mel - 15) * math.log(6.4) / 27))


def _htk_hz(mel: np.ndarray) -> np.ndarray:
    return 700 * (10 ** (mel / 2595) - 1)


@pytest.mark.parametrize(
    ("scale", "top_mel", "to_hz"),
    [
        ("slaney", 15 + 27 * math.log(8) / math.log(6.4), _slaney_hz),
        ("htk", 2595 * math.log10(1 + 8000 / 700), _htk_hz),
    ],
)
def test_a_1khz_tone_peaks_in_the_band_centered_nearest_1khz(scale, top_mel, to_hz):
    spectrogram = log_mel(tone(1000.0), RATE, n_mels=40, mel_scale=scale)
    centers = to_hz(np.linspace(0, top_mel, 42))[1:-1]
    assert spectrogram.shape == (40, 122)
    assert spectrogram.mean(axis=1).argmax() == np.abs(centers - 1000).argmin()
    louder = log_mel(2 * tone(1000.0), RATE, n_mels=40, mel_scale=scale)  # log power: x2 amplitude is + log 4
    np.testing.assert_allclose(louder.max() - spectrogram.max(), math.log(4), atol=1e-3)


@pytest.mark.parametrize(
    ("scale", "bands", "expected"),
    [
        ("slaney", [12, 13, 27, 28], [3.5449, 3.8221, 1.8176, -0.6826]),
        ("htk", [13, 14, 26, 27], [8.1633, 7.8763, 7.2281, 4.9808]),
    ],
)
def test_log_mel_is_librosas(scale, bands, expected):
    """Computed with librosa 0.11: ``np.log(librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512,
    hop_length=128, center=False, n_mels=40, htk=scale == "htk", norm=None if htk else "slaney") + 1e-6)[:, 5]``
    (the whole spectrogram agreed to 5e-7, center true with pad_mode "constant" too)."""
    t = np.arange(RATE) / RATE
    y = (0.5 * np.sin(2 * np.pi * 1000 * t) + 0.25 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    np.testing.assert_allclose(log_mel(y, RATE, mel_scale=scale)[bands, 5], expected, atol=1e-3)


@pytest.mark.parametrize(
    ("params", "frames"),
    [
        ({}, 1 + (16000 - 512) // 128),
        ({"n_fft": 400, "hop_length": 160}, 1 + (16000 - 400) // 160),
        ({"n_fft": 512, "hop_length": 160, "center": True}, 1 + 16000 // 160),
        ({"n_fft": 512, "win_length": 400, "hop_length": 320}, 1 + (16000 - 512) // 320),
    ],
)
def test_frame_counts_follow_clip_n_fft_and_hop(params, frames):
    assert log_mel(tone(), RATE, n_mels=32, **params).shape == (32, frames)
    prep = audio_prep({"n_mels": 32, **params}, audio_spec((None, 1, 32, frames)))
    as_read = np.round(tone() * 32767) / 32768  # what the 16-bit WAV holds
    np.testing.assert_allclose(prep.decode(wav(tone()))[0], log_mel(as_read, RATE, n_mels=32, **params), atol=1e-4)


def test_spectrogram_layouts_are_transposes_of_one_another():
    data = wav(tone(440.0))
    base = audio_prep().decode(data)[0]  # [mels, frames]
    layouts = {
        ((None, 40, 122, 1), "NHWC"): lambda x: x[..., 0],
        ((None, 40, 122), "NCW"): lambda x: x,
        ((None, 122, 40), "NWC"): lambda x: x.T,
        ((None, 1, 122, 40), "NCHW"): lambda x: x[0].T,
    }
    for (shape, layout), back in layouts.items():
        table = {"time_axis": "H"} if shape == (None, 1, 122, 40) else {}
        np.testing.assert_array_equal(back(audio_prep(table, audio_spec(shape, layout)).decode(data)), base)


def test_short_clips_are_padded_and_long_ones_cut():
    prep = audio_prep()
    full = prep.decode(wav(tone()))
    np.testing.assert_array_equal(prep.decode(wav(np.concatenate([tone(), tone()]))), full)
    half = prep.decode(wav(tone(seconds=0.5)))
    np.testing.assert_allclose(half[..., :50], full[..., :50], atol=1e-4)
    np.testing.assert_allclose(half[..., -1], math.log(1e-6), atol=1e-5)  # silence is log(log_offset)


@pytest.mark.parametrize("width", [1, 3, 4])
def test_8_24_and_32_bit_wavs_read_like_16_bit(width):
    prep = audio_prep()
    loud = prep.decode(wav(tone(), width=2)) > -5  # 8-bit noise floor aside, the tone's bands match
    np.testing.assert_allclose(prep.decode(wav(tone(), width=width))[loud], prep.decode(wav(tone()))[loud], atol=0.05)


def test_stereo_is_downmixed_to_mono():
    prep = audio_prep()
    both = np.stack([tone(), tone()], axis=1)
    np.testing.assert_array_equal(prep.decode(wav(both)), prep.decode(wav(tone())))
    cancelled = prep.decode(wav(np.stack([tone(), -tone()], axis=1)))
    np.testing.assert_allclose(cancelled, math.log(1e-6), atol=1e-3)


def _float_wav(samples: np.ndarray) -> bytes:
    data = np.asarray(samples, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, RATE, RATE * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_bad_audio_items_are_refused_with_the_fix():
    prep = audio_prep()
    good = wav(tone())
    refused(
        InputError,
        lambda: prep.batch([wav(tone(rate=44100), rate=44100)]),
        "request item 0 is 44100 Hz audio, the model takes 16000 Hz; resample it to 16000 Hz",
    )
    refused(InputError, lambda: prep.batch([good, good[:-16000]]), "request item 1 is a truncated WAV (its header")
    refused(InputError, lambda: prep.decode(good[:30]), "item is a truncated WAV", "send the whole file")
    refused(InputError, lambda: prep.decode(encode(photo(), "JPEG")), "is not a WAV file (found a JPEG image)")
    refused(InputError, lambda: prep.decode(_float_wav(tone())), "not integer PCM", "save it as 16-bit PCM WAV")
    refused(InputError, lambda: prep.decode(wav(np.zeros(0))), "is a WAV with no samples", "send a recording")


def wav_by_hand(*, width: int = 2, channels: int = 1, data: bytes = b"", data_size: int | None = None) -> bytes:
    """A PCM WAV ``wave`` would not write: any sample width or channel count, any size in the data chunk's header."""
    fmt = struct.pack("<HHIIHH", 1, channels, RATE, RATE * width * channels, width * channels, 8 * width)
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _fmt_chunk_past_the_end() -> bytes:
    """A fmt chunk whose size runs past the file: Python 3.11's ``wave`` raises a bare RuntimeError."""
    good = wav_by_hand(data=b"\0" * 200)
    return good[:16] + struct.pack("<I", 0x10000) + good[20:]


@pytest.mark.parametrize(
    ("item", "fragments"),
    [
        (lambda: wav_by_hand(width=5, data=b"\1" * 5000), ("item is a WAV of 40-bit samples", "16-bit PCM WAV")),
        (lambda: wav_by_hand(width=8, data=b"\1" * 8000), ("item is a WAV of 64-bit samples", "16-bit PCM WAV")),
        (lambda: wav_by_hand(channels=0, data=b"\1" * 100), ("item is a WAV with 0 channels", "mono or stereo")),
        (_fmt_chunk_past_the_end, ("item is a corrupt WAV (a chunk's size runs past its end)", "the whole file")),
    ],
    ids=["40-bit", "64-bit", "no channels", "chunk past the end"],
)
def test_wavs_the_wave_module_opens_but_no_model_can_take_are_refused(item, fragments):
    refused(InputError, lambda: audio_prep().decode(item()), *fragments)


def test_a_wav_is_read_no_further_than_the_clip():
    """The preprocessing cuts every clip to clip_seconds, so no more is read, whatever the header claims: a
    recorder streaming a WAV writes the largest size it can, and a 100-byte item may claim 4 GB."""
    clip = np.round(tone() * 32767).astype("<i2").tobytes()
    streamed = wav_by_hand(data=clip + clip, data_size=0xFFFFFFF0)
    np.testing.assert_array_equal(audio_prep().decode(streamed), audio_prep().decode(wav(tone())))
    refused(
        InputError,
        lambda: audio_prep().decode(wav_by_hand(data=clip[:100], data_size=0xFFFFFFF0)),
        "item is a truncated WAV (its header says 2147483640 frames, it holds 50)",
        "send the whole file",
    )
    samples, rate = read_wav(wav(tone(seconds=10.0)), source="ten seconds", max_frames=RATE)
    assert len(samples) == RATE and rate == RATE


def test_mangled_wav_and_npy_headers_are_input_errors():
    """Random bytes in the first 120 of a WAV or ``.npy`` item are an ``InputError`` (a 400), never a
    KeyError, RuntimeError, tokenize.TokenError or MemoryError (a 500)."""
    audio, sensor = audio_prep(), sensor_prep()
    clip = tone(seconds=0.1)[:, np.newaxis]
    seeds = [(audio, wav(clip.repeat(c, axis=1), width=w)) for w, c in ((1, 1), (2, 2), (3, 1), (4, 2))]
    seeds += [(sensor, npy(np.zeros((3, 50), np.float32))), (sensor, npy(np.zeros((1, 3, 50), np.int16)))]
    rng = np.random.default_rng(0)
    for _ in range(1500):
        prep, data = seeds[rng.integers(len(seeds))]
        mangled = bytearray(data)
        for _ in range(rng.integers(1, 5)):
            mangled[rng.integers(120)] = rng.integers(256)
        try:
            prep.decode(bytes(mangled))
        except InputError:
            pass


@pytest.mark.parametrize(
    ("table", "spec", "fragments"),
    [
        ({"sample_rate": None}, None, ("[audio] sample_rate is missing", "set sample_rate = 16000")),
        ({"clip_seconds": "1s"}, None, ("[audio] clip_seconds = '1s' is not a number", "clip_seconds = 1.0")),
        ({"n_mels": 64}, None, ("[audio] n_mels = 64, input has 40 mel bands (H of NCHW", "set n_mels = 40")),
        ({"hop_length": 160}, None, ("[audio] makes 97 frames", "input has 122 (W of NCHW", "set hop_length = 128")),
        (
            {},
            audio_spec((None, 1, 40, 98)),
            ("makes 122 frames", "set hop_length = 159 or clip_seconds = 0.81", "export"),
        ),
        ({"win_length": 1024}, None, ("[audio] win_length = 1024 is longer than n_fft = 512", "win_length ≤ 512")),
        ({"n_fft": 1.5}, None, ("[audio] n_fft = 1.5 is not a whole number", "set n_fft = 512")),
        ({"fmax": 9000}, None, ("not a band within 0..8000.0 Hz", "fmin < fmax ≤ sample_rate / 2")),
        ({"power": 3}, None, ("[audio] power = 3.0 is not 1 or 2", "set power = 2.0")),
        ({"log_offset": 0}, None, ("[audio] log_offset = 0.0 is not positive", "log_offset = 1e-6")),
        ({"mel_scale": "mel"}, None, ("mel_scale = 'mel' is not one of", 'set mel_scale = "slaney"')),
        ({"center": "no"}, None, ("[audio] center = 'no' is not true or false", "set center = false")),
        ({"time_axis": "H"}, audio_spec((None, 40, 122), "NCW"), ('time_axis = "H" needs a 4-D input', "remove it")),
        ({}, audio_spec((None, 3, 40, 122)), ("has 3 channels, a spectrogram has 1", "one channel")),
        (
            {"n_mels": 128, "n_fft": 256},
            audio_spec((None, 1, 128, 247)),
            ("mel band(s) get no FFT bin", "lower n_mels"),
        ),
        ({}, TensorSpec("mel", "int8", (None, 1, 40, 122), "NCHW"), ("takes int8", "float32 input")),
        ({"nfft": 512}, None, ("[audio] has an unknown key 'nfft'", "did you mean 'n_fft'?")),
    ],
)
def test_audio_tables_that_do_not_fit_are_refused(table, spec, fragments):
    doc = {"sample_rate": RATE, "clip_seconds": 1.0, **table}
    doc = {k: v for k, v in doc.items() if v is not None}
    refused(SchemaError, lambda: Preprocess.from_dict({"audio": doc}, spec or audio_spec()), *fragments)


def test_the_suggested_frame_fixes_work():
    with pytest.raises(SchemaError) as info:
        audio_prep({}, audio_spec((None, 1, 40, 98)))
    hop = int(str(info.value).split("hop_length = ")[-1].split(" ")[0])
    seconds = float(str(info.value).split("clip_seconds = ")[-1].split(",")[0])
    for table in ({"hop_length": hop}, {"clip_seconds": seconds}):
        assert audio_prep(table, audio_spec((None, 1, 40, 98))).decode(wav(tone())).shape == (1, 40, 98)


# -- sensor windows ---------------------------------------------------------------------------------------------


def sensor_prep(table=None, dtype="float32") -> Preprocess:
    return Preprocess.from_dict({"sensor": dict(table or {})}, TensorSpec("imu", dtype, (None, 3, 50), "NCW", "sensor"))


def test_sensor_windows_are_normalized_per_channel():
    prep = sensor_prep({"mean": [1.0, 2.0, 3.0], "std": 2.0})
    window = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    expected = (window - np.array([[1.0], [2.0], [3.0]])) / 2.0
    np.testing.assert_allclose(prep.decode(npy(window)), expected, atol=1e-6)
    np.testing.assert_allclose(prep.batch([npy(window), npy(window[np.newaxis])]), [expected] * 2, atol=1e-6)
    np.testing.assert_array_equal(sensor_prep().decode(npy(window)), window)
    raw = sensor_prep(dtype="int16").decode(npy(np.arange(150, dtype=np.int16).reshape(3, 50)))
    assert raw.dtype == np.int16


def test_bad_sensor_items_and_tables_are_refused():
    prep = sensor_prep()
    refused(InputError, lambda: prep.decode(wav(tone())), "item is not a .npy array (found a WAV file)", "numpy.save")
    refused(InputError, lambda: prep.decode(npy(np.array([{"a": 1}]))), "holds object values, not numbers", "float32")
    refused(
        InputError,
        lambda: prep.batch([npy(np.zeros((50, 3)))]),
        "request item 0 holds an array of shape [50, 3], the model takes one example of shape [3, 50]",
        "the dimensions are in another order: send CW",
    )
    refused(SchemaError, lambda: sensor_prep({"mean": 1.0}, dtype="int16"), "[sensor] mean does not apply", "remove")
    refused(SchemaError, lambda: sensor_prep({"std": [1, 2]}), "[sensor] std has 2 values", "give 3 numbers")


def npy_claiming(shape: tuple[int, ...], descr: str = "<f4", header: str | None = None) -> bytes:
    """The bytes of a version 1.0 ``.npy`` header for ``shape`` (or the ``header`` text given), and no data."""
    text = header if header is not None else f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def test_an_npy_header_is_checked_before_anything_is_allocated():
    """A 100-byte item claiming 10**12 float32 (3.6 TB) was a MemoryError, a 500: the header's shape, element
    type and length are checked first, against one example of the input."""
    bomb = npy_claiming((10**12,)) + bytes(16)
    for prep in (image_prep(), sensor_prep()):
        refused(InputError, lambda p=prep: p.decode(bomb), "holds an array of shape [1000000000000]", "send an array")
    refused(
        InputError,
        lambda: sensor_prep().decode(npy_claiming((3, 50)) + bytes(16)),
        "item is a truncated .npy array (its header says [3, 50] float32: 600 bytes, it holds 16)",
        "send the whole file",
    )
    refused(InputError, lambda: sensor_prep().decode(npy(np.zeros((2, 3, 50)))), "shape [2, 3, 50]", "[3, 50]")
    for descr, words in (("|b1", "holds true/false"), ("<U4", "holds <U4 values, not numbers"), ("<c8", "complex64")):
        refused(InputError, lambda d=descr: sensor_prep().decode(npy_claiming((3, 50), d) + bytes(2400)), words)


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3, ",  # tokenize.TokenError
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 50]}",  # SyntaxError
        "{'descr': 'zz', 'fortran_order': False, 'shape': (3, 50), }",  # ValueError
        "[1, 2, 3]",
    ],
)
def test_a_garbled_npy_header_is_an_input_error(header):
    item = npy_claiming((), header=header) + bytes(600)
    refused(InputError, lambda: sensor_prep().decode(item), "item is not a readable .npy array", "numpy.save")


def test_a_npy_file_holds_a_batch_no_bigger_than_the_file(tmp_path):
    """A ``.npy`` file given as the path may hold a batch (the model's input as it is); its header may not
    claim more than the file holds, nor an array of another shape. In a folder, each ``.npy`` is one item."""
    spec = image_spec()
    (tmp_path / "claims.npy").write_bytes(npy_claiming((10**9, 3, 32, 32)) + bytes(4096))
    refused(InputError, lambda: next(read_items(tmp_path / "claims.npy", None, spec)), "claims.npy is a truncated .npy")
    np.save(tmp_path / "turned.npy", np.zeros((2, 32, 32, 3), np.float32))
    refused(
        InputError,
        lambda: next(read_items(tmp_path / "turned.npy", None, spec)),
        "turned.npy holds an array of shape [2, 32, 32, 3], the model takes a batch of shape [N, 3, 32, 32]",
        "the dimensions are in another order: send CHW",
    )
    folder = tmp_path / "items"
    folder.mkdir()
    np.save(folder / "five.npy", np.zeros((5, 3, 32, 32), np.float32))
    refused(InputError, lambda: next(read_items(folder, None, spec)), "five.npy holds an array of shape [5, 3, 32, 32]")
    (tmp_path / "garbled.npy").write_bytes(npy_claiming((), header="{'descr': '<f4', 'shape': (") + bytes(8))
    refused(InputError, lambda: count_items(tmp_path / "garbled.npy", spec), "garbled.npy is not a readable .npy")


# -- to_dict ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: image_prep({"color": "BGR", "mean": 0.5, "interpolation": "bicubic"}),
        lambda: image_prep(dtype="uint8"),
        lambda: audio_prep({"n_fft": 400, "hop_length": 160, "mel_scale": "htk"}, audio_spec((None, 40, 98), "NCW")),
        lambda: sensor_prep({"std": [1.0, 2.0, 4.0]}),
        lambda: sensor_prep(dtype="int16"),
    ],
)
def test_to_dict_pins_every_default_and_round_trips_through_json(make):
    prep = make()
    doc = json.loads(json.dumps(prep.to_dict()))
    again = Preprocess.from_dict(doc, prep.spec)
    assert again.to_dict() == prep.to_dict() == doc
    assert again.settings == prep.settings


def test_to_dict_of_audio_holds_every_resolved_value():
    assert audio_prep().to_dict() == {
        "audio": {
            "sample_rate": 16000,
            "clip_seconds": 1.0,
            "n_fft": 512,
            "hop_length": 128,
            "win_length": 512,
            "n_mels": 40,
            "fmin": 0.0,
            "fmax": 8000.0,
            "power": 2.0,
            "log_offset": 1e-6,
            "mel_scale": "slaney",
            "center": False,
            "time_axis": "W",
        }
    }


# -- files and folders ------------------------------------------------------------------------------------------


def photo_folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("hidden folders are skipped")
    (root / ".DS_Store").write_bytes(b"hidden files too")
    (root / "b.png").write_bytes(encode(photo()))
    (root / "a.JPG").write_bytes(encode(photo(), "JPEG"))
    (root / "sub" / "c.bmp").write_bytes(encode(np.ascontiguousarray(photo()[:, ::-1]), "BMP"))
    (root / "sub" / "deeper" / "d.npy").write_bytes(npy(np.zeros((3, 32, 32), np.float32)))
    return root


def test_a_folder_streams_sorted_batches_with_relative_names(tmp_path):
    root = photo_folder(tmp_path / "photos")
    prep = image_prep()
    batches = list(read_items(root, prep, prep.spec, batch=3))
    assert [names for names, _ in batches] == [["a.JPG", "b.png", "sub/c.bmp"], ["sub/deeper/d.npy"]]
    assert batches[0][1].shape == (3, 3, 32, 32) and batches[1][1].shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(batches[0][1][1], prep.decode((root / "b.png").read_bytes()))
    assert not batches[1][1].any()
    assert count_items(root) == 4


def test_a_folder_fails_on_a_stray_file_before_decoding_anything(tmp_path):
    root = photo_folder(tmp_path / "photos")
    (root / "sub" / "notes.txt").write_text("not an item")
    prep = image_prep()
    refused(
        InputError,
        lambda: next(read_items(root, prep, prep.spec)),
        "photos/sub/notes.txt is not an item file",
        "keep only images (.jpg .jpeg .png .bmp .gif), audio (.wav) or tensors (.npy)",
    )


def test_items_of_the_wrong_kind_or_without_preprocessing_are_refused(tmp_path):
    root = photo_folder(tmp_path / "photos")
    refused(
        InputError,
        lambda: next(read_items(root, None, image_spec())),
        "photos/a.JPG is an image and needs preprocessing",
        "--preprocess image.toml",
    )
    (root / "sub" / "e.wav").write_bytes(wav(tone()))
    prep = image_prep()
    refused(InputError, lambda: next(read_items(root, prep, prep.spec)), "e.wav is audio, the model takes images")


def test_a_bad_file_is_named_and_earlier_batches_already_streamed(tmp_path):
    root = photo_folder(tmp_path / "photos")
    (root / "sub" / "z.png").write_bytes(b"\x89PNG not really")
    prep = image_prep()
    items = read_items(root, prep, prep.spec, batch=2)
    assert next(items)[0] == ["a.JPG", "b.png"]
    refused(InputError, lambda: list(items), "photos/sub/z.png is a corrupt image (a PNG image)", "whole file")


def test_single_files_npy_batches_and_wav_folders(tmp_path):
    prep = image_prep()
    (tmp_path / "one.png").write_bytes(encode(photo()))
    [(names, batch)] = list(read_items(tmp_path / "one.png", prep, prep.spec))
    assert names == ["one.png"] and batch.shape == (1, 3, 32, 32)
    np.save(tmp_path / "many.npy", np.ones((5, 3, 32, 32), np.float32))
    parts = list(read_items(tmp_path / "many.npy", None, image_spec(), batch=2))
    assert [len(b) for _, b in parts] == [2, 2, 1] and parts[2][0] == ["many.npy[4]"]
    assert count_items(tmp_path / "many.npy", image_spec()) == 5
    clips = tmp_path / "clips"
    clips.mkdir()
    for name, hz in (("low.wav", 300.0), ("high.wav", 3000.0)):
        (clips / name).write_bytes(wav(tone(hz)))
    audio = audio_prep()
    [(names, batch)] = list(read_items(clips, audio, audio.spec))
    assert names == ["high.wav", "low.wav"] and batch.shape == (2, 1, 40, 122)
    np.testing.assert_allclose(batch[1], audio.decode((clips / "low.wav").read_bytes()), atol=1e-5)


def test_npz_arrays_are_taken_as_tensors(tmp_path):
    spec = image_spec()
    X = np.random.default_rng(2).random((7, 3, 32, 32), dtype=np.float32)
    np.savez(tmp_path / "named.npz", pixels=X, y=np.arange(7))
    np.savez(tmp_path / "x.npz", X=X, other=X)
    np.savez(tmp_path / "only.npz", images=X, labels=np.arange(7))
    for name in ("named.npz", "x.npz", "only.npz"):
        parts = list(read_items(tmp_path / name, image_prep(), spec, batch=4))
        np.testing.assert_array_equal(np.concatenate([b for _, b in parts]), X)
        assert parts[0][0][:2] == [f"{name}[0]", f"{name}[1]"]
        assert count_items(tmp_path / name, spec) == 7
    np.savez(tmp_path / "two.npz", a=X, b=X)
    refused(InputError, lambda: next(read_items(tmp_path / "two.npz", None, spec)), "none is named 'pixels'", "as X")
    np.savez(tmp_path / "bad.npz", X=X[:, :2])
    refused(
        InputError,
        lambda: next(read_items(tmp_path / "bad.npz", None, spec)),
        "bad.npz array 'X' holds an array of shape [7, 2, 32, 32], the model takes a batch of shape [N, 3, 32, 32]",
        "send a batch of shape [N, 3, 32, 32]",
    )
    sensor = sensor_prep({"mean": 1.0})
    np.savez(tmp_path / "imu.npz", X=np.ones((2, 3, 50), np.float32))
    # an .npz holds the model's input as it is (like a JSON tensor): never normalized a second time
    assert next(read_items(tmp_path / "imu.npz", sensor, sensor.spec))[1].all()


def test_read_labels(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\ufeffcat\n\n dog \nbird\n", encoding="utf-8")
    assert read_labels(path) == ["cat", "dog", "bird"]
    path.write_text("cat\ndog\n\ncat\n")
    refused(SchemaError, lambda: read_labels(path), "repeats 'cat' (lines 1 and 4)", "give each class one line")
    path.write_text("\n\n")
    refused(SchemaError, lambda: read_labels(path), "holds no labels", "one class name per line")
    refused(SchemaError, lambda: read_labels(tmp_path / "none.txt"), "none.txt does not exist", "check the path")


def test_arrays_are_the_input_as_they_are_and_encoded_items_are_preprocessed(tmp_path):
    """The rule (README): arrays (an ``.npz``, a ``.npy`` file given as the path, a JSON tensor) are the model's
    input as they are; encoded items (``.npy`` files in a folder, ``{"b64": ...}`` items) go through the
    preprocessing. ``Preprocess.from_tensor``, which normalized arrays too, is gone."""
    sensor = sensor_prep({"mean": 1.0})
    window = np.ones((3, 50), np.float32)
    np.save(tmp_path / "window.npy", window)
    np.savez(tmp_path / "windows.npz", X=window[np.newaxis])
    (tmp_path / "items").mkdir()
    np.save(tmp_path / "items" / "w.npy", window)
    for path in ("window.npy", "windows.npz"):
        assert (next(read_items(tmp_path / path, sensor, sensor.spec))[1] == 1).all()
    schema = InputSchema.of_tensor(sensor.spec, preprocess=sensor.to_dict())
    assert (schema.check([window.tolist()]) == 1).all()
    assert (next(read_items(tmp_path / "items", sensor, sensor.spec))[1] == 0).all()
    assert (schema.check([{"b64": base64.b64encode(npy(window)).decode()}]) == 0).all()
    assert not hasattr(Preprocess, "from_tensor")
