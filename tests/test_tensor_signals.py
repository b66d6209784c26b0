"""Tensor signals: what a tensor model's profile sketches, and the drift tests on them counting examples."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from device_agent.drift import compare, compare_sketches, drift_report
from device_agent.errors import InputError, SchemaError
from device_agent.preprocess import Preprocess
from device_agent.profile import NumericSketch, Profile, build_baseline
from device_agent.tensor_signals import TensorSignals, random_projection, subsample_positions
from device_agent.tensors import TensorSpec

MEAN = np.asarray([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.asarray([0.229, 0.224, 0.225], dtype=np.float32)
VALUE_RANGE = (((0 - MEAN) / STD).tolist(), ((1 - MEAN) / STD).tolist())


def nchw(size: int = 96) -> TensorSpec:
    return TensorSpec("x", "float32", (None, 3, size, size), "NCHW", "image")


def nhwc(size: int = 96) -> TensorSpec:
    return TensorSpec("x", "float32", (None, size, size, 3), "NHWC", "image")


def raw_images(n: int, seed: int, size: int = 96) -> np.ndarray:
    """Synthetic photographs, ``[n, size, size, 3]`` uint8: blocky shapes of random colour and scale, a
    per-image exposure and texture, some highlights clipped at 255. I.i.d. for one generator."""
    rng = np.random.default_rng(seed)
    cells = size // 8
    coarse = rng.normal(size=(n, cells, cells, 3)) * rng.uniform(20, 60, (n, 1, 1, 1))
    field = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    field += rng.normal(size=(n, size, size, 3)) * rng.uniform(2, 12, (n, 1, 1, 1))
    return np.clip(field + rng.uniform(70, 190, (n, 1, 1, 1)), 0, 255).round().astype(np.uint8)


def preprocess(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((raw.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2))


def box_blur(raw: np.ndarray) -> np.ndarray:
    """Twice a 3-tap box along each axis (about a Gaussian of radius 1.2), edges repeated."""
    image = raw.astype(np.float32)
    for axis in (1, 2, 1, 2):
        padded = np.concatenate([image.take([0], axis), image, image.take([-1], axis)], axis=axis)
        n = image.shape[axis]
        image = (
            padded.take(range(0, n), axis) + padded.take(range(1, n + 1), axis) + padded.take(range(2, n + 2), axis)
        ) / 3
    return image.round().astype(np.uint8)


def column(signals: TensorSignals, rows: np.ndarray, name: str) -> np.ndarray:
    start = sum(signals.per_row[: signals.names.index(name)])
    return rows[:, start : start + signals.per_row[signals.names.index(name)]]


def test_names_per_row_and_width_follow_the_kind():
    image = TensorSignals(nchw(), value_range=VALUE_RANGE, embedding_width=1280)
    channel = ("values", "mean", "std")
    assert image.names == (
        *(f"x.c{c}.{s}" for c in range(3) for s in channel),
        "x.brightness",
        "x.contrast",
        "x.saturated",
        "x.sharpness",
        *(f"embedding.{i}" for i in range(8)),
    )
    assert image.per_row == (64, 1, 1) * 3 + (1,) * 12 and image.width == 3 * 66 + 12
    gray = TensorSignals(TensorSpec("px", "float32", (None, 1, 8, 8), "NCHW", "image"))  # no saturated: no range
    assert gray.names == ("px.c0.values", "px.c0.mean", "px.c0.std", "px.sharpness") and gray.per_row[0] == 64
    audio = TensorSignals(TensorSpec("m", "float32", (None, 1, 40, 49), "NCHW", "audio"), subsample=32)
    assert audio.names[3:] == ("m.rms", "m.spectral_centroid") and audio.per_row == (32, 1, 1, 1, 1)
    sensor = TensorSignals(TensorSpec("s", "float32", (None, 3, 128), "NCW", "sensor"))
    assert sensor.names[:4] == ("s.c0.values", "s.c0.mean", "s.c0.std", "s.c0.activity") and sensor.width == 3 * 67
    vector = TensorSignals(TensorSpec("v", "float32", (None, 5), "NC", "tensor"))  # one element a channel: a table row
    assert vector.names == tuple(f"v.c{c}.values" for c in range(5)) and vector.per_row == (1,) * 5


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (nchw(), (5, 3, 96, 96)),
        (nhwc(), (5, 96, 96, 3)),
        (TensorSpec("m", "float32", (None, 1, 40, 49), "NCHW", "audio"), (5, 1, 40, 49)),
        (TensorSpec("s", "float32", (None, 3, 128), "NCW", "sensor"), (5, 3, 128)),
        (TensorSpec("s", "float32", (None, 128, 3), "NWC", "sensor"), (5, 128, 3)),
        (TensorSpec("u", "uint8", (None, 32, 32, 3), "NHWC", "image"), (5, 32, 32, 3)),
    ],
)
def test_rows_are_float32_one_per_example_width_columns(spec, shape):
    signals = TensorSignals(spec, value_range=(0, 255) if spec.dtype == "uint8" else None)
    batch = np.random.default_rng(0).uniform(0, 255, shape).astype(spec.dtype)
    rows = signals.rows(batch)
    assert rows.dtype == np.float32 and rows.shape == (5, signals.width) and np.isfinite(rows).all()


def test_nchw_and_nhwc_of_the_same_images_give_the_same_signals():
    x = preprocess(raw_images(4, seed=1))
    first = TensorSignals(nchw(), value_range=VALUE_RANGE, embedding_width=16)
    last = TensorSignals(nhwc(), value_range=VALUE_RANGE, embedding_width=16)
    embedding = np.random.default_rng(2).normal(size=(4, 16))
    rows_first = first.rows(x, embedding)
    rows_last = last.rows(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), embedding)
    assert first.names == last.names
    np.testing.assert_allclose(rows_first, rows_last, rtol=1e-5, atol=1e-5)
    sensor = np.random.default_rng(3).normal(size=(4, 3, 128)).astype(np.float32)
    ncw = TensorSignals(TensorSpec("s", "float32", (None, 3, 128), "NCW", "sensor")).rows(sensor)
    nwc = TensorSignals(TensorSpec("s", "float32", (None, 128, 3), "NWC", "sensor")).rows(sensor.transpose(0, 2, 1))
    np.testing.assert_allclose(ncw, nwc, rtol=1e-5, atol=1e-6)


def test_brighter_images_raise_brightness_and_saturation_and_blur_lowers_sharpness():
    signals = TensorSignals(nchw(), value_range=VALUE_RANGE)
    raw = raw_images(50, seed=4)
    clean = signals.rows(preprocess(raw))
    brighter = signals.rows(preprocess(np.minimum(np.round(raw * 1.1), 255).astype(np.uint8)))
    blurred = signals.rows(preprocess(box_blur(raw)))
    assert (column(signals, brighter, "x.brightness") > column(signals, clean, "x.brightness")).all()
    assert (column(signals, brighter, "x.saturated") >= column(signals, clean, "x.saturated")).all()
    assert (column(signals, blurred, "x.sharpness") < 0.8 * column(signals, clean, "x.sharpness")).all()
    # saturated counts elements at what raw 0 and 255 become, per channel
    white = preprocess(np.full((1, 96, 96, 3), 255, dtype=np.uint8))
    assert column(signals, signals.rows(white), "x.saturated")[0, 0] == 1.0


def test_audio_level_and_centroid_and_sensor_activity_mean_what_they_say():
    spec = TensorSpec("m", "float32", (None, 1, 40, 49), "NCHW", "audio")
    signals = TensorSignals(spec)
    quiet = np.full((1, 1, 40, 49), -30.0, dtype=np.float32)
    quiet[0, 0, 10] = 0.0  # all the energy in band 10
    rows = signals.rows(np.concatenate([quiet, quiet + np.log(4.0)]))
    rms, centroid = column(signals, rows, "m.rms")[:, 0], column(signals, rows, "m.spectral_centroid")[:, 0]
    assert rms[1] - rms[0] == pytest.approx(np.log(2.0), abs=1e-5)  # 4 times the power: twice the RMS
    assert centroid == pytest.approx([10.0, 10.0], abs=1e-6)
    sensor = TensorSignals(TensorSpec("s", "float32", (None, 1, 128), "NCW", "sensor"))
    still, shaking = np.zeros((1, 1, 128)), np.sin(np.arange(128) * 2.0)[None, None]
    activity = column(sensor, sensor.rows(np.concatenate([still, shaking])), "s.c0.activity")[:, 0]
    assert activity[0] == 0 and activity[1] > 1


def spectrogram_as(layout: str, time_axis: str, mels_by_frames: np.ndarray) -> np.ndarray:
    """One ``[mels, frames]`` spectrogram as one example of an input of ``layout``; time_axis "H" puts the
    frames on H (a 3-D input keeps its bands on C)."""
    turned = mels_by_frames.T if time_axis == "H" or layout == "NWC" else mels_by_frames
    return {"NCHW": turned[np.newaxis], "NHWC": turned[..., np.newaxis]}.get(layout, turned)


AUDIO_LAYOUTS = [("NCHW", "W"), ("NCHW", "H"), ("NHWC", "W"), ("NHWC", "H"), ("NCW", "W"), ("NWC", "W")]


def audio_prep(layout: str, time_axis: str) -> Preprocess:
    shape = (None, *spectrogram_as(layout, time_axis, np.zeros((40, 49))).shape)
    table = {"sample_rate": 16000, "clip_seconds": 1.0, "hop_length": 320, "time_axis": time_axis}
    return Preprocess.from_dict({"audio": table}, TensorSpec("m", "float32", shape, layout, "audio"))


@pytest.mark.parametrize(("layout", "time_axis"), AUDIO_LAYOUTS)
def test_the_spectral_centroid_is_the_mel_band_in_every_layout(layout, time_axis):
    """``[audio] time_axis = "H"`` puts mel bands on W: with all the energy in band 5 the centroid said 24 (the
    middle frame). A 3-D input (NCW, NWC) had its bands taken for channels: no level, no centroid. The
    preprocessing says where the bands are (``Preprocess.mel_axis``), the signals take it (``mel_axis``)."""
    prep = audio_prep(layout, time_axis)
    signals = TensorSignals(prep.spec, mel_axis=prep.mel_axis)
    assert signals.names == ("m.c0.values", "m.c0.mean", "m.c0.std", "m.rms", "m.spectral_centroid")
    band_5 = np.full((40, 49), -30.0, np.float32)
    band_5[5] = 0.0
    rows = signals.rows(spectrogram_as(layout, time_axis, band_5)[np.newaxis])
    assert column(signals, rows, "m.spectral_centroid")[0, 0] == pytest.approx(5.0, abs=1e-6)
    doc = signals.to_dict()  # version 2 only where version 1 would read it otherwise: old agents take the rest
    assert doc["version"] == (2 if time_axis == "H" or layout in ("NCW", "NWC") else 1)
    assert doc.get("mel_axis", 1 if layout == "NCHW" else 0) == prep.mel_axis
    assert TensorSignals.from_dict(doc, prep.spec).mel_axis == prep.mel_axis


def test_a_clip_gives_the_same_level_and_centroid_in_every_layout():
    clip = 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(16000) / 16000)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.round(clip * 32767).astype("<i2").tobytes())
    found = []
    for layout, time_axis in AUDIO_LAYOUTS:
        prep = audio_prep(layout, time_axis)
        signals = TensorSignals(prep.spec, mel_axis=prep.mel_axis)
        rows = signals.rows(prep.batch([buffer.getvalue()]))
        found.append([column(signals, rows, f"m.{name}")[0, 0] for name in ("rms", "spectral_centroid", "c0.std")])
    np.testing.assert_allclose(found, [found[0]] * len(found), rtol=1e-4)  # float32 sums in another order


@pytest.mark.parametrize("shape", [(None, 40, 49), (None, 10, 49)])
def test_version_1_signals_read_as_they_were_written(shape):
    """Version 1 took a 3-D spectrogram's mel bands for channels (more than 16: pooled, ``m.values``) and had no
    ``mel_axis`` (bands on H): a baseline sketched then keeps its names, rows and dict."""
    v1 = {"version": 1, "subsample": 64, "seed": 0, "value_range": None, "embedding_width": None, "embedding_dims": 8}
    four = TensorSignals.from_dict(v1, TensorSpec("m", "float32", (None, 1, *shape[1:]), "NCHW", "audio"))
    assert four.mel_axis == 1 and four.to_dict() == v1 and four.names[-2:] == ("m.rms", "m.spectral_centroid")
    spec = TensorSpec("m", "float32", shape, "NCW", "audio")
    if shape[1] > 16:
        old = TensorSignals.from_dict(v1, spec)
        assert old.names == ("m.values", "m.mean", "m.std") and old.to_dict() == v1
        x = np.random.default_rng(3).normal(size=(4, *shape[1:])).astype(np.float32)
        flat = x.reshape(4, -1)
        expected = np.column_stack([flat[:, old.positions], flat.mean(axis=1), flat.std(axis=1)])
        np.testing.assert_allclose(old.rows(x), expected, rtol=1e-5, atol=1e-6)
    new = TensorSignals(spec).to_dict()
    assert new["version"] == 2 and new["mel_axis"] == 0
    assert TensorSignals.from_dict(new, spec).names[-2:] == ("m.rms", "m.spectral_centroid")


def test_a_mel_axis_that_holds_no_bands_is_refused():
    spec = TensorSpec("m", "float32", (None, 1, 40, 49), "NCHW", "audio")
    for axis in (0, 3, -1, "H"):
        with pytest.raises(SchemaError, match=f"mel_axis {axis} is not an axis of mel bands"):
            TensorSignals(spec, mel_axis=axis)
    with pytest.raises(SchemaError, match="mel_axis applies to audio inputs"):
        TensorSignals(nchw(), mel_axis=1)


def test_window_profiles_merge_into_the_profile_of_their_union():
    signals = TensorSignals(nchw(32), value_range=VALUE_RANGE)
    baseline = build_baseline(signals.rows(preprocess(raw_images(300, 5, 32))), signals.names, per_row=signals.per_row)
    assert baseline.feature("x.c0.values").count == 300 * 64 and baseline.rows == 300
    first, second = (signals.rows(preprocess(raw_images(n, seed, 32))) for n, seed in ((70, 6), (90, 7)))
    union, a, b = baseline.empty_like(), baseline.empty_like(), baseline.empty_like()
    union.update_inputs(np.concatenate([first, second]))
    a.update_inputs(first)
    b.update_inputs(second)
    merged = a.merge(b)
    for m, u in zip(merged.features, union.features, strict=True):
        assert m.counts.tolist() == u.counts.tolist() and (m.count, m.minimum, m.maximum) == (
            u.count,
            u.minimum,
            u.maximum,
        )
        assert m.total == pytest.approx(u.total, rel=1e-9, abs=1e-6) and m.total_sq == pytest.approx(
            u.total_sq, rel=1e-9
        )
    assert merged.rows == 160 and merged.feature("x.c1.values").count == 160 * 64
    # each of a per_row sketch's counts and moments is the plain sketch's of its values, all of them
    values = column(signals, first, "x.c1.values")
    plain = NumericSketch.from_values("v", values.ravel()).empty_like()
    plain.cuts, plain.low, plain.high = (
        a.feature("x.c1.values").cuts,
        a.feature("x.c1.values").low,
        a.feature("x.c1.values").high,
    )
    plain.update(values)
    single = a.empty_like()
    single.update_inputs(first)
    assert single.feature("x.c1.values").counts.tolist() == plain.counts.tolist()
    assert single.feature("x.c1.values").total == pytest.approx(plain.total)
    sent = baseline.from_compact(merged.to_compact())  # the summary's form carries per_row sketches unchanged
    assert [f.counts.tolist() for f in sent.features] == [f.counts.tolist() for f in merged.features]
    assert sent.feature("x.c0.values").count == 160 * 64 and sent.rows == 160


def test_a_per_row_sketch_is_tested_on_examples_not_on_its_values():
    """An example whose K values are one value K times carries one observation: the tests must say what
    they say of the plain sketch of one value per example."""
    rng = np.random.default_rng(8)
    base, window = rng.normal(size=1000), rng.normal(0.1, 1, size=200)
    plain = NumericSketch.from_values("v", base)
    repeated = NumericSketch("v", plain.cuts, plain.low, plain.high, per_row=64)
    repeated.update(np.repeat(base, 64))
    assert repeated.counts.tolist() == (64 * plain.counts).tolist()
    plain_window, repeated_window = plain.empty_like(), repeated.empty_like()
    plain_window.update(window)
    repeated_window.update(np.repeat(window, 64))
    assert compare_sketches(repeated, repeated_window) == compare_sketches(plain, plain_window)
    assert compare(repeated.counts, repeated_window.counts, ordered=True).p_value < 1e-6  # what K-fold counting says


@pytest.fixture(scope="module")
def image_baseline():
    signals = TensorSignals(nchw(32), value_range=VALUE_RANGE)
    rows = signals.rows(preprocess(raw_images(1000, seed=9, size=32)))
    return signals, build_baseline(rows, signals.names, per_row=signals.per_row)


def window_report(signals, baseline, raw):
    window = baseline.empty_like()
    window.update_inputs(signals.rows(preprocess(raw)))
    return drift_report(baseline, window)


def test_clean_windows_of_200_images_are_not_flagged_and_a_brightness_shift_is(image_baseline):
    signals, baseline = image_baseline
    clean = [window_report(signals, baseline, raw_images(200, seed=100 + s, size=32)) for s in range(50)]
    assert sum(r["drifted"] for r in clean) == 0
    shifted = [
        window_report(signals, baseline, np.minimum(np.round(raw_images(200, 200 + s, 32) * 1.1), 255).astype(np.uint8))
        for s in range(10)
    ]
    assert all(r["drifted"] for r in shifted)
    assert np.mean([r["features"]["x.brightness"]["psi"] for r in shifted]) > 5 * np.mean(
        [r["features"]["x.brightness"]["psi"] for r in clean]
    )


def test_to_dict_and_from_dict_reduce_batches_identically():
    spec = nhwc(32)
    signals = TensorSignals(spec, value_range=VALUE_RANGE, embedding_width=24, embedding_dims=4, subsample=16, seed=7)
    doc = signals.to_dict()
    assert doc["value_range"] == [VALUE_RANGE[0], VALUE_RANGE[1]] and doc["seed"] == 7
    again = TensorSignals.from_dict(doc, spec)
    x = np.ascontiguousarray(preprocess(raw_images(6, 10, 32)).transpose(0, 2, 3, 1))
    embedding = np.random.default_rng(11).normal(size=(6, 24))
    assert np.array_equal(again.rows(x, embedding), signals.rows(x, embedding)) and again.names == signals.names
    scalar = TensorSignals(spec, value_range=(-1.0, 1.0)).to_dict()
    assert scalar["value_range"] == [-1.0, 1.0] and scalar["embedding_width"] is None
    assert doc["version"] == scalar["version"] == 1 and "mel_axis" not in doc  # an agent reading version 1 takes it
    with pytest.raises(SchemaError, match="version"):
        TensorSignals.from_dict({**doc, "version": 99}, spec)


def test_positions_and_projection_come_from_the_seed_alone():
    """Pinned: a device with another numpy must draw what the host drew (PCG64's raw stream is stable)."""
    positions = subsample_positions(9216, 64, 0)
    assert len(set(positions.tolist())) == 64 and (np.diff(positions) > 0).all()
    assert positions[:4].tolist() == [7, 10, 130, 259]
    assert subsample_positions(50, 64, 0).tolist() == list(range(50))
    projection = random_projection(1280, 8, 0)
    assert projection.shape == (1280, 8) and projection.std() * np.sqrt(1280) == pytest.approx(1.0, abs=0.03)
    assert projection[0, :2].tolist() == pytest.approx([-0.0512783, 0.0172653], abs=1e-6)
    assert not np.array_equal(random_projection(1280, 8, 1), projection)


def test_misfits_are_refused_with_the_fix():
    signals = TensorSignals(nchw(32), embedding_width=8)
    with pytest.raises(InputError, match="shape"):
        signals.rows(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(InputError, match="embedding"):
        signals.rows(np.zeros((2, 3, 32, 32), dtype=np.float32))
    with pytest.raises(SchemaError, match="value_range"):
        TensorSignals(nchw(32), value_range=([0, 0], [1, 1]))
    with pytest.raises(SchemaError, match="layout"):
        TensorSignals(TensorSpec("x", "float32", (None, 3, 32, 32), "", "image"))


def test_profiles_without_per_row_are_written_as_before_and_per_row_round_trips():
    table = build_baseline(np.random.default_rng(12).normal(size=(100, 2)), ["a", "b"])
    assert all("per_row" not in f for f in table.to_dict()["features"])
    signals = TensorSignals(nchw(32), subsample=8)
    profile = build_baseline(signals.rows(preprocess(raw_images(40, 13, 32))), signals.names, per_row=signals.per_row)
    doc = profile.to_dict()
    assert doc["schema"] == "edgekit.profile/3" and doc["features"][0]["per_row"] == 8
    again = Profile.from_dict(doc)
    assert (
        again.baseline_id == profile.baseline_id
        and again.feature("x.c0.values").per_row == 8
        and again.width == profile.width
    )
