#!/usr/bin/env python3
"""Measure the label-free accuracy estimate (CBPE) against realized accuracy on shifted windows.

The fixtures' models (digits: StandardScaler + MLP, 10 classes; cancer: logistic regression, 2
classes) are converted to ONNX with ``convert_model`` and run in onnxruntime, as a device runs them.
Their held-out test split (594 and 188 rows) is cut into two halves: the calibration is made on one
(``edgekit.bundle.calibration``, what ``edgekit package --eval`` stores) and windows are drawn from the
other, then the halves swap (two folds, every seed). A window is ``--rows`` rows drawn with
replacement and shifted; the device's own code sketches it (``Profile.update_outputs``, the compact
profile it sends), and the collector's own code estimates it (``edgekit.fleet.estimate``). Realized
accuracy is the window's share of correct answers.

Shifts (the families; every level has ``--windows`` windows per fold):

- resampled: the inputs stay in the training support, their mix changes: rows drawn with weight
  ``exp(beta * z)`` on one of the first three principal components (z standardized), beta ±1, ±2;
  and windows of three classes only (digits)
- brightness: every input times 0.7 … 1.3 (digits pixels clipped to 0..16)
- occlusion (digits): a random k×k block of the 8×8 image set to 0, k = 1, 2, 3
- noise: Gaussian noise of σ (digits: pixels, clipped to 0..16; cancer: σ times each feature's std)

Beside the default map (the isotonic fit's mean over each bin's eval rows, prior 5 rows), the same
windows through: the fit read at each bin's mean eval confidence (the map before), each bin's raw eval
accuracy (binned), isotonic without the prior, the model's own confidence (no calibration), isotonic
applied to each row's exact confidence (what a device cannot send: the cost of the coarse bins), the
default map on 20 bins cut at the eval confidence's quantiles (what adaptive bins stored in the bundle
would give), isotonic per predicted class on each row (what a joint class-by-confidence histogram would
give at best; shrunk to the pooled fit by 10 pseudo-rows), ATC (Garg et al. 2022: the window's share of
rows above the eval threshold whose share equals the eval accuracy; one cut at that threshold would send
it exactly), and Platt scaling of the confidence's logit on each row (a smooth, two-parameter map;
temperature scaling before isotonic changes nothing, as isotonic is blind to a monotone transform of its
input).

Where the error comes from: per window, ``bias`` (estimate minus realized, signed) and ``floor``, the
mean absolute error a perfect estimate (each row's true chance of being right, taken as its slot's value
in the default map: approximate, and high for the surest rows of a slot) would still show, because
realized accuracy counts a finite number of distinct rows (a window resampled with beta ±2 repeats a few
dozen rows of the 297-row digits half). In-support error near the floor is the data's, not the estimator's;
error far above it, with a positive bias, is a model confidently wrong out of its support (no
confidence-based estimate sees that). A few seconds on two cores.

    python scripts/bench_cbpe.py [--rows 1000] [--windows 4] [--seeds 2] [--json PATH | --out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import print_checks, print_run, write_json

from device_agent.profile import NumericSketch, build_baseline
from edgekit.build.convert import convert_model
from edgekit.bundle.calibration import classifier_map, isotonic, slot_of
from edgekit.fleet.estimate import Calibration
from edgekit.local.fixtures import fixtures_usable, make_fixtures
from edgekit.models.loading import load_model

TARGET_MAE_POINTS = 2.0
ALERT_POINTS = 5.0
METHODS = (
    "isotonic+prior (default)",
    "isotonic at mean+prior (before)",
    "binned+prior",
    "isotonic",
    "confidence as is",
    "isotonic per row",
    "20 quantile bins",
    "class-wise per row",
    "ATC per row",
    "Platt per row",
)
QUANTILE_BINS = 20
CLASS_PRIOR_ROWS = 10.0
DIGIT_SHIFTS = [
    *[("resampled", f"pc{k} beta {b:+d}", ("pca", k, b)) for k in range(3) for b in (-2, -1, 1, 2)],
    ("resampled", "three classes", ("classes", 3, 0)),
    *[("brightness", f"x{s}", ("scale", s, 0)) for s in (0.7, 0.8, 0.9, 1.1, 1.2, 1.3)],
    *[("occlusion", f"{k}x{k} block", ("occlude", k, 0)) for k in (1, 2, 3)],
    *[("noise", f"sigma {s}", ("noise", s, 0)) for s in (0.1, 0.25, 0.5, 1.0)],
]
CANCER_SHIFTS = [
    *[("resampled", f"pc{k} beta {b:+d}", ("pca", k, b)) for k in range(3) for b in (-2, -1, 1, 2)],
    *[("brightness", f"x{s}", ("scale", s, 0)) for s in (0.8, 0.9, 1.1, 1.2)],
    *[("noise", f"sigma {s} std", ("noise", s, 0)) for s in (0.1, 0.25, 0.5)],
]


def shifted(
    X: np.ndarray, pool: np.ndarray, spec: tuple, rows: int, rng, context: dict
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` indices into X drawn from ``pool`` and their (shifted) inputs."""
    kind, level, beta = spec
    if kind == "pca":
        z = context["components"][pool, level]
        weights = np.exp(beta * (z - z.mean()) / z.std())
        index = rng.choice(pool, rows, p=weights / weights.sum())
    elif kind == "classes":
        chosen = rng.choice(context["classes"], level, replace=False)
        index = rng.choice(pool[np.isin(context["y"][pool], chosen)], rows)
    else:
        index = rng.choice(pool, rows)
    values = X[index].astype(np.float64)
    if kind == "scale":
        values = values * level
    elif kind == "noise":
        values = values + rng.normal(0.0, level, values.shape) * context["noise_scale"]
    elif kind == "occlude":
        images = values.reshape(-1, 8, 8)
        corners = rng.integers(0, 9 - level, (len(images), 2))
        for image, (a, b) in zip(images, corners, strict=True):
            image[a : a + level, b : b + level] = 0.0
    if context["clip"] is not None:
        values = np.clip(values, *context["clip"])
    return index, values.astype(np.float32)


def fold_maps(baseline, confidence: np.ndarray, correct: np.ndarray, predicted: np.ndarray) -> dict:
    """Every method's map, made on one fold's eval half (its rows' top confidence, correctness, class)."""
    sketch = baseline.outputs["confidence"]
    docs = {
        METHODS[0]: classifier_map(sketch, confidence, correct),
        METHODS[1]: classifier_map(sketch, confidence, correct, method="isotonic at mean"),
        METHODS[2]: classifier_map(sketch, confidence, correct, method="binned"),
        METHODS[3]: classifier_map(sketch, confidence, correct, prior_rows=0.0),
        METHODS[4]: classifier_map(sketch, confidence, np.clip(confidence, 0, 1), method="binned", prior_rows=0.0),
    }
    cuts = np.unique(np.quantile(confidence, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1]))
    quantile = NumericSketch("confidence", cuts[(cuts > 0) & (cuts < 1)], 0.0, 1.0)
    classes = {}
    for label in np.unique(predicted):
        mine = predicted == label
        classes[label] = (isotonic(confidence[mine], correct[mine]), int(mine.sum()))
    return {
        "calibrations": {name: Calibration.read(doc) for name, doc in docs.items()},
        "sketch": sketch,
        "curve": isotonic(confidence, correct),
        "quantile": (quantile, Calibration.read(classifier_map(quantile, confidence, correct))),
        "classes": classes,
        # ATC's threshold: the eval rows above it are as many as the eval rows answered right
        "atc": float(np.quantile(confidence, 1.0 - correct.mean())),
        "platt": platt(confidence, correct),
    }


def estimates(maps: dict, compact: dict, top: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Each method's estimate of one window: the device's compact profile, or (the per-row methods, which a
    device does not send) its rows' top confidence and predicted class."""
    found = {name: c.estimate(compact) for name, c in maps["calibrations"].items()}
    pooled = np.interp(top, *maps["curve"])
    found[METHODS[5]] = float(pooled.mean())
    sketch, calibration = maps["quantile"]
    window = sketch.empty_like()
    window.update(top)
    found[METHODS[6]] = calibration.estimate({"outputs": {"confidence": [window.counts.tolist()]}})
    classwise = pooled.copy()
    for label, (curve, rows) in maps["classes"].items():
        mine = predicted == label
        fitted = np.interp(top[mine], *curve)
        classwise[mine] = (rows * fitted + CLASS_PRIOR_ROWS * pooled[mine]) / (rows + CLASS_PRIOR_ROWS)
    found[METHODS[7]] = float(classwise.mean())
    found[METHODS[8]] = float((top > maps["atc"]).mean())
    found[METHODS[9]] = float(np.mean(1 / (1 + np.exp(-maps["platt"] @ [_logit(top), np.ones_like(top)]))))
    return found


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def platt(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """``(a, b)`` of P(correct) = sigmoid(a logit(confidence) + b), by Newton steps on the log loss (a small
    ridge towards the identity map keeps a perfectly separated eval set finite)."""
    x, ridge = _logit(confidence), 1e-3
    design = np.stack([x, np.ones_like(x)])
    weights = np.array([1.0, 0.0])
    for _ in range(50):
        fitted = 1 / (1 + np.exp(-weights @ design))
        curvature = fitted * (1 - fitted) + 1e-9
        gradient = design @ (fitted - correct) + ridge * (weights - [1.0, 0.0])
        hessian = (design * curvature) @ design.T + ridge * np.eye(2)
        weights = weights - np.linalg.solve(hessian, gradient)
    return weights


def floor_points(index: np.ndarray, chance: np.ndarray, repeated: bool) -> float:
    """The mean absolute error (points) a perfect estimate would still show on this window: realized accuracy
    is a sum of right-or-wrong over the window's distinct examples, each right with its ``chance`` (here the
    default map's). ``repeated``: draws of one row are one example (resampled, scaled), not fresh ones (noise,
    a random occlusion)."""
    if repeated:
        _, inverse, counts = np.unique(index, return_inverse=True, return_counts=True)
        each = np.bincount(inverse, chance) / counts
        variance = float(np.sum((counts / len(index)) ** 2 * each * (1 - each)))
    else:
        variance = float(np.sum(chance * (1 - chance))) / len(index) ** 2
    return 100 * float(np.sqrt(2 / np.pi * variance))


def window_record(model, baseline, maps: dict, values: np.ndarray, truth: np.ndarray) -> dict:
    """One window through the device's sketch and every method: realized accuracy, estimates, mean confidence."""
    answer = model.predict(values)
    top = answer.probabilities.max(axis=1).astype(np.float64)
    sketch = baseline.empty_like()
    sketch.update_outputs(labels=answer.labels, probabilities=answer.probabilities)
    default = maps["calibrations"][METHODS[0]]
    return {
        "realized": float((answer.labels == truth).mean()),
        "mean_confidence": float(top.mean()),
        "expected": default.expected,
        "estimates": estimates(maps, sketch.to_compact(), top, np.asarray(answer.labels)),
        "chance": np.asarray(default.values)[slot_of(maps["sketch"], top)],
    }


def run_fixture(name: str, model, X, y, shifts, args, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    halves = (order[: len(y) // 2], order[len(y) // 2 :])
    context = {"y": y, "classes": np.unique(y), "clip": (0.0, 16.0) if name == "digits" else None}
    context["noise_scale"] = 1.0 if name == "digits" else X.std(axis=0)
    centred = X - X.mean(axis=0)
    context["components"] = centred @ np.linalg.svd(centred / (X.std(axis=0) + 1e-9), full_matrices=False)[2][:3].T
    labels = model.output.labels
    results = []
    for fold, (calibrate_on, windows_from) in enumerate((halves, halves[::-1])):
        prediction = model.predict(X[calibrate_on])
        confidence = prediction.probabilities.max(axis=1).astype(np.float64)
        correct = (prediction.labels == y[calibrate_on]).astype(np.float64)
        baseline = build_baseline(X[calibrate_on], [f"f{i}" for i in range(X.shape[1])], labels=list(labels))
        maps = fold_maps(baseline, confidence, correct, np.asarray(prediction.labels))
        for family, level, spec in [("none", "unshifted", ("none", 0, 0)), *shifts]:
            if args.quick and family not in ("none", "noise"):
                continue
            for window in range(args.windows):
                index, values = shifted(X, windows_from, spec, args.rows, rng, context)
                record = window_record(model, baseline, maps, values, y[index])
                chance = record.pop("chance")
                record["floor_points"] = floor_points(index, chance, spec[0] not in ("noise", "occlude"))
                key = {"fixture": name, "seed": seed, "fold": fold, "family": family, "shift": level, "window": window}
                results.append({**key, **record})
    return results


def mae_points(windows: list[dict], method: str = METHODS[0]) -> float | None:
    if not windows:
        return None
    return float(np.mean([abs(w["estimates"][method] - w["realized"]) for w in windows]) * 100)


def bias_points(windows: list[dict], method: str = METHODS[0]) -> float | None:
    """Mean signed error: positive is an estimate above the realized accuracy (an overconfident model)."""
    if not windows:
        return None
    return float(np.mean([w["estimates"][method] - w["realized"] for w in windows]) * 100)


def floor_of(windows: list[dict]) -> float | None:
    return float(np.mean([w["floor_points"] for w in windows])) if windows else None


def table(results: list[dict]) -> list[dict]:
    """One row per fixture and shift: realized and estimated accuracy (means over windows), per-window MAE,
    bias and floor, and the other methods' MAE."""
    rows = []
    for key in dict.fromkeys((r["fixture"], r["family"], r["shift"]) for r in results):
        windows = [r for r in results if (r["fixture"], r["family"], r["shift"]) == key]
        rows.append(
            {
                "fixture": key[0],
                "family": key[1],
                "shift": key[2],
                "windows": len(windows),
                "realized": float(np.mean([w["realized"] for w in windows])),
                "estimated": float(np.mean([w["estimates"][METHODS[0]] for w in windows])),
                "bias_points": bias_points(windows),
                "floor_points": floor_of(windows),
                "mae_points": {m: mae_points(windows, m) for m in METHODS},
            }
        )
    print(
        f"{'fixture':8} {'family':11} {'shift':16} {'realized':>8} {'estimate':>8} {'MAE pt':>7} {'bias':>6} "
        f"{'floor':>5}  others (MAE pt)"
    )
    for row in rows:
        others = " ".join(f"{row['mae_points'][m]:5.1f}" for m in METHODS[1:])
        print(
            f"{row['fixture']:8} {row['family']:11} {row['shift']:16} {100 * row['realized']:8.1f} "
            f"{100 * row['estimated']:8.1f} {row['mae_points'][METHODS[0]]:7.2f} {row['bias_points']:+6.1f} "
            f"{row['floor_points']:5.1f}  {others}"
        )
    print("others: " + ", ".join(METHODS[1:]))
    return rows


def checks(results: list[dict]) -> list:
    shifted_windows = [r for r in results if r["family"] != "none"]
    in_support = [r for r in results if r["family"] == "resampled"]
    found = [
        (
            "CBPE MAE, in-support covariate shift (resampled)",
            mae_points(in_support),
            f"<= {TARGET_MAE_POINTS:g}",
            (mae_points(in_support) or 0) <= TARGET_MAE_POINTS,
        ),
        ("  its floor (a perfect estimate's MAE)", floor_of(in_support), "info", True),
        (
            "CBPE MAE, all shifted windows (out of support too)",
            mae_points(shifted_windows),
            f"<= {TARGET_MAE_POINTS:g}",
            (mae_points(shifted_windows) or 0) <= TARGET_MAE_POINTS,
        ),
    ]
    # the estimated_accuracy_drop rule at its default (5 points below the map's expected accuracy)
    dropped = [r["expected"] - r["realized"] > ALERT_POINTS / 100 for r in shifted_windows]
    flagged = [r["expected"] - r["estimates"][METHODS[0]] > ALERT_POINTS / 100 for r in shifted_windows]
    caught = sum(d and f for d, f in zip(dropped, flagged, strict=True))
    found.append(("  alert: share of real >5-pt drops flagged", caught / max(1, sum(dropped)), "info", True))
    false = sum(f and not d for d, f in zip(dropped, flagged, strict=True))
    found.append(("  alert: share of flags without a >5-pt drop", false / max(1, sum(flagged)), "info", True))
    for fixture in dict.fromkeys(r["fixture"] for r in results):
        for family in dict.fromkeys(r["family"] for r in results if r["fixture"] == fixture):
            windows = [r for r in results if r["family"] == family and r["fixture"] == fixture]
            name = f"  MAE, {fixture} {family} (bias {bias_points(windows):+.1f}, floor {floor_of(windows):.1f})"
            found.append((name, mae_points(windows), "info", True))
    for method in METHODS[1:]:
        name = f"  MAE shifted, {method} (in-support {_points(mae_points(in_support, method))})"
        found.append((name, mae_points(shifted_windows, method), "info", True))
    return found


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def load_fixture(name: str, work: Path):
    directory = ROOT / "fixtures"
    if not fixtures_usable(directory, (name,)):
        directory = work / "fixtures"
        make_fixtures(directory, (name,))
    onnx = work / f"{name}.onnx"
    convert_model(str(directory / f"{name}.joblib"), str(onnx), names_from=str(directory / f"{name}_train.npz"))
    test = np.load(directory / f"{name}_test.npz")
    return load_model(str(onnx)), test["X"].astype(np.float32), test["y"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows per window (the agent's default window)")
    parser.add_argument("--windows", type=int, default=4, help="windows per shift level, fold and seed")
    parser.add_argument("--seeds", type=int, default=2, help="random splits of the test data into halves")
    parser.add_argument("--json", help="where to write the JSON (default: --out/bench_cbpe.json)")
    parser.add_argument("--out", default="bench-results", help="directory for the JSON")
    parser.add_argument("--quick", action="store_true", help="unshifted and noise only, 1 seed: a smoke test")
    args = parser.parse_args()
    started, load = time.time(), _load()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekit-cbpe-") as work:
        for name, shifts in (("digits", DIGIT_SHIFTS), ("cancer", CANCER_SHIFTS)):
            model, X, y = load_fixture(name, Path(work))
            for seed in range(1 if args.quick else args.seeds):
                results += run_fixture(name, model, X, y, shifts, args, seed)
    rows = table(results)
    found = checks(results)
    print()
    print_checks(found)
    machine = {
        "cpus": _cpus(),
        "load_average": load,
        "load_average_after": _load(),
        "python": platform.python_version(),
    }
    summary = {"seconds": time.time() - started, "machine": machine}
    print_run(summary, quick=args.quick, how=f"windows of {args.rows} rows, {len(results)} windows")
    settings = {"rows": args.rows, "windows": args.windows, "seeds": args.seeds, "quick": args.quick}
    write_json(args.json or Path(args.out) / "bench_cbpe.json", found, **summary, settings=settings, table=rows)


def _load() -> list[float]:
    try:
        return list(__import__("os").getloadavg())
    except OSError:
        return [0.0, 0.0, 0.0]


def _cpus() -> int:
    return __import__("os").cpu_count() or 1


if __name__ == "__main__":
    main()
