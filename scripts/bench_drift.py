#!/usr/bin/env python3
"""Measure the drift verdict's false alarms and power; print a table and write JSON.

Two tables, each trial on a fresh random split: the baseline profile is built from a finite training
part, and windows are drawn without replacement from the held-out part.

- digits (scikit-learn's 8x8 digits, all 64 features valued 0..16): 1,200 baseline rows, 597
  held out, so windows of 100 and 500 rows (2,000 cannot be drawn from 1,797 rows)
- a synthetic mixed table made here, deterministically (20,000 rows: a normal float, a Poisson
  count, a zero-inflated sensor with 80 % zeros, a 0/1 flag and a 5-category string column):
  10,000 baseline rows, windows of 100, 500 and 2,000

For each: false alarms of the family-wise verdict on clean windows (with their 95 % interval: near
1 % a rate moves by a few tenths between seeds); detection of a one-feature +0.5σ shift at 500 rows
(each numeric feature in turn, σ of the whole column; min and median over features); for the
categorical column, detection when 10 % of the window's rows, drawn from the other categories, move
into one category (each category in turn). Beside each, the raw-value reference in the same run: a
two-sample KS test per numeric feature (a chi-square test of the raw counts for the categorical
one), Bonferroni over the features at the same alpha. On digits also a shift kept on the value grid
(+round(0.5σ), where that is at least 1), so the figure does not rest on values leaving the grid;
and the sketch update cost of a 64-feature float32 batch with these bins against plain quantile
bins, timed interleaved. About 90 s of CPU at 1,000 trials: under a minute on two idle cores.

    python scripts/bench_drift.py [--trials 1000] [--jobs 2] [--json PATH | --out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import write_json

from device_agent import drift
from device_agent.profile import LATENCY_CUTS_MS, CategoricalSketch, NumericSketch, Profile

TARGETS = {"false_alarm_max": 0.01, "detection_min": 0.95}
ALPHA = drift.DEFAULT_DRIFT_THRESHOLDS["alpha"]
MIN_PSI = drift.DEFAULT_DRIFT_THRESHOLDS["min_psi"]
DIGITS_BASELINE_ROWS = 1200
SYNTHETIC_ROWS, SYNTHETIC_BASELINE_ROWS = 20_000, 10_000
CATEGORIES = ["a", "b", "c", "d", "e"]
CATEGORY_SHARES = [0.4, 0.25, 0.15, 0.12, 0.08]
# the shift: 10 % of a window (50 of 500 rows) from one category to another (e holds ~40: it only receives)
CATEGORY_PAIRS = [("a", "b"), ("b", "c"), ("c", "d"), ("d", "e"), ("a", "e")]


def digits_table() -> tuple[list[str], np.ndarray]:
    from sklearn.datasets import load_digits

    return [f"pixel_{i // 8}_{i % 8}" for i in range(64)], load_digits().data.astype(np.float64)


def synthetic_table(seed: int = 20240614) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Numeric columns (normal, count, sensor, flag) and the categorical column apart."""
    rng = np.random.default_rng(seed)
    n = SYNTHETIC_ROWS
    sensor = np.where(rng.random(n) < 0.8, 0.0, rng.lognormal(1.0, 0.6, n))
    numeric = np.column_stack([rng.normal(20.0, 4.0, n), rng.poisson(3.0, n), sensor, rng.random(n) < 0.3])
    category = rng.choice(np.array(CATEGORIES, dtype=object), size=n, p=CATEGORY_SHARES)
    return ["normal", "count", "sensor", "flag"], numeric.astype(np.float64), category


def profile_of(names: list[str], numeric: np.ndarray, category: np.ndarray | None) -> Profile:
    features: list = [NumericSketch.from_values(name, numeric[:, j]) for j, name in enumerate(names)]
    if category is not None:
        features.append(CategoricalSketch.from_values("category", category))
    profile = Profile(features, {}, NumericSketch("latency_ms", np.asarray(LATENCY_CUTS_MS), 0.0, None))
    profile.rows = len(numeric)
    return profile


def window_of(base: Profile, numeric: np.ndarray, category: np.ndarray | None) -> Profile:
    window = base.empty_like()
    for j, sketch in enumerate(window.features):
        sketch.update(category if sketch.kind == "categorical" else numeric[:, j])
    window.rows = len(numeric)
    return window


def raw_ks_flags(ordered: np.ndarray, window: np.ndarray, level: float) -> np.ndarray:
    """Per column, whether scipy.stats.ks_2samp(method="asymp") rejects at ``level``: the same statistic
    against the same ``kstwo`` tail, read as a critical distance (``ordered``: the baseline columns sorted)."""
    distances = np.empty(ordered.shape[1])
    for j in range(ordered.shape[1]):
        x, y = ordered[:, j], np.sort(window[:, j])
        points = np.concatenate([x, y])
        cdf_x, cdf_y = (
            np.searchsorted(x, points, side="right") / len(x),
            np.searchsorted(y, points, side="right") / len(y),
        )
        distances[j] = np.max(np.abs(cdf_x - cdf_y))
    n, m = sorted([len(ordered), len(window)], reverse=True)
    return distances > _ks_critical(int(np.round(n * m / (n + m))), level)


@functools.cache
def _ks_critical(samples: int, level: float) -> float:
    from scipy.stats import kstwo

    return float(kstwo.isf(level, samples))


def chi2_flags(train: np.ndarray, window: np.ndarray, family: int) -> bool:
    """The raw-count reference for the categorical column: a chi-square test of the 2 x categories table."""
    from scipy.stats import chi2_contingency

    table = np.array([[np.sum(train == c) for c in CATEGORIES], [np.sum(window == c) for c in CATEGORIES]])
    table = table[:, table.sum(axis=0) > 0]
    return bool(chi2_contingency(table, correction=False).pvalue < ALPHA / family)


def clean_windows(base, ordered, held, cats, sizes, tally, rng) -> None:
    family = len(base.features)  # the reference's Bonferroni family: one test per feature
    for rows in sizes:
        pick = rng.choice(len(held), rows, replace=False)
        window = window_of(base, held[pick], None if cats is None else cats[1][pick])
        tally[f"alarm_{rows}"] += bool(drift.drift_report(base, window)["drifted"])
        raw = bool(np.any(raw_ks_flags(ordered, held[pick], ALPHA / family)))
        if cats is not None:
            raw = raw or chi2_flags(cats[0], cats[1][pick], family)
        tally[f"ks_alarm_{rows}"] += raw


def shifted_windows(base, ordered, held, cats, shifts, tally, rng, prefix: str = "") -> None:
    """A feature's verdict rests on its own sketches and the family's alpha only, so shifting every column
    of one window and reading each feature's verdict is the one-feature experiment for each feature."""
    pick = rng.choice(len(held), 500, replace=False)
    moved = held[pick] + shifts
    window = window_of(base, moved, None if cats is None else cats[1][pick])
    verdicts = drift.drift_report(base, window)["features"]
    for j, name in enumerate(tally["names"]):
        if shifts[j] != 0:
            tally[f"{prefix}detected"][j] += verdicts[name]["drifted"]
    tally[f"{prefix}ks_detected"] += raw_ks_flags(ordered, moved, ALPHA / len(base.features)) & (shifts != 0)


def category_windows(base, cats, tally, rng) -> None:
    """50 of a 500-row window's rows (10 %) moved into a category: drawn from all the others, into each
    category in turn (``cat_``), and from one category to another (``pair_``, the issue's case)."""
    pick = cats[1][rng.choice(len(cats[1]), 500, replace=False)]
    for k, target in enumerate(CATEGORIES):
        _moved_window(base, cats, tally, rng, pick, "cat_", k, pick != target, target)
    for k, (source, target) in enumerate(CATEGORY_PAIRS):
        _moved_window(base, cats, tally, rng, pick, "pair_", k, pick == source, target)


def _moved_window(base, cats, tally, rng, pick, prefix: str, k: int, movable: np.ndarray, target: str) -> None:
    moved = pick.copy()
    candidates = np.flatnonzero(movable)
    moved[rng.choice(candidates, min(50, len(candidates)), replace=False)] = target
    baseline = base.features[-1]
    window = baseline.empty_like()
    window.update(moved)
    comparison = drift.compare_sketches(baseline, window)
    tally[f"{prefix}detected"][k] += drift.is_drifted(comparison, drift.feature_alpha(base, ALPHA), MIN_PSI)
    tally[f"{prefix}ks_detected"][k] += chi2_flags(cats[0], moved, len(base.features))


def run_trials(dataset: str, trials: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    if dataset == "digits":
        names, numeric = digits_table()
        category, baseline_rows, sizes = None, DIGITS_BASELINE_ROWS, (100, 500)
    else:
        names, numeric, category = synthetic_table()
        baseline_rows, sizes = SYNTHETIC_BASELINE_ROWS, (100, 500, 2000)
    sigma = numeric.std(axis=0)
    width = len(names)
    tally: dict = {f"{kind}_{rows}": 0 for rows in sizes for kind in ("alarm", "ks_alarm")}
    tally["names"] = names
    for key in ("detected", "ks_detected", "grid_detected", "grid_ks_detected"):
        tally[key] = np.zeros(width)
    tally["cat_detected"], tally["cat_ks_detected"] = np.zeros(len(CATEGORIES)), np.zeros(len(CATEGORIES))
    tally["pair_detected"], tally["pair_ks_detected"] = np.zeros(len(CATEGORY_PAIRS)), np.zeros(len(CATEGORY_PAIRS))
    for _ in range(trials):
        order = rng.permutation(len(numeric))
        train, held = numeric[order[:baseline_rows]], numeric[order[baseline_rows:]]
        cats = None if category is None else (category[order[:baseline_rows]], category[order[baseline_rows:]])
        base = profile_of(names, train, None if cats is None else cats[0])
        ordered = np.sort(train, axis=0)
        clean_windows(base, ordered, held, cats, sizes, tally, rng)
        shifted_windows(base, ordered, held, cats, 0.5 * sigma, tally, rng)
        if cats is None:  # digits: the shift rounded to the value grid, where that is a shift
            shifted_windows(base, ordered, held, cats, np.round(0.5 * sigma), tally, rng, prefix="grid_")
        else:
            category_windows(base, cats, tally, rng)
    tally.update(trials=trials, sigma=sigma)
    return tally


def combine(parts: list[dict]) -> dict:
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if key not in ("names", "sigma"):
                total[key] = total[key] + value
    return total


def quantile_only(names: list[str], rows: np.ndarray) -> Profile:
    """The baseline as edgekit binned it before (10 quantile bins, nothing else): the cost reference."""
    features = []
    for j, name in enumerate(names):
        column = rows[:, j]
        cuts = np.unique(np.quantile(column, np.linspace(0.0, 1.0, 11)[1:-1]))
        low, high = float(column.min()), float(column.max())
        features.append(NumericSketch(name, cuts[(cuts > low) & (cuts <= high)], low, high))
    return Profile(features, {}, NumericSketch("latency_ms", np.asarray(LATENCY_CUTS_MS), 0.0, None))


def update_cost() -> dict:
    """Profile.update_inputs on 64-feature float32 batches of digits rows: these bins against quantile bins,
    timed interleaved (medians of repeats), and the compact window's bytes per feature."""
    names, rows = digits_table()
    profiles = {"value_bins": profile_of(names, rows, None), "quantile_bins": quantile_only(names, rows)}
    batches = {size: np.resize(rows, (size, 64)).astype(np.float32) for size in (1, 1000)}
    timings: dict = {(kind, size): [] for kind in profiles for size in batches}
    for _ in range(30):
        for size, batch in batches.items():
            for kind, base in profiles.items():
                window = base.empty_like()
                repeats = 200 if size == 1 else 5
                start = time.perf_counter()
                for _ in range(repeats):
                    window.update_inputs(batch)
                timings[kind, size].append((time.perf_counter() - start) / repeats)
    result = {}
    for (kind, size), samples in timings.items():
        result[f"{kind}_b{size}_us"] = float(np.median(samples) * 1e6)
    for size in batches:
        result[f"cost_ratio_b{size}"] = result[f"value_bins_b{size}_us"] / result[f"quantile_bins_b{size}_us"]
    for kind, base in profiles.items():
        window = base.empty_like()
        window.update_inputs(batches[1000])
        result[f"{kind}_compact_bytes_per_feature"] = (
            len(json.dumps(window.to_compact()["features"], separators=(",", ":"))) / 64
        )
        result[f"{kind}_slots_max"] = max(len(s.counts) for s in base.features)
    return result


Row = tuple[str, "float | None", "float | None", str, str]  # figure, edgekit, raw-value reference, target, note


def wilson(hits: float, trials: int) -> str:
    """The 95 % interval of a rate: a false-alarm rate near 1 % moves by a few tenths of a % between runs."""
    rate, z = hits / trials, 1.96
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return f"95% CI {max(0.0, centre - half):.3f}-{centre + half:.3f}"


def rows_for(dataset: str, tally: dict) -> list[Row]:
    trials, names, sigma = tally["trials"], tally["names"], tally["sigma"]
    rows: list[Row] = []
    for size in (100, 500, 2000):
        if f"alarm_{size}" in tally:
            rate = tally[f"alarm_{size}"] / trials, tally[f"ks_alarm_{size}"] / trials
            note = wilson(tally[f"alarm_{size}"], trials)
            rows.append((f"{dataset}: false alarms, clean {size}-row windows", *rate, "≤ 0.01", note))
        else:
            note = "not drawn: 1,797 rows in all"
            rows.append((f"{dataset}: false alarms, clean {size}-row windows", None, None, "≤ 0.01", note))
    shifted = np.flatnonzero(sigma > 0)
    rows += _spread(f"{dataset}: +0.5σ one feature, 500 rows", tally["detected"], tally["ks_detected"], shifted, trials)
    if dataset == "synthetic":
        for j in shifted:
            pair = tally["detected"][j] / trials, tally["ks_detected"][j] / trials
            rows.append((f"{dataset}: +0.5σ {names[j]}, 500 rows", *pair, "≥ 0.95", ""))
        pairs = np.arange(len(CATEGORY_PAIRS))
        rows += _spread(
            f"{dataset}: 10% of rows from one category to another",
            tally["pair_detected"],
            tally["pair_ks_detected"],
            pairs,
            trials,
        )
        every = np.arange(len(CATEGORIES))
        rows += [
            (a, b, c, "info", "")
            for a, b, c, _, _ in _spread(
                f"{dataset}: 10% drawn from all others into one category",
                tally["cat_detected"],
                tally["cat_ks_detected"],
                every,
                trials,
            )
        ]
        for k, target in enumerate(CATEGORIES):
            pair = tally["cat_detected"][k] / trials, tally["cat_ks_detected"][k] / trials
            rows.append((f"{dataset}: 10% into {target!r} ({CATEGORY_SHARES[k]:.0%})", *pair, "info", ""))
    else:
        grid = np.flatnonzero(np.round(0.5 * sigma) >= 1)
        label = f"{dataset}: on-grid +round(0.5σ), 500 rows"
        rows += [
            (a, b, c, "info", "")
            for a, b, c, _, _ in _spread(label, tally["grid_detected"], tally["grid_ks_detected"], grid, trials)
        ]
    return rows


def _spread(label: str, ours: np.ndarray, raw: np.ndarray, which: np.ndarray, trials: int) -> list[Row]:
    ours, raw = ours[which] / trials, raw[which] / trials
    return [
        (f"{label}, min of {len(which)}", float(ours.min()), float(raw.min()), "≥ 0.95", ""),
        (f"{label}, median of {len(which)}", float(np.median(ours)), float(np.median(raw)), "≥ 0.95", ""),
    ]


def verdict(value: float | None, target: str) -> str:
    if value is None or not target.startswith(("≤", "≥")):
        return ""
    limit = float(target[2:])
    return "ok" if (value <= limit if target.startswith("≤") else value >= limit) else "MISS"


def print_rows(rows: list[Row]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'figure'.ljust(width)}  {'edgekit':>8}  {'raw test':>8}  target")
    for figure, ours, raw, target, note in rows:
        shown = [("n/a" if v is None else f"{v:.3f}").rjust(8) for v in (ours, raw)]
        print(f"{figure.ljust(width)}  {shown[0]}  {shown[1]}  {target:<8} {verdict(ours, target):<4}  {note}".rstrip())


def run(dataset: str, trials: int, jobs: int, seed: int) -> dict:
    shares = [trials // jobs + (i < trials % jobs) for i in range(jobs)]
    seeds = [s.generate_state(1)[0] for s in np.random.SeedSequence([seed, len(dataset)]).spawn(jobs)]
    if jobs == 1:
        return run_trials(dataset, trials, int(seeds[0]))
    with ProcessPoolExecutor(jobs) as pool:
        return combine(list(pool.map(run_trials, [dataset] * jobs, shares, [int(s) for s in seeds])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000, help="random splits per table (default 1000)")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--json", default=None, help="where to write JSON (default /tmp/edgekit-bench/bench_drift.json)"
    )
    parser.add_argument("--out", default=None, help="a directory to write bench_drift.json in, instead of --json")
    args = parser.parse_args()
    out = Path(args.out) / "bench_drift.json" if args.out else Path(args.json or "/tmp/edgekit-bench/bench_drift.json")
    started = time.perf_counter()
    tallies = {name: run(name, args.trials, args.jobs, args.seed) for name in ("digits", "synthetic")}
    cost = update_cost()
    rows = rows_for("digits", tallies["digits"]) + rows_for("synthetic", tallies["synthetic"])
    print_rows(rows)
    print(
        f"\nsketch update, 64 float32 features: batch 1 {cost['value_bins_b1_us']:.1f} µs "
        f"({cost['cost_ratio_b1']:.2f}x quantile bins), batch 1000 {cost['value_bins_b1000_us']:.0f} µs "
        f"({cost['cost_ratio_b1000']:.2f}x); compact window {cost['value_bins_compact_bytes_per_feature']:.0f} "
        f"bytes/feature (quantile bins {cost['quantile_bins_compact_bytes_per_feature']:.0f}); "
        f"{args.trials} trials per table in {time.perf_counter() - started:.0f} s"
    )
    checks = [(r[0], r[1], r[3] if verdict(r[1], r[3]) else "info", verdict(r[1], r[3]) == "ok") for r in rows]
    results = {
        name: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in tally.items()}
        for name, tally in tallies.items()
    }
    write_json(
        out,
        checks,
        targets=TARGETS,
        trials=args.trials,
        update_cost=cost,
        results=results,
        table=[{"figure": r[0], "edgekit": r[1], "raw_test": r[2], "target": r[3], "note": r[4]} for r in rows],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
