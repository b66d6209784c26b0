"""The data of the tensor fixtures, generated deterministically: every draw comes from a seeded generator.

- images: crops of the two photographs scikit-learn ships (``load_sample_images``: a temple in
  China, a flower), and digits upscaled to RGB (``sample_image_crops``); ``region_crops`` labels a
  crop by which photograph and which of its five vertical bands it came from (10 classes).
- audio: 1 s, 16 kHz mono clips of six kinds of sound over background noise (``audio_clip``) and
  their 16-bit WAV bytes (``wav_bytes``).
- sensor windows: 3-axis accelerometer windows of 128 samples at 50 Hz in g, idle, walking,
  running or shaken, the device held in a random orientation (``sensor_window``).

Turning images and clips into model inputs is ``device_agent.preprocess``'s job (one implementation
on the host and the device); nothing here decodes.
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
    return np.asarray(image.fromarray(pixels).resize((size, size), image.Resampling.BILINEAR))


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
PLACES = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
# load_sample_images gives china.jpg, then flower.jpg
CROP_LABELS = tuple(f"{photo}_{place}" for photo in ("china", "flower") for place in PLACES)


def region_crops(per_class: int, *, seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` crops ``[n, size, size, 3]`` of each of 10 classes (interleaved: labels 0..9, 0..9,
    ...) and their labels. Class ``k`` is the neighbourhood of ``ANCHORS[k % 5]`` (the corners and the
    centre) in photograph ``k // 5``: a square of random side (a quarter to three eighths of the
    photograph's height) whose centre strays at most ``JITTER`` from the anchor, flipped at random.
    Neighbourhoods barely overlap, so a class is a place: decisive for a linear probe of an embedding."""
    rng = np.random.default_rng(seed)
    photos, crops, labels = sample_photos(), [], []
    for _ in range(per_class):
        for label in range(len(photos) * len(ANCHORS)):
            photo = photos[label // len(ANCHORS)]
            height, width = photo.shape[:2]
            side = int(rng.integers(height // 4, 3 * height // 8 + 1))
            anchor = ANCHORS[label % len(ANCHORS)]
            cy, cx = ((a + rng.uniform(-JITTER, JITTER)) * d for a, d in zip(anchor, (height, width), strict=True))
            top = int(np.clip(round(cy - side / 2), 0, height - side))
            left = int(np.clip(round(cx - side / 2), 0, width - side))
            crops.append(_crop(photo, (top, left, side), bool(rng.integers(2)), size))
            labels.append(label)
    return np.stack(crops), np.asarray(labels, np.int64)


def encode_image(pixels: np.ndarray, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    _pil().fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


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
