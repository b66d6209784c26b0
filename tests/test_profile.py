import json

import numpy as np
import pytest

from device_agent.errors import ProfileError
from device_agent.profile import CategoricalSketch, NumericSketch, Profile, build_baseline

rng = np.random.default_rng(0)


def baseline(rows=2000):
    X = rng.normal(size=(rows, 3))
    return build_baseline(
        X,
        ["a", "b", "c"],
        labels=[0, 1, 2],
        predicted_labels=rng.integers(0, 3, rows),
        probabilities=rng.dirichlet([1, 1, 1], rows),
    )


def test_quantile_bins_hold_equal_shares_of_the_baseline():
    profile = baseline()
    counts = np.asarray(profile.features[0].counts)
    assert counts[0] == 0 and counts[-1] == 0  # nothing below the baseline's min or above its max
    assert len(counts) == 12 and np.all(np.abs(counts[1:-1] - 200) <= 1)


def test_window_profiles_merge_exactly_into_the_whole():
    base = baseline()
    X = rng.normal(loc=0.3, size=(1000, 3))
    whole, first, second = base.empty_like(), base.empty_like(), base.empty_like()
    whole.update_inputs(X)
    first.update_inputs(X[:400])
    second.update_inputs(X[400:])
    merged = first.merge(second).to_dict()
    for m, w in zip(merged["features"], whole.to_dict()["features"], strict=True):
        assert m["counts"] == w["counts"] and m["count"] == w["count"] and (m["min"], m["max"]) == (w["min"], w["max"])
        assert m["sum"] == pytest.approx(w["sum"]) and m["sum_sq"] == pytest.approx(w["sum_sq"])
    assert merged["rows"] == 1000


def test_nan_inf_and_out_of_range_values_are_counted_apart():
    sketch = NumericSketch.from_values("x", np.arange(100.0))
    window = sketch.empty_like()
    window.update(np.array([np.nan, np.inf, -5.0, 500.0, 50.0]))
    assert (window.nulls, window.infs, window.count) == (1, 1, 3)
    assert window.counts[0] == 1 and window.counts[-1] == 1
    assert window.minimum == -5.0 and window.maximum == 500.0


def test_categories_outside_the_baseline_count_as_other():
    sketch = CategoricalSketch.from_values("c", ["a", "a", "b", None])
    assert sketch.categories == ["a", "b"] and sketch.nulls == 1
    sketch.update(["z", "a"])
    assert sketch.counts.tolist() == [3, 1, 1]
    classes = CategoricalSketch("p", [0, 1, 2])
    classes.update(np.array([0, 2, 2, 7]))
    assert classes.counts.tolist() == [1, 0, 2, 1]


def test_json_round_trip_and_tamper_detection():
    profile = baseline()
    doc = json.loads(json.dumps(profile.to_dict()))
    assert Profile.from_dict(doc).to_dict() == profile.to_dict()
    doc["features"][0]["cuts"][0] += 1.0
    with pytest.raises(ProfileError, match="baseline_id does not match"):
        Profile.from_dict(doc)


def test_profiles_of_different_baselines_do_not_merge():
    with pytest.raises(ProfileError, match="cannot merge a profile of baseline"):
        baseline().merge(baseline())


def test_moments_and_quantiles():
    sketch = NumericSketch.from_values("x", np.arange(1000.0))
    assert sketch.mean == pytest.approx(499.5)
    assert sketch.std == pytest.approx(np.arange(1000.0).std())
    assert 400 <= sketch.quantile(0.5) <= 600


def test_compact_form_round_trips_on_the_baseline_bins():
    base = baseline()
    window = base.empty_like()
    window.update_inputs(rng.normal(size=(300, 3)))
    window.update_outputs(labels=rng.integers(0, 3, 300), probabilities=rng.dirichlet([1, 1, 1], 300))
    rebuilt = base.from_compact(json.loads(json.dumps(window.to_compact())))
    for a, b in zip(rebuilt.to_dict()["features"], window.to_dict()["features"], strict=True):
        assert a["counts"] == b["counts"] and a["count"] == b["count"] and a["sum"] == pytest.approx(b["sum"], rel=1e-5)
    assert rebuilt.outputs["prediction"].counts.tolist() == window.outputs["prediction"].counts.tolist()
    with pytest.raises(ProfileError, match="does not match baseline"):
        baseline().from_compact(window.to_compact())
    broken = window.to_compact()
    broken["features"][0][0] = [1, 2]
    with pytest.raises(ProfileError, match="counts where the baseline has"):
        base.from_compact(broken)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dirty", [False, True])
def test_vectorized_update_equals_the_per_feature_definition(digits, dirty, dtype):
    """The agent's fast block update must count exactly what NumericSketch.update counts, also for
    float32 rows (compared in float32) sitting on, just below and just above every cut."""
    train = np.load(digits.train)["X"].astype(float)
    base = build_baseline(
        train + np.random.default_rng(1).normal(0, 0.1, train.shape) / 3, [f"f{i}" for i in range(64)]
    )  # cuts off float32's grid
    local = np.random.default_rng(5)
    data = np.resize(train, (700, 64)) + local.normal(0, 4, (700, 64))
    if dtype is np.float32:
        edges = []
        for column, sketch in enumerate(base.features):
            for cut in list(sketch.cuts) + [sketch.low, sketch.high]:
                near = np.float32(cut)
                edges += [
                    (column, near),
                    (column, np.nextafter(near, np.float32(np.inf))),
                    (column, np.nextafter(near, np.float32(-np.inf))),
                ]
        for row, (column, value) in enumerate(edges[: len(data) * 64]):
            data[row % len(data), column] = value
        data = data.astype(np.float32)
    if dirty:
        data[local.random(data.shape) < 0.02] = np.nan
        data[local.random(data.shape) < 0.01] = np.inf
        data[local.random(data.shape) < 0.01] = -np.inf
    block, reference = base.empty_like(), base.empty_like()
    block.update_inputs(data)
    for column, sketch in enumerate(reference.features):
        sketch.update(data[:, column])
    for a, b in zip(block.features, reference.features, strict=True):
        assert a.counts.tolist() == b.counts.tolist() and (a.count, a.nulls, a.infs) == (b.count, b.nulls, b.infs)
        assert (
            (a.minimum, a.maximum) == (b.minimum, b.maximum)
            and a.total == pytest.approx(b.total)
            and a.total_sq == pytest.approx(b.total_sq)
        )
