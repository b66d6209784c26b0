"""The lookup-table binning (``binning.BinLookup``) gives exactly the bins the per-cut comparisons gave.

The binned drift tests and the frozen profile formats depend on every value landing in the same slot
as before, so each case compares the profile's counts against the reference: the old formula (one
comparison per cut, in the rows' dtype, against the float32 neighbours of the float64 cuts) and the
plain float64 ``searchsorted`` of ``NumericSketch.update``, on values at, just above and just below
every cut and bound, and on random data.
"""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.binning import f32_at_or_above, f32_at_or_below
from device_agent.profile import NumericSketch, Profile, build_baseline


def reference_counts(sketch: NumericSketch, values: np.ndarray) -> np.ndarray:
    """The slots as the agent computed them before the lookup table: one pass per cut."""
    values = values[np.isfinite(values)]
    if values.dtype == np.float32:
        cuts = f32_at_or_above(sketch.cuts)
        low = f32_at_or_above(np.float64(-np.inf if sketch.low is None else sketch.low))
        high = f32_at_or_below(np.float64(np.inf if sketch.high is None else sketch.high))
    else:
        cuts = sketch.cuts
        low = -np.inf if sketch.low is None else sketch.low
        high = np.inf if sketch.high is None else sketch.high
    index = np.ones(values.shape, dtype=np.intp)
    for cut in cuts:
        index += values >= cut
    index -= values < low
    index += values > high
    return np.bincount(index, minlength=len(sketch.counts))


def float64_counts(sketch: NumericSketch, values: np.ndarray) -> np.ndarray:
    plain = sketch.empty_like()
    plain.update(values.astype(np.float64))
    return plain.counts


def probes(sketch: NumericSketch, dtype: type) -> np.ndarray:
    """Every cut and bound, and its neighbours in ``dtype`` one and two steps away on either side."""
    edges = [*sketch.cuts.tolist(), *(v for v in (sketch.low, sketch.high) if v is not None)]
    points = np.asarray(edges, dtype=np.float64).astype(dtype)
    around = [points]
    for direction in (np.inf, -np.inf):
        step = points
        for _ in range(2):
            step = np.nextafter(step, dtype(direction))
            around.append(step)
    exact = np.asarray(edges, dtype=np.float64)
    if dtype == np.float64:
        around.append(exact)
    return np.concatenate(around)


def check_profile(profile: Profile, rows: np.ndarray) -> None:
    window = profile.empty_like()
    window.update_inputs(rows)
    start = 0
    for sketch, made in zip(profile.features, window.features, strict=True):
        columns = rows[:, start : start + sketch.per_row].ravel()
        start += sketch.per_row
        expected = reference_counts(sketch, columns)
        np.testing.assert_array_equal(made.counts, expected, err_msg=sketch.name)
        np.testing.assert_array_equal(made.counts, float64_counts(sketch, columns), err_msg=sketch.name)


def probe_rows(profile: Profile, dtype: type, rng: np.random.Generator) -> np.ndarray:
    """Rows whose every column runs through its own sketch's probes (shuffled, padded by repetition)."""
    columns = []
    for sketch in profile.features:
        p = probes(sketch, dtype)
        columns.extend([p] * sketch.per_row)
    length = max(len(c) for c in columns)
    return np.stack([rng.permutation(np.resize(c, length)) for c in columns], axis=1).astype(dtype)


def digits_baseline() -> tuple[Profile, np.ndarray]:
    X = np.load("fixtures/digits_train.npz")["X"]
    return build_baseline(X, [f"f{i}" for i in range(X.shape[1])]), X


@pytest.mark.parametrize("fast_add_at", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_digits_bins_at_and_beside_every_cut(dtype: type, fast_add_at: bool, monkeypatch) -> None:
    """Counted with ``np.add.at`` (numpy >= 1.25) and with ``bincount`` (older numpy, as on Raspberry Pi OS)."""
    monkeypatch.setattr("device_agent.binning._FAST_ADD_AT", fast_add_at)
    profile, X = digits_baseline()
    rng = np.random.default_rng(1)
    check_profile(profile, probe_rows(profile, dtype, rng))
    check_profile(profile, X.astype(dtype))
    noisy = X + rng.normal(scale=0.5, size=X.shape)
    check_profile(profile, noisy.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mixed_columns_on_random_data(dtype: type) -> None:
    """Quantile bins, point masses beside quantiles, a few distinct values, huge and tiny scales."""
    rng = np.random.default_rng(7)
    n = 4000
    train = np.stack(
        [
            rng.normal(size=n),
            np.where(rng.random(n) < 0.6, 0.0, rng.exponential(3.0, n)),
            rng.integers(0, 4, n).astype(float),
            rng.normal(scale=1e30, size=n),
            rng.normal(loc=1e6, scale=1e-3, size=n),
            rng.lognormal(size=n) * 1e-20,
        ],
        axis=1,
    )
    profile = build_baseline(train, [f"c{i}" for i in range(train.shape[1])])
    check_profile(profile, probe_rows(profile, dtype, rng))
    fresh = train * rng.uniform(0.9, 1.1, size=train.shape) + rng.normal(scale=0.01, size=train.shape)
    check_profile(profile, fresh.astype(dtype))
    wild = rng.normal(scale=1e35, size=(500, train.shape[1]))
    check_profile(profile, wild.astype(dtype) if dtype == np.float64 else np.clip(wild, -3e38, 3e38).astype(dtype))


def test_unbounded_sketches_many_cuts_per_cell_and_per_row_columns() -> None:
    """Sketches without bounds, cuts crowded into one grid cell (the grid refines, or compares more),
    and a ``per_row`` sketch reading several columns, with NaN and infinities beside the values."""
    crowded = np.concatenate([[0.0], 1.0 + np.arange(12) * 1e-6, [1000.0]])
    sketches = [
        NumericSketch("open", np.asarray([-1.0, 0.0, 2.5]), None, None),
        NumericSketch("crowded", crowded, -5.0, 2000.0),
        NumericSketch("wide", np.asarray([0.5, 0.25, 0.75])[[1, 0, 2]], 0.0, 1.0, per_row=3),
        NumericSketch("empty", np.empty(0), None, None),
    ]
    profile = Profile(sketches, {}, NumericSketch("latency_ms", np.asarray([1.0]), 0.0, None))
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        rows = probe_rows(profile, dtype, rng)
        check_profile(profile, rows)
        check_profile(profile, rng.normal(scale=3, size=(3000, profile.width)).astype(dtype))
        dirty = rows.copy()
        dirty[::7, 0], dirty[::5, 2], dirty[::11, 3] = np.nan, np.inf, -np.inf
        window = profile.empty_like()
        window.update_inputs(dirty)
        finite = dirty[:, 0][np.isfinite(dirty[:, 0])]
        np.testing.assert_array_equal(window.features[0].counts, reference_counts(sketches[0], finite))
        assert window.features[0].nulls == int(np.isnan(dirty[:, 0]).sum())
        wide = dirty[:, 2:5].ravel()
        np.testing.assert_array_equal(window.features[2].counts, reference_counts(sketches[2], wide))
        assert window.features[2].infs == int(np.isinf(wide).sum())


def test_windows_share_one_table_and_counts_survive_a_replaced_array() -> None:
    """Windows of one baseline build the table once; a sketch whose counts were replaced (a compact
    window filled in) still adds up."""
    profile, X = digits_baseline()
    first, second = profile.empty_like(), profile.empty_like()
    first.update_inputs(X[:100].astype(np.float32))
    second.update_inputs(X[:100].astype(np.float32))
    assert first._numeric_block.lookup(np.dtype(np.float32)) is second._numeric_block.lookup(np.dtype(np.float32))
    refilled = profile.from_compact(first.to_compact())
    refilled.update_inputs(X[100:200].astype(np.float32))
    both = profile.empty_like()
    both.update_inputs(X[:200].astype(np.float32))
    for a, b in zip(refilled.features, both.features, strict=True):
        np.testing.assert_array_equal(a.counts, b.counts)


def test_a_plain_sketch_bins_like_one_comparison_per_cut_with_or_without_bounds() -> None:
    """``NumericSketch.update`` finds a slot with one ``searchsorted`` over low, the cuts and the float64 above
    high; unbounded sides, values on every edge and NaN/inf land where the per-cut formula puts them."""
    rng = np.random.default_rng(3)
    cuts = np.array([-1.0, 0.0, 0.5, 2.0])
    for low, high in ((-2.0, 3.0), (None, 3.0), (-2.0, None), (None, None)):
        sketch = NumericSketch("x", cuts, low, high)
        values = np.concatenate([probes(sketch, np.float64), rng.normal(scale=3, size=500), [np.nan, np.inf, -np.inf]])
        sketch.update(values)
        assert sketch.counts.tolist() == reference_counts(sketch, values).tolist()
        assert (sketch.nulls, sketch.infs, sketch.count) == (1, 2, len(values) - 3)


def test_a_sketch_counted_by_value_equals_one_fed_each_row() -> None:
    """The monitor sketches a request's latency once with its row count (``update_counted``)."""
    sketch = NumericSketch("latency_ms", np.array([0.1, 1.0, 10.0]), 0.0, None)
    values, counts = np.array([0.05, 1.0, 12.5, 0.05, np.nan, np.inf, 3.0]), np.array([3, 1, 2, 0, 2, 1, 4])
    by_value, by_row = sketch.empty_like(), sketch.empty_like()
    by_value.update_counted(values, counts)
    by_row.update(np.repeat(values, counts))
    assert by_value.counts.tolist() == by_row.counts.tolist()
    assert (by_value.count, by_value.nulls, by_value.infs) == (by_row.count, by_row.nulls, by_row.infs) == (10, 2, 1)
    assert (by_value.minimum, by_value.maximum) == (by_row.minimum, by_row.maximum) == (0.05, 12.5)
    assert by_value.total == pytest.approx(by_row.total) and by_value.total_sq == pytest.approx(by_row.total_sq)


def test_a_window_settled_once_equals_one_updated_batch_by_batch() -> None:
    """The monitor leaves a window's counts and moments pending (``settle=False``) and settles them when it
    closes; the result is the profile of the same rows sketched in one go, and ``to_compact`` settles."""
    rng = np.random.default_rng(4)
    train = rng.normal(size=(3000, 5))
    train[:, 2] = rng.integers(0, 3, 3000)
    labels = [0, 1, 2]
    base = build_baseline(
        train, [f"f{i}" for i in range(5)], labels=labels, predicted_labels=rng.integers(0, 3, 3000),
        probabilities=rng.dirichlet(np.ones(3), 3000),
    )  # fmt: skip
    rows = rng.normal(size=(2500, 5)).astype(np.float32)
    rows[7, 1], rows[8, 3] = np.nan, np.inf
    answers, probabilities = rng.integers(0, 3, 2500), rng.dirichlet(np.ones(3), 2500)
    pending, direct = base.empty_like(), base.empty_like()
    for start in range(0, 2500, 300):  # batches of 300 rows
        part = slice(start, start + 300)
        pending.update_inputs(rows[part], settle=False)
        pending.update_outputs(labels=answers[part], probabilities=probabilities[part], settle=False)
    direct.update_inputs(rows)
    direct.update_outputs(labels=answers, probabilities=probabilities)
    assert pending.features[1].count == 0  # nothing settled yet
    compact, expected = pending.to_compact(), direct.to_compact()
    assert compact["rows"] == expected["rows"] == 2500
    for mine, theirs in zip(compact["features"], expected["features"], strict=True):
        assert mine[:3] == theirs[:3] and mine[5:] == theirs[5:]  # counts, nulls, infs, min, max
        assert mine[3:5] == pytest.approx(theirs[3:5], rel=1e-5)  # sums: added in another order
    assert compact["outputs"] == expected["outputs"]
