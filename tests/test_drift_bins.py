"""Bins for discrete and zero-inflated columns (issue 14), and the drift verdict on them."""

import json

import numpy as np
import pytest

from device_agent.drift import Comparison, drift_report, feature_alpha, is_drifted
from device_agent.profile import CategoricalSketch, NumericSketch, Profile, build_baseline
from device_agent.stats import ks_sf


def slot_of(sketch: NumericSketch, value: float) -> int:
    """Where NumericSketch.update counts ``value``."""
    probe = sketch.empty_like()
    probe.update(np.array([value]))
    return int(np.argmax(probe.counts))


def zero_inflated(rng, rows, zeros=0.8):
    return np.where(rng.random(rows) < zeros, 0.0, rng.lognormal(1.0, 0.6, rows))


def test_a_zero_inflated_column_gets_interior_bins_and_its_mass_a_bin_of_its_own():
    values = zero_inflated(np.random.default_rng(0), 10_000, zeros=0.6)
    sketch = NumericSketch.from_values("sensor", values)
    zero = slot_of(sketch, 0.0)
    assert sketch.counts[zero] == np.sum(values == 0)  # the mass alone: nothing else shares its bin
    assert slot_of(sketch, values[values > 0].min()) == zero + 1 and sketch.cuts[0] < values[values > 0].min()
    rest = sketch.counts[zero + 1 : -1]  # quantile bins over the other 40 %: about 1 / 10 of the rows each
    assert len(rest) == 4 and np.all(np.abs(rest - np.sum(values > 0) / 4) <= 2)


def test_an_integer_column_with_few_values_gets_a_bin_per_value():
    values = np.random.default_rng(1).binomial(9, 0.3, 5000).astype(float)  # 0..9: ten values at most
    sketch = NumericSketch.from_values("count", values)
    distinct, counts = np.unique(values, return_counts=True)
    slots = [slot_of(sketch, v) for v in distinct]
    assert len(set(slots)) == len(distinct) and [sketch.counts[s] for s in slots] == counts.tolist()
    assert len(sketch.counts) == 2 * len(distinct) + 1  # between two values, a gap bin the baseline leaves empty
    assert slot_of(sketch, 2.5) not in slots and sketch.counts[slot_of(sketch, 2.5)] == 0


def test_continuous_columns_keep_their_quantile_bins():
    values = np.random.default_rng(2).normal(size=3000)
    sketch = NumericSketch.from_values("x", values)
    quantiles = np.quantile(values, np.linspace(0, 1, 11)[1:-1])
    assert sketch.cuts.tolist() == quantiles.tolist() and (sketch.low, sketch.high) == (values.min(), values.max())


def test_values_that_went_through_float32_land_in_their_own_bins():
    values = np.tile([0.1, 0.7, 1.3, 2.9], 50)
    base = build_baseline(values[:, None], ["x"])
    for rows in (values.astype(np.float32), values.astype(np.float32).astype(np.float64), np.round(values, 6)):
        window = base.empty_like()
        window.update_inputs(rows[:, None])  # the agent's vectorised path, float32 compared in float32
        single = base.features[0].empty_like()
        single.update(rows)
        assert window.features[0].counts.tolist() == base.features[0].counts.tolist() == single.counts.tolist()


@pytest.fixture(scope="module")
def digits_rows(digits):
    return np.load(digits.train)["X"].astype(float), np.load(digits.test)["X"].astype(float)


@pytest.mark.parametrize("on_grid", [False, True])
def test_a_one_sigma_shift_of_pixel_7_7_inside_its_range_is_found_in_500_rows(digits_rows, on_grid):
    """pixel_7_7 is 0 in 94 % of the rows; quantile bins were < 0 | [0, 16] | > 16 and saw nothing."""
    train, test = digits_rows
    names = [f"pixel_{i // 8}_{i % 8}" for i in range(64)]
    base = build_baseline(train, names)
    cuts = base.feature("pixel_7_7").cuts
    assert len(cuts) >= 2 and 0 < cuts[0] < 1e-3  # the zeros' bin, then quantile bins over the other 6 %
    sigma = train[:, 63].std()
    window_rows = test[:500].copy()
    shift = round(sigma) if on_grid else sigma
    window_rows[:, 63] = np.minimum(window_rows[:, 63] + shift, train[:, 63].max())  # inside the baseline's range
    window = base.empty_like()
    window.update_inputs(window_rows)
    report = drift_report(base, window)
    assert report["features"]["pixel_7_7"]["drifted"] is True and report["worst_feature"] == "pixel_7_7"
    assert [n for n, f in report["features"].items() if f["drifted"]] == ["pixel_7_7"]


def test_a_clean_window_of_the_digits_is_not_flagged(digits_rows):
    train, test = digits_rows
    base = build_baseline(train, [f"f{i}" for i in range(64)])
    for rows in (test[:100], test[100:600]):
        window = base.empty_like()
        window.update_inputs(rows)
        assert drift_report(base, window)["drifted"] is False


def mixed_profile(rng, rows=4000):
    numeric = np.column_stack([zero_inflated(rng, rows), rng.poisson(3.0, rows), rng.random(rows) < 0.3])
    features = [NumericSketch.from_values(n, numeric[:, j]) for j, n in enumerate(["sensor", "count", "flag"])]
    features.append(CategoricalSketch.from_values("kind", rng.choice(["a", "b", "c"], rows)))
    latency = NumericSketch("latency_ms", np.array([1.0, 10.0]), 0.0, None)
    return Profile(features, {}, latency), numeric


def test_sketches_with_value_bins_round_trip_through_dict_and_compact_forms():
    rng = np.random.default_rng(3)
    base, numeric = mixed_profile(rng)
    doc = json.loads(json.dumps(base.to_dict()))
    again = Profile.from_dict(doc)
    assert again.to_dict() == base.to_dict() and again.baseline_id == base.baseline_id
    assert [s.cuts.tolist() for s in again.features[:3]] == [s.cuts.tolist() for s in base.features[:3]]
    window = base.empty_like()
    for j, sketch in enumerate(window.features[:3]):
        sketch.update(numeric[:300, j].astype(np.float32) + (j == 0) * 0.01)
    window.features[3].update(rng.choice(["a", "b", "z"], 300))
    window.rows = 300
    rebuilt = base.from_compact(json.loads(json.dumps(window.to_compact())))
    for a, b in zip(rebuilt.features, window.features, strict=True):
        assert a.counts.tolist() == b.counts.tolist()
    assert drift_report(base, rebuilt) == drift_report(base, window)
    assert drift_report(base, rebuilt)["features"]["sensor"]["drifted"] is True  # zeros moved to 0.01


def test_every_sketch_gets_an_equal_share_of_alpha_and_a_numeric_one_splits_it_between_its_two_tests():
    base, _ = mixed_profile(np.random.default_rng(4), rows=500)
    share = feature_alpha(base, 0.01)
    assert share == pytest.approx(0.01 / 4)
    between = 0.75 * share  # significant for a single test, not for one of two
    assert is_drifted(Comparison(0.5, 0.1, 0.1, 30.0, 3, between), share, 0.02) is True  # categorical: chi-square only
    assert is_drifted(Comparison(0.5, 0.1, 0.1, 30.0, 3, between, 0.5), share, 0.02) is False
    assert is_drifted(Comparison(0.5, 0.1, 0.1, 30.0, 3, 0.5, share / 3), share, 0.02) is True
    assert is_drifted(Comparison(0.01, 0.1, 0.1, 30.0, 3, 0.5, share / 3), share, 0.02) is False  # below min_psi


@pytest.mark.parametrize("lam, expected", [(0.5, 0.96395), (1.0, 0.27000), (1.36, 0.049486), (2.0, 6.7093e-4)])
def test_ks_tail_is_the_kolmogorov_distribution_for_large_samples(lam, expected):
    """Reference values: scipy.stats.kstwobign.sf."""
    n = 1e12
    root = np.sqrt(n / 2)
    assert ks_sf(lam / (root + 0.12 + 0.11 / root), n, n) == pytest.approx(expected, rel=1e-3)
    assert ks_sf(0.0, 100, 100) == 1.0 and ks_sf(0.5, 0, 100) == 1.0
