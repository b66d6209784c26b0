"""Tensor signals: a batch of images, spectrograms or sensor windows as one row of numbers per example.

A profile sketches columns. A tensor model's input is not a handful of columns but 27,648 numbers
an image, and sketching each element would cost more than the model and test nothing useful (one
pixel of a random crop says little). So each example is reduced to a few *signals* that move when
the world in front of the sensor moves, and those are sketched with the profile's ordinary numeric
sketches: the profile format, merging, the compact summary, the collector and the dashboard see
columns, as for a table.

Signals, for an input named ``x`` (``names``, with ``per_row``: values each example gives that sketch):

- per channel ``c`` (``x.c0``, ``x.c1``, ...): ``values`` (``per_row`` = ``subsample``): the element
  values at a fixed subsample of positions, the same on host and device (drawn once from ``seed``):
  one histogram of the channel's values, cheap at any resolution; ``mean`` and ``std`` over the whole
  example; for sensor windows also ``activity``, the RMS of the first difference in time (a still
  device, a loose mount). A channel of one element per example gets only ``values`` (a vector input
  is sketched like a table's row); more than ``MAX_CHANNELS`` channels are one pool, ``x.values``,
  ``x.mean``, ``x.std``, without the kind's signals, which need the channels apart.
- images: ``brightness`` (the mean of the channel means, in the model's input units), ``contrast``
  (the std of the gray image, the mean of the channels), ``saturated`` (the fraction of elements at
  or past what raw 0 or 255 become, ``value_range``, within ``SATURATION_TOLERANCE`` of its width:
  blown highlights, crushed shadows; skipped without ``value_range``) and ``sharpness`` (the variance
  of the Laplacian of the gray image block-averaged down to at most ``SHARPNESS_SIZE`` pixels a side:
  focus and motion blur remove the high frequencies the Laplacian measures; the downsample makes it
  cheap and keeps pixel noise and JPEG blocks, which the Laplacian would amplify, out of it: on the
  sample-image crops a radius-1.5 Gaussian blur divides it by 4, median over crops, at 32 pixels a
  side, by 10 at 48 and by 50 at full size, against a spread of a factor 5 (one log-sd) across clean
  crops: at 32 it flags every blurred 200-image window of ``scripts/bench_tensor_drift.py`` alone). A
  one-channel image's brightness and contrast are its channel's mean and std, so they are not
  sketched twice.
- audio (a log-mel spectrogram, natural log of mel power as torchaudio and TensorFlow make it): ``rms``,
  the log RMS level, ``0.5 * log(mean(exp(log_mel)))`` over bands and frames (computed shifted by the
  maximum, so no exp overflows); ``spectral_centroid``, the energy-weighted mean mel band (in band
  units: 0 is the lowest). ``mel_axis`` says which axis of one example holds the bands (by default H
  of a 4-D input, C of a 3-D one: ``[audio] time_axis = "H"`` puts them on W); a 3-D input (NCW, NWC)
  is one 2-D frame of one channel, ``x.c0``, its bands never taken for channels. A dB-scaled input
  gives another monotone-ish level, which the rank-based drift tests treat much the same.
- ``embedding.0`` .. ``embedding.{dims-1}``: the model's embedding output through a fixed Gaussian
  random projection (seeded, scaled ``1 / sqrt(width)``, Johnson-Lindenstrauss: distances survive).

The subsample positions and the projection come from numpy's PCG64 raw bit stream, whose output
for a seed numpy guarantees across versions (its ``Generator`` methods it does not), so a device
with another numpy draws what the host drew. ``to_dict`` (in the bundle's manifest) keeps the seed,
the subsample size, ``value_range`` and the embedding's width and dims. Version 2 adds ``mel_axis``; it
is written only where version 1 would read otherwise (an audio input's bands off H, a 3-D spectrogram),
so agents that read version 1 keep taking image, sensor and most audio bundles; a version-1 dict reads
as it was written (bands on H, a 3-D spectrogram's bands pooled as channels).

A batch is viewed channel-first ``[N, C, P]`` (NCHW, NCW) or channel-last ``[N, P, C]`` (NHWC, NWC),
both free reshapes of the caller's array; per-channel sums are matrix products with a vector of
ones, which numpy runs fast on either (a plain ``sum`` over channel-last data is 20 times slower).
Only a layout with channels in the middle is copied. Cost: ``scripts/bench_tensor_drift.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .errors import InputError, SchemaError
from .tensors import TensorSpec

SIGNALS_VERSION = 2  # 2: ``mel_axis``, and a 3-D spectrogram is one frame of one channel (to_dict: where needed)
READABLE_SIGNALS_VERSIONS = (1, SIGNALS_VERSION)
MAX_CHANNELS = 16
SHARPNESS_SIZE = 32
SATURATION_TOLERANCE = 1e-3  # of the value range's width: a quarter of one 8-bit step is 1e-3, float32 error 1e-7
_POSITIONS_STREAM, _PROJECTION_STREAM = 1, 2


class TensorSignals:
    """Reduces a batch of one tensor input to its signal rows (module docstring): ``rows(batch)`` is
    ``[N, width]`` float32, its columns grouped sketch by sketch in ``names`` order, ``per_row`` each."""

    def __init__(
        self,
        spec: TensorSpec,
        *,
        value_range: tuple[Any, Any] | None = None,
        embedding_width: int | None = None,
        embedding_dims: int = 8,
        subsample: int = 64,
        seed: int = 0,
        mel_axis: int | None = None,
    ) -> None:
        """``value_range``: what raw 0 and 255 become after preprocessing, each a number or one per
        channel (a per-channel normalization maps them differently); None skips ``saturated``.
        ``embedding_width``: the width of the embedding output ``rows`` will be given (None: none).
        ``mel_axis``: an audio input's axis of mel bands within one example (``Preprocess.mel_axis``;
        None: H of a 4-D input, C of a 3-D one)."""
        if subsample < 1 or embedding_dims < 1 or seed < 0:
            raise SchemaError(f"tensor signals of {spec.name!r}: subsample, embedding_dims must be positive, seed >= 0")
        self.spec, self.subsample, self.seed = spec, int(subsample), int(seed)
        self.embedding_width = None if embedding_width is None else int(embedding_width)
        self.embedding_dims = int(embedding_dims)
        self._geometry()
        self.mel_axis, self._mel = self._mel_axes(mel_axis)
        self.value_range = None if value_range is None else _ranges(value_range, self._channels, spec.name)
        self.positions = subsample_positions(self._elements, self.subsample, self.seed)
        self.projection = (
            None
            if self.embedding_width is None
            else random_projection(self.embedding_width, self.embedding_dims, self.seed)
        )
        self._thresholds = None if self.value_range is None else self._saturation_thresholds()
        self._kind = self._kind_signals()
        self.names, self.per_row = self._signal_list()
        self.width = sum(self.per_row)

    def _geometry(self) -> None:
        """How a batch is viewed: channels, channel-first or not, elements per channel and their frame."""
        shape, axis = self.spec.example_shape, self.spec.channel_axis
        if self.spec.kind == "audio" and len(shape) == 2:
            axis = None  # NCW, NWC: the C axis holds mel bands, one frame with the frames, not channels
        self._axis = axis
        channels = 1 if axis is None else shape[axis - 1]
        self._pooled = channels > MAX_CHANNELS
        self._moved = not self._pooled and axis is not None and axis not in (1, len(self.spec.shape) - 1)
        self._first = axis is None or self._pooled or axis == 1 or self._moved
        self._channels = 1 if self._pooled else channels
        self._frame = shape if axis is None or self._pooled else shape[: axis - 1] + shape[axis:]
        self._elements = math.prod(self._frame)
        needs = {"image": 2, "audio": 2, "sensor": 1}.get(self.spec.kind)
        if needs is not None and not self._pooled and len(self._frame) != needs:
            raise SchemaError(
                f"{self.spec.kind} input {self.spec.describe()} has {len(self._frame)} dimensions besides "
                f"batch and channels, its signals need {needs}",
                "give the input a layout naming its channels (C), e.g. NCHW, NHWC, NCW or NWC",
            )

    def _mel_axes(self, mel_axis: int | None) -> tuple[int | None, int | None]:
        """The mel bands' axis within one example, and within the 2-D frame (None but for audio)."""
        if self.spec.kind != "audio":
            if mel_axis is not None:
                raise SchemaError(f"tensor signals of {self.spec.describe()}: mel_axis applies to audio inputs")
            return None, None
        shape = self.spec.example_shape
        example = self._default_mel_axis() if mel_axis is None else mel_axis
        channel = None if self._axis is None else self._axis - 1
        whole = isinstance(example, (int, np.integer)) and not isinstance(example, bool)
        if not whole or not 0 <= example < len(shape) or example == channel:
            raise SchemaError(
                f"tensor signals of {self.spec.describe()}: mel_axis {mel_axis} is not an axis of mel bands",
                f"give the axis of one example that holds them, 0 to {len(shape) - 1}, not the channels",
            )
        example = int(example)
        return example, example - (1 if channel is not None and example > channel else 0)

    def _default_mel_axis(self) -> int:
        """H of a 4-D input (where version 1 read the bands, and ``[audio]`` puts them by default), C of a 3-D one."""
        letter = "C" if len(self.spec.example_shape) == 2 else "H"
        return self.spec.layout.index(letter) - 1 if letter in self.spec.layout else 0

    def _signal_list(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        per_channel = [("values", len(self.positions))]
        if self._elements > 1:
            per_channel += [("mean", 1), ("std", 1)]
            if self.spec.kind == "sensor" and not self._pooled:
                per_channel.append(("activity", 1))
        prefixes = [self.spec.name] if self._pooled else [f"{self.spec.name}.c{c}" for c in range(self._channels)]
        signals = [(f"{prefix}.{name}", k) for prefix in prefixes for name, k in per_channel]
        signals += [(f"{self.spec.name}.{name}", 1) for name in self._kind]
        signals += [(f"embedding.{i}", 1) for i in range(self.embedding_dims if self.projection is not None else 0)]
        return tuple(n for n, _ in signals), tuple(k for _, k in signals)

    def _kind_signals(self) -> list[str]:
        if self._pooled:
            return []
        if self.spec.kind == "image":
            names = ["brightness", "contrast"] if self._channels > 1 else []
            names += ["saturated"] if self.value_range is not None else []
            return names + (["sharpness"] if min(self._frame) // self._sharpness_factor() >= 3 else [])
        if self.spec.kind == "audio":
            return ["rms", "spectral_centroid"]
        return []

    def _sharpness_factor(self) -> int:
        return max(1, math.ceil(max(self._frame) / SHARPNESS_SIZE))

    def _saturation_thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-element thresholds in the batch's own element order, so one comparison counts every channel."""
        low, high = self.value_range
        tolerance = SATURATION_TOLERANCE * (high - low)
        repeat = (lambda v: np.repeat(v, self._elements)) if self._first else (lambda v: np.tile(v, self._elements))
        return repeat(low + tolerance).astype(np.float32), repeat(high - tolerance).astype(np.float32)

    # -- the reduction ----------------------------------------------------------------------------
    def rows(self, batch: np.ndarray, embedding: np.ndarray | None = None) -> np.ndarray:
        """``[N, width]`` float32 signal rows of ``batch`` (``[N, *example_shape]``) and, when the signals
        have one, the model's ``embedding`` output (``[N, embedding_width]``) for the same examples; signals
        defined without an embedding ignore it (the baseline sketched none)."""
        x3 = self._view(batch)
        means, squares = _channel_sums(x3, self._first)
        means /= self._elements
        columns = [self._channel_columns(x3, means, squares)]
        if not self._pooled and self.spec.kind == "image":
            columns.append(self._image_columns(x3, means))
        elif not self._pooled and self.spec.kind == "audio":
            columns.append(_audio_columns(x3, self._first, self._frame, self._mel))
        if self.projection is not None:
            columns.append(self._embedding_columns(embedding, len(x3)))
        return np.concatenate(columns, axis=1, dtype=np.float32)

    def _view(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != len(self.spec.shape) or batch.shape[1:] != self.spec.example_shape:
            raise InputError(
                f"a batch of shape {list(batch.shape)} for tensor signals of {self.spec.describe()}",
                "give a batch of the model's input",
            )
        x = batch if batch.dtype == np.float32 else batch.astype(np.float32)
        n = len(x)
        if self._moved:  # channels in the middle (rare): the one layout that costs a copy
            return np.ascontiguousarray(np.moveaxis(x, self._axis, 1)).reshape(n, self._channels, -1)
        if self._first:
            return x.reshape(n, self._channels, self._elements)
        return x.reshape(n, self._elements, self._channels)

    def _channel_columns(self, x3: np.ndarray, means: np.ndarray, squares: np.ndarray) -> np.ndarray:
        """Each channel's group: its subsampled values, then mean, std (and activity), as ``names`` orders them."""
        values = x3[:, :, self.positions] if self._first else x3[:, self.positions, :].transpose(0, 2, 1)
        if self._elements == 1:
            return values.reshape(len(x3), -1)
        stds = np.sqrt(np.maximum(squares / self._elements - means * means, 0.0))
        parts = [values, means[:, :, None], stds[:, :, None]]
        if self.spec.kind == "sensor" and not self._pooled:
            step = np.diff(x3, axis=2 if self._first else 1)
            parts.append(np.sqrt(np.mean(np.square(step), axis=2 if self._first else 1, dtype=np.float64))[:, :, None])
        return np.concatenate(parts, axis=2, dtype=np.float32).reshape(len(x3), -1)

    def _image_columns(self, x3: np.ndarray, means: np.ndarray) -> np.ndarray:
        gray = x3[:, 0, :] if self._first else x3[:, :, 0]
        if self._channels > 1:
            gray = gray.copy()
            for c in range(1, self._channels):
                gray += x3[:, c, :] if self._first else x3[:, :, c]
            gray *= np.float32(1.0 / self._channels)
        columns = []
        if self._channels > 1:
            brightness = means.mean(axis=1)
            gray_squares = np.einsum("np,np->n", gray, gray) / np.float64(self._elements)
            columns += [brightness, np.sqrt(np.maximum(gray_squares - brightness * brightness, 0.0))]
        if self._thresholds is not None:
            flat, (low, high) = x3.reshape(len(x3), -1), self._thresholds
            columns.append(np.count_nonzero((flat <= low) | (flat >= high), axis=1) / flat.shape[1])
        if "sharpness" in self._kind:
            columns.append(_sharpness(gray.reshape(len(x3), *self._frame), self._sharpness_factor()))
        return np.stack(columns, axis=1)

    def _embedding_columns(self, embedding: np.ndarray | None, n: int) -> np.ndarray:
        if embedding is None:
            raise InputError(
                f"tensor signals of {self.spec.name!r} project an embedding, and none was given",
                "pass the model's embedding output with the batch",
            )
        embedding = np.asarray(embedding, dtype=np.float32).reshape(len(embedding), -1)
        if embedding.shape != (n, self.embedding_width):
            raise InputError(
                f"an embedding of shape {list(embedding.shape)} for a batch of {n}",
                f"give one embedding of width {self.embedding_width} per example",
            )
        return embedding @ self.projection

    # -- the manifest -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """What a device needs to reduce its batches exactly as the host reduced the baseline's."""
        doc = {
            "version": 1,
            "subsample": self.subsample,
            "seed": self.seed,
            "value_range": None if self.value_range is None else [_plain(v) for v in self.value_range],
            "embedding_width": self.embedding_width,
            "embedding_dims": self.embedding_dims,
        }
        if self.version == 2:
            doc.update(version=2, mel_axis=self.mel_axis)
        return doc

    @property
    def version(self) -> int:
        """The dict's version: 2 where version 1 would read these signals otherwise (an audio input's bands off
        H, a 3-D spectrogram), else 1, so agents that read only version 1 keep taking every other bundle."""
        if self.mel_axis is None:
            return 1
        return 2 if len(self.spec.example_shape) == 2 or self.mel_axis != self._default_mel_axis() else 1

    @classmethod
    def from_dict(cls, doc: dict[str, Any], spec: TensorSpec) -> TensorSignals:
        version = doc.get("version") if isinstance(doc, dict) else None
        if version not in READABLE_SIGNALS_VERSIONS:
            raise SchemaError(
                f"tensor signals of {spec.name!r} of version {version!r}",
                f"this agent reads versions {READABLE_SIGNALS_VERSIONS}: update the agent or repackage the model",
            )
        legacy = version == 1 and spec.kind == "audio" and len(spec.shape) == 3
        try:
            return cls(
                replace(spec, kind="tensor") if legacy else spec,  # version 1 pooled a 3-D spectrogram's bands
                value_range=None if doc.get("value_range") is None else tuple(doc["value_range"]),
                embedding_width=doc.get("embedding_width"),
                embedding_dims=int(doc.get("embedding_dims", 8)),
                subsample=int(doc["subsample"]),
                seed=int(doc["seed"]),
                mel_axis=doc.get("mel_axis"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"tensor signals of {spec.name!r} are malformed: {exc!r}") from exc


def _channel_sums(x3: np.ndarray, first: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example, per-channel sums of the elements and of their squares, ``[N, C]`` float64 each."""
    ones = np.ones(x3.shape[2 if first else 1], dtype=np.float32)
    if first:
        return (x3 @ ones).astype(np.float64), np.einsum("ncp,ncp->nc", x3, x3).astype(np.float64)
    return (ones @ x3).astype(np.float64), (ones @ np.square(x3)).astype(np.float64)


def _sharpness(gray: np.ndarray, factor: int) -> np.ndarray:
    """Variance of the 5-point Laplacian of ``gray`` (``[N, H, W]``) block-averaged by ``factor``."""
    small = _block_mean(gray, factor)
    laplacian = small[:, :-2, 1:-1] + small[:, 2:, 1:-1]
    laplacian += small[:, 1:-1, :-2]
    laplacian += small[:, 1:-1, 2:]
    laplacian -= 4 * small[:, 1:-1, 1:-1]
    flat = laplacian.reshape(len(gray), -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    return np.einsum("np,np->n", flat, flat) / flat.shape[1] - mean * mean


def _block_mean(gray: np.ndarray, factor: int) -> np.ndarray:
    """``gray`` averaged over ``factor`` x ``factor`` blocks (a ragged edge dropped), rows then columns: the
    factor's slices of a free reshape added (a reduction over the small axes costs 5 times as much)."""
    if factor == 1:
        return gray
    n, height, width = gray.shape
    h, w = height // factor, width // factor
    across = gray[:, : h * factor, : w * factor].reshape(n, h * factor, w, factor)
    columns = across[..., 0].copy()
    for i in range(1, factor):
        columns += across[..., i]
    down = columns.reshape(n, h, factor, w)
    blocks = down[:, :, 0].copy()
    for i in range(1, factor):
        blocks += down[:, :, i]
    blocks *= np.float32(1.0 / (factor * factor))
    return blocks


def _audio_columns(x3: np.ndarray, first: bool, frame: tuple[int, ...], mel: int) -> np.ndarray:
    """Log RMS level and spectral centroid (in mel bands) of log-mel examples, bands on axis ``mel`` of ``frame``."""
    n = len(x3)
    peak = x3.reshape(n, -1).max(axis=1)
    energy = np.exp(x3 - peak[:, None, None])  # <= 1: no overflow, and the shift cancels in the centroid
    grid = energy.reshape(n, -1, *frame) if first else energy.reshape(n, *frame, -1)  # [N, C, a, b] or [N, a, b, C]
    frame_axes = (2, 3) if first else (1, 2)
    bands = grid.sum(axis=(1 if first else 3, frame_axes[1 - mel]))
    total = bands.sum(axis=1, dtype=np.float64)
    level = 0.5 * (peak + np.log(total / energy[0].size))
    centroid = bands @ np.arange(frame[mel], dtype=np.float64) / total
    return np.stack([level, centroid], axis=1)


def subsample_positions(elements: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct positions in ``range(elements)`` (all when fewer), ascending, from the seed alone."""
    if count >= elements:
        return np.arange(elements, dtype=np.intp)
    keys = np.random.PCG64([seed, _POSITIONS_STREAM]).random_raw(elements)
    return np.sort(np.argsort(keys, kind="stable")[:count]).astype(np.intp)


def random_projection(width: int, dims: int, seed: int) -> np.ndarray:
    """A ``[width, dims]`` Gaussian matrix scaled ``1 / sqrt(width)``, by Box-Muller on the raw bit stream."""
    raw = np.random.PCG64([seed, _PROJECTION_STREAM]).random_raw(2 * width * dims)
    uniform = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1): the log is finite
    gauss = np.sqrt(-2.0 * np.log(uniform[0::2])) * np.cos(2.0 * np.pi * uniform[1::2])
    return (gauss.reshape(width, dims) / math.sqrt(width)).astype(np.float32)


def _ranges(value_range: Sequence[Any], channels: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        low, high = (np.broadcast_to(np.asarray(v, dtype=np.float64), (channels,)).copy() for v in value_range)
    except ValueError as exc:
        raise SchemaError(
            f"tensor signals of {name!r}: value_range {value_range!r} for {channels} channels",
            "give (low, high), each a number or one per channel",
        ) from exc
    if not (np.isfinite(low).all() and np.isfinite(high).all() and (low < high).all()):
        raise SchemaError(f"tensor signals of {name!r}: value_range {value_range!r} is not finite low < high")
    return low, high


def _plain(values: np.ndarray) -> float | list[float]:
    """One number when every channel shares it (the common case reads as it was given), else a list."""
    return float(values[0]) if (values == values[0]).all() else [float(v) for v in values]
