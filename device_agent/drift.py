"""Drift between a baseline profile and a window profile, with a verdict that knows its sample size.

Per feature (and for the model's predictions) we report effect sizes on the shared bins: PSI
(population stability index), KS distance on the binned CDF, and Jensen-Shannon divergence
(base 2, in [0, 1]). The verdict does not threshold those directly: a fixed PSI cut-off raises false
alarms on small windows and misses real shifts on large ones. Instead each sketch gets two-sample
tests that account for both sample sizes (the baseline is a finite training sample too):

- a chi-square test of homogeneity between the baseline's counts and the window's, bins merged
  until every expected count is at least ``MIN_EXPECTED``: it sees any change of shape, and it is
  the only test of a categorical sketch, whose order means nothing;
- for a numeric sketch, also a Kolmogorov-Smirnov test on the binned CDF (``ks_sf``). A location
  shift moves the whole CDF one way: one maximal distance sees it at full strength, where the
  chi-square spreads it over many degrees of freedom, and merging bins to reach its expected counts
  blurs a shift to a neighbouring value of a discrete column. The binned distance is never more than
  the raw one and ties only shrink it, so the asymptotic p-value stays valid (conservative) on any
  bins; on a column with a bin per value (``binning``) it is the raw-value KS test for every window
  whose values are on the baseline's grid.

The window's family is Bonferroni-corrected: with ``m`` tested sketches each gets ``alpha / m``, and
a numeric sketch splits its share between its two tests, so a clean window is flagged with
probability at most ``alpha`` however many features the model has, and categorical sketches lose
nothing to the numeric ones' second test. ``MIN_EXPECTED`` is 10, not the textbook 5: at the
per-test alphas of a 64-feature family (below 1e-4) a sparse table's chi-square tail is too light.
With 5, clean 100-row windows of the digits alarmed 0.9 % of the time over 3,000 random splits
(1.4 % with a bin per value on every pixel); with 10, 0.5 % (4,000 splits), and 0.7-0.8 % on the
five independent columns of the bench's synthetic table (5,000). A feature is drifted when one of
its tests rejects *and* its PSI is at least ``min_psi``, so huge windows do not flag shifts too
small to matter. Figures: ``scripts/bench_drift.py``.

A sketch that takes ``per_row`` K values from each example (a tensor's per-channel element histogram,
``tensor_signals``) holds K values per example, but they are not K independent draws: the pixels of one
image share its lighting, its subject and its camera. Counting them as independent would shrink the
tests' variance K-fold and flag every clean window. So both count vectors are divided by K before the
tests, which then see one observation per example. That is the conservative end and still valid: with
``f`` an example's vector of bin fractions (its K values' histogram, mean ``p``), the window's bin
shares are a mean of ``N`` independent ``f``, and ``Cov(f) = E[f f^T] - p p^T`` is at most
``diag(p) - p p^T`` (``diag(f) - f f^T`` is positive semi-definite for any fraction vector), the
multinomial covariance of ``N`` single draws: no more variance than ``N`` examples of one value each,
and less when elements vary within an example, which only makes the tests stricter than their
nominal alpha. PSI, KS distance and Jensen-Shannon divergence are ratios of shares and do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .profile import Profile, Sketch
from .stats import chi2_sf, ks_sf

DEFAULT_DRIFT_THRESHOLDS: dict[str, float] = {
    "alpha": 0.01,  # family-wise false-alarm rate of one window's verdict
    "min_psi": 0.02,  # effect-size floor: below this a "significant" shift is too small to act on
    "min_rows": 100,  # windows with fewer rows get no verdict
    "consecutive_windows": 3,  # for alerts (collector side): drifted this many windows in a row
}
PSI_EPSILON = 1e-4
MIN_EXPECTED = 10.0


@dataclass(frozen=True)
class Comparison:
    psi: float
    ks: float
    js: float
    chi2: float
    dof: int
    p_value: float  # the chi-square test's
    ks_p_value: float | None = None  # the KS test's on the binned CDF; None for categorical sketches

    def to_dict(self, drifted: bool) -> dict[str, Any]:
        # Four decimals: enough for every threshold in use, and it keeps a 64-feature summary small.
        return {"psi": round(self.psi, 4), "ks": round(self.ks, 4), "js": round(self.js, 4), "drifted": drifted}


def proportions(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts))


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    p, q = (
        np.maximum(proportions(np.asarray(expected, float)), PSI_EPSILON),
        np.maximum(proportions(np.asarray(actual, float)), PSI_EPSILON),
    )
    return float(np.sum((q - p) * np.log(q / p)))


def ks_distance(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(
        np.max(
            np.abs(
                np.cumsum(proportions(np.asarray(expected, float))) - np.cumsum(proportions(np.asarray(actual, float)))
            )
        )
    )


def js_divergence(expected: np.ndarray, actual: np.ndarray) -> float:
    p, q = proportions(np.asarray(expected, float)), proportions(np.asarray(actual, float))
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def chi2_homogeneity(expected: np.ndarray, actual: np.ndarray) -> tuple[float, int, float]:
    """Chi-square statistic, degrees of freedom and p-value for "same distribution" over shared bins."""
    a, b = _merge_small_bins(np.asarray(expected, float), np.asarray(actual, float))
    if len(a) < 2:
        return 0.0, 0, 1.0
    table = np.vstack([a, b])
    expected_counts = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(np.sum((table - expected_counts) ** 2 / expected_counts))
    dof = len(a) - 1
    return statistic, dof, chi2_sf(statistic, dof)


def _merge_small_bins(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent bins until each merged bin's smaller expected count reaches MIN_EXPECTED."""
    n_a, n_b = a.sum(), b.sum()
    if n_a == 0 or n_b == 0:
        return a[:0], b[:0]
    smaller = min(n_a, n_b) / (n_a + n_b)
    merged_a, merged_b = [], []
    acc_a = acc_b = 0.0
    for x, y in zip(a, b, strict=True):
        acc_a, acc_b = acc_a + x, acc_b + y
        if (acc_a + acc_b) * smaller >= MIN_EXPECTED:
            merged_a.append(acc_a)
            merged_b.append(acc_b)
            acc_a = acc_b = 0.0
    if acc_a + acc_b > 0:
        if merged_a:
            merged_a[-1] += acc_a
            merged_b[-1] += acc_b
        else:
            merged_a.append(acc_a)
            merged_b.append(acc_b)
    return np.asarray(merged_a), np.asarray(merged_b)


def compare(expected: np.ndarray, actual: np.ndarray, *, ordered: bool = False) -> Comparison:
    """Effect sizes and tests of ``actual`` counts against ``expected`` ones; ``ordered`` bins (numeric
    sketches) also get the KS test on their CDF."""
    statistic, dof, p_value = chi2_homogeneity(expected, actual)
    distance = ks_distance(expected, actual)
    ks_p = ks_sf(distance, float(np.sum(expected)), float(np.sum(actual))) if ordered else None
    return Comparison(psi(expected, actual), distance, js_divergence(expected, actual), statistic, dof, p_value, ks_p)


def compare_sketches(baseline: Sketch, window: Sketch) -> Comparison:
    """The tests of ``compare`` on one sketch, counting examples (``per_row`` values each: module docstring)."""
    per_row = getattr(baseline, "per_row", 1)
    expected, actual = baseline.counts, window.counts
    if per_row != 1:
        expected, actual = expected / per_row, actual / per_row
    return compare(expected, actual, ordered=baseline.kind == "numeric")


def feature_alpha(baseline: Profile, alpha: float) -> float:
    """Each tested sketch's share of the window's family-wise ``alpha`` (Bonferroni over the sketches)."""
    return alpha / max(1, len(_tested(baseline)))


def is_drifted(comparison: Comparison, sketch_alpha: float, min_psi: float) -> bool:
    """One of the sketch's tests rejects within its ``sketch_alpha`` (split in two when it has two), and
    the shift is large enough to act on."""
    if comparison.ks_p_value is None:
        significant = comparison.p_value < sketch_alpha
    else:
        significant = min(comparison.p_value, comparison.ks_p_value) < sketch_alpha / 2
    return significant and comparison.psi >= min_psi


def _tested(profile: Profile) -> list[tuple[str, Sketch]]:
    sketches: list[tuple[str, Sketch]] = [(s.name, s) for s in profile.features]
    if "prediction" in profile.outputs:
        sketches.append(("prediction", profile.outputs["prediction"]))
    return sketches


def drift_report(baseline: Profile, window: Profile, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-feature and prediction drift of ``window`` against ``baseline``, and the window's verdict."""
    limits = {**DEFAULT_DRIFT_THRESHOLDS, **(thresholds or {})}
    sketches = [(name, b, w) for (name, b), (_, w) in zip(_tested(baseline), _tested(window), strict=True)]
    comparisons = {name: compare_sketches(b, w) for name, b, w in sketches}
    tested = window.rows >= limits["min_rows"]
    sketch_alpha = feature_alpha(baseline, limits["alpha"])
    verdicts = {name: tested and is_drifted(c, sketch_alpha, limits["min_psi"]) for name, c in comparisons.items()}
    features = {name: comparisons[name].to_dict(verdicts[name]) for name, _, _ in sketches if name != "prediction"}
    worst = max(features, key=lambda n: comparisons[n].psi) if features else None
    report: dict[str, Any] = {
        "drifted": any(verdicts.values()) if tested else None,
        "tested": tested,
        "alpha": limits["alpha"],
        "worst_feature": worst,
        "features": features,
    }
    if "prediction" in comparisons:
        report["prediction"] = comparisons["prediction"].to_dict(verdicts["prediction"])
    return report


def exact_psi(
    baseline_values: np.ndarray, window_values: np.ndarray, cuts: np.ndarray, low: float, high: float
) -> float:
    """PSI computed from raw values on the given bins: the reference the sketch's PSI is checked against."""

    def counts(values: np.ndarray) -> np.ndarray:
        values = values[np.isfinite(values)]
        index = np.searchsorted(cuts, values, side="right") + 1
        index[values < low] = 0
        index[values > high] = len(cuts) + 2
        return np.bincount(index, minlength=len(cuts) + 3).astype(float)

    return psi(counts(baseline_values), counts(window_values))
