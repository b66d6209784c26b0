"""The data of the tensor fixtures, generated deterministically: every draw comes from a seeded generator.

- images: crops of the two photographs scikit-learn ships (``load_sample_images``: a temple in
  China, a flower), and digits upscaled to RGB (``sample_image_crops``); ``region_crops`` labels a
  crop by which photograph and which of its five vertical bands it came from (10 classes).
- audio: 1 s, 16 kHz mono clips of six kinds of sound over background noise (``audio_clip``),
  16-bit WAV bytes (``wav_bytes``), and a numpy log-mel front end (``log_mel``) for as long as
  ``device_agent.preprocess`` does not provide one.
- sensor windows: 3-axis accelerometer windows of 128 samples at 50 Hz in g, idle, walking,
  running or shaken, the device held in a random orientation (``sensor_window``).
- ``preprocess_image``: JPEG/PNG bytes to a CHW float32 tensor (colour, resize, scale, mean, std).

Imports: numpy and Pillow (the vision extra), scikit-learn for the datasets.
"""

from __future__ import annotations

import io
import wave
from typing import Any

import numpy as np

from edgekit.errors import require

KWS_LABELS = ("silence", "tone_low", "tone_high", "chirp_up", "chirp_down", "noise_burst")
SENSOR_LABELS = ("idle", "walk", "run", "shake")
SAMPLE_RATE = 16000
SENSOR_RATE = 50
SENSOR_LENGTH = 128
JITTER = 0.06  # how far a crop's centre may stray from its class's anchor (fraction of the photograph)


def _pil() -> Any:
    return require("PIL.Image", "vision")


def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(image, dtype=np.uint8) for image in load_sample_images().images]


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    image = _pil()
    return np.asarray(image.fromarray(pixels).resize((size, size), image.BILINEAR))


def _crop(photo: np.ndarray, box: tuple[int, int, int], flip: bool, size: int) -> np.ndarray:
    top, left, side = box
    pixels = photo[top : top + side, left : left + side]
    return _resize(np.ascontiguousarray(pixels[:, ::-1] if flip else pixels), size)


def sample_image_crops(n: int, size: int = 96, seed: int = 0, source: str = "sample") -> np.ndarray:
    """``n`` RGB images ``[n, size, size, 3]`` uint8: random square crops (a sixth to two thirds of the
    short side, flipped at random) of scikit-learn's sample photographs, or with ``source="digits"``
    scikit-learn's 8x8 digits (pixel ``round(v * 255 / 16)``) upscaled bilinearly and made RGB."""
    rng = np.random.default_rng(seed)
    if source == "digits":
        from sklearn.datasets import load_digits

        pixels = np.round(load_digits().images * 255 / 16).astype(np.uint8)
        chosen = pixels[rng.choice(len(pixels), size=n, replace=n > len(pixels))]
        return (
            np.stack([np.repeat(_resize(d, size)[..., np.newaxis], 3, axis=2) for d in chosen]) if n else _empty(size)
        )
    if source != "sample":
        raise ValueError(f"source must be 'sample' or 'digits', not {source!r}")
    photos, crops = sample_photos(), []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        short = min(photo.shape[:2])
        side = int(rng.integers(short // 6, 2 * short // 3 + 1))
        top, left = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
        crops.append(_crop(photo, (top, left, side), bool(rng.integers(2)), size))
    return np.stack(crops) if crops else _empty(size)


def _empty(size: int) -> np.ndarray:
    return np.zeros((0, size, size, 3), np.uint8)


# where the classes of region_crops are centred, as fractions of a photograph's (height, width)
ANCHORS = ((0.25, 0.2), (0.25, 0.8), (0.75, 0.2), (0.75, 0.8), (0.5, 0.5))


def region_crops(per_class: int, *, seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` crops ``[n, size, size, 3]`` of each of 10 classes, and their labels: class ``k``
    is a neighbourhood of photograph ``k // 5`` around ``ANCHORS[k % 5]`` (the corners and the
    centre); each crop has a random side (a quarter to three eighths of the photograph's height), a
    centre within a tenth of the side's... of the anchor, and a random flip."""
    rng = np.random.default_rng(seed)
    photos, crops, labels = sample_photos(), [], []
    for _ in range(per_class):
        for label in range(len(photos) * len(ANCHORS)):
            photo = photos[label // len(ANCHORS)]
            height, width = photo.shape[:2]
            side = int(rng.integers(height // 4, 3 * height // 8 + 1))
            cy, cx = (
                a * d + rng.uniform(-JITTER, JITTER) * d for a, d in zip(ANCHORS[label % len(ANCHORS)], (height, width))
            )
            top = int(np.clip(round(cy - side / 2), 0, height - side))
            left = int(np.clip(round(cx - side / 2), 0, width - side))
            crops.append(_crop(photo, (top, left, side), bool(rng.integers(2)), size))
            labels.append(label)
    return np.stack(crops), np.asarray(labels, np.int64)


def encode_image(pixels: np.ndarray, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    _pil().fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def preprocess_image(data: bytes, *, size: tuple[int, int], color: str, resize: str, scale: float, mean=None, std=None):
    """Encoded image bytes as a ``[C, H, W]`` float32 tensor: converted to ``color`` ("L" or "RGB"),
    resized to ``size`` (height, width) by stretching or, with ``resize="crop"``, by scaling the short
    side (bilinear) and cutting the centre; then ``pixel * scale``, minus ``mean``, over ``std`` per channel."""
    image = _pil()
    picture = image.open(io.BytesIO(data)).convert(color)
    height, width = size
    if resize == "crop":
        ratio = max(width / picture.width, height / picture.height)
        scaled = (max(width, round(picture.width * ratio)), max(height, round(picture.height * ratio)))
        picture = picture.resize(scaled, image.BILINEAR)
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        picture = picture.crop((left, top, left + width, top + height))
    else:
        picture = picture.resize((width, height), image.BILINEAR)
    pixels = np.asarray(picture, dtype=np.float32).reshape(height, width, -1) * np.float32(scale)
    if mean is not None:
        pixels = pixels - np.asarray(mean, np.float32)
    if std is not None:
        pixels = pixels / np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


# -- audio ------------------------------------------------------------------------------------------------


def _envelope(n: int, rng: np.random.Generator) -> np.ndarray:
    """A rise and fall of random length over ``n`` samples."""
    attack = max(1, int(n * rng.uniform(0.05, 0.25)))
    release = max(1, int(n * rng.uniform(0.1, 0.35)))
    env = np.ones(n)
    env[:attack] = np.linspace(0, 1, attack)
    env[n - release :] = np.minimum(env[n - release :], np.linspace(1, 0, release))
    return env


def _event(label: str, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    if label in ("tone_low", "tone_high"):
        f = rng.uniform(200, 500) if label == "tone_low" else rng.uniform(1500, 3000)
        wave_ = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        return wave_ + rng.uniform(0, 0.3) * np.sin(4 * np.pi * f * t)  # a little second harmonic
    if label in ("chirp_up", "chirp_down"):
        low, high = rng.uniform(250, 600), rng.uniform(2000, 3500)
        f0, f1 = (low, high) if label == "chirp_up" else (high, low)
        return np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * t[-1])))
    noise = rng.standard_normal(n)  # noise_burst: white noise, low-passed by a random moving average
    width = int(rng.integers(1, 4))
    return np.convolve(noise, np.ones(width) / width, mode="same") * 0.6


def audio_clip(label: str, rng: np.random.Generator, seconds: float = 1.0) -> np.ndarray:
    """One clip of ``label`` as int16 samples: a 0.25-0.7 s event at a random time and loudness
    (silence has none) over white background noise of random level."""
    n = int(SAMPLE_RATE * seconds)
    clip = rng.standard_normal(n) * rng.uniform(0.001, 0.02)
    if label != "silence":
        length = int(SAMPLE_RATE * rng.uniform(0.25, 0.7))
        start = int(rng.integers(0, n - length + 1))
        event = _event(label, length, rng) * _envelope(length, rng)
        clip[start : start + length] += event * rng.uniform(0.1, 0.6)
    return np.clip(np.round(clip * 32767), -32768, 32767).astype(np.int16)


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit mono WAV bytes as float samples in [-1, 1) (``int16 / 32768``) and the sample rate."""
    with wave.open(io.BytesIO(data), "rb") as source:
        frames = source.readframes(source.getnframes())
        return np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0, source.getframerate()


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangles, evenly spaced on the HTK mel scale, peak 1, not area-normalised."""
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0, np.minimum(rising, falling))


def log_mel(samples: np.ndarray, sample_rate: int, *, n_mels: int = 40, n_fft: int = 512, win_length: int = 400,
            hop_length: int = 320, center: bool = False, fmin: float = 0.0, fmax: float | None = None,
            log_floor: float = 1e-6) -> np.ndarray:  # fmt: skip
    """``[n_mels, frames]`` float32: ``log(mel power + log_floor)`` of a periodic Hann window of
    ``win_length`` centred in ``n_fft``, frames every ``hop_length`` (``1 + (len - n_fft) // hop``
    of them without ``center``; with it the signal is reflect-padded by ``n_fft // 2`` first)."""
    x = np.asarray(samples, np.float64)
    if center:
        x = np.pad(x, n_fft // 2, mode="reflect")
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    window = np.zeros(n_fft)
    offset = (n_fft - win_length) // 2
    window[offset : offset + win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop_length]
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    bank = mel_filterbank(sample_rate, n_fft, n_mels, fmin, sample_rate / 2 if fmax is None else fmax)
    return np.log(power @ bank.T + log_floor).T.astype(np.float32)


# -- sensor windows ---------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _motion(label: str, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[3, len(t)]`` acceleration in g beside gravity, in the world frame (z up)."""
    motion = np.zeros((3, len(t)))
    if label == "idle":
        return motion + rng.uniform(0.0, 0.02) * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t)[np.newaxis]
    if label == "shake":
        axis = rng.standard_normal(3)
        f = rng.uniform(5.0, 9.0)
        wave_ = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * (0.6 + 0.4 * np.sin(np.pi * t / t[-1]))
        return np.outer(axis / np.linalg.norm(axis), wave_ * rng.uniform(1.0, 2.5))
    f, amplitude = (rng.uniform(1.5, 2.2), rng.uniform(0.2, 0.45)) if label == "walk" else (
        rng.uniform(2.5, 3.4), rng.uniform(0.8, 1.5))  # fmt: skip
    phase = rng.uniform(0, 2 * np.pi)
    motion[2] = amplitude * (np.sin(2 * np.pi * f * t + phase) + 0.3 * np.sin(4 * np.pi * f * t + 2 * phase))
    heading = rng.uniform(0, 2 * np.pi)
    sway = 0.3 * amplitude * np.sin(np.pi * f * t + phase)
    motion[0], motion[1] = sway * np.cos(heading), sway * np.sin(heading)
    return motion


def sensor_window(label: str, rng: np.random.Generator) -> np.ndarray:
    """``[3, 128]`` float32 accelerometer readings in g (50 Hz), gravity included, the device held
    in a random orientation, with sensor noise."""
    t = np.arange(SENSOR_LENGTH) / SENSOR_RATE
    world = _motion(label, t, rng)
    world[2] += 1.0  # gravity
    noise = {"idle": 0.01, "walk": 0.04, "run": 0.08, "shake": 0.08}[label]
    device = _rotation(rng) @ world + rng.standard_normal(world.shape) * noise
    return device.astype(np.float32)
