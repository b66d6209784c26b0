"""Reference models and data, made deterministically from datasets scikit-learn ships.

Nothing is downloaded. ``scripts/make_fixtures.py`` writes them into ``fixtures/``; the demo and
the tests call ``make_fixtures`` directly when the committed pickles do not match the installed
scikit-learn (pickles are not portable across its versions).

- digits: StandardScaler + MLPClassifier(64), 8x8 digit images, 10 classes
- cancer: StandardScaler + LogisticRegression, breast cancer, 2 classes (linear ML ops: not quantizable)
- wide: StandardScaler + MLPClassifier(1024, 1024, 512) on digits, weight-heavy (6.6 MB float32)
- xgb_cancer, lgb_wine: an XGBoost and a LightGBM booster in their own file formats
  (``booster_fixtures.py``; they need ``edgekit-ml[boost]``)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import require
from edgekit.local.booster_fixtures import BOOSTER_FIXTURES, make_booster_fixture

SEED = 0
FIXTURES = ("digits", "cancer", "wide")
ALL_FIXTURES = FIXTURES + BOOSTER_FIXTURES


def _datasets() -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer, load_digits

    digits, cancer = load_digits(), load_breast_cancer()
    return {
        "digits": (digits.data, digits.target, list(digits.feature_names)),
        "cancer": (cancer.data, cancer.target, [n.replace(" ", "_") for n in cancer.feature_names]),
    }


def _estimator(name: str):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "digits":
        return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=SEED))
    if name == "cancer":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(1024, 1024, 512), max_iter=60, alpha=1e-3, random_state=SEED),
    )


def make_fixtures(directory: str | Path, names: tuple[str, ...] = FIXTURES) -> dict[str, dict[str, str]]:
    """Write ``<name>.joblib``, ``<name>_train.npz``/``_test.npz`` and ``_test.csv`` for each fixture
    (a booster fixture writes its library's own model file and the two .npz)."""
    joblib = require("joblib")
    require("sklearn")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    datasets = _datasets()
    written: dict[str, dict[str, str]] = {}
    for name in names:
        if name in BOOSTER_FIXTURES:
            written[name] = make_booster_fixture(directory, name)
            continue
        X, y, feature_names = datasets["cancer" if name == "cancer" else "digits"]
        X_train, X_test, y_train, y_test = train_test_split(
            X.astype(np.float32), y, test_size=0.33, random_state=SEED, stratify=y
        )
        with (
            warnings.catch_warnings(),
            threadpool_limits(limits=1),
        ):  # one BLAS thread: same weights on every machine we can control
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = _estimator(name).fit(X_train, y_train)
        paths = {
            "model": directory / f"{name}.joblib",
            "train": directory / f"{name}_train.npz",
            "test": directory / f"{name}_test.npz",
            "test_csv": directory / f"{name}_test.csv",
        }
        joblib.dump(model, paths["model"])
        np.savez(paths["train"], X=X_train, y=y_train, feature_names=np.asarray(feature_names))
        np.savez(paths["test"], X=X_test, y=y_test, feature_names=np.asarray(feature_names))
        _write_csv(paths["test_csv"], X_test, y_test, feature_names)
        written[name] = {k: str(v) for k, v in paths.items()}
    _write_manifest(directory, written)
    return written


def _write_csv(path: Path, X: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    lines = [",".join([*names, "label"])]
    lines += [",".join([*(f"{v:g}" for v in row), str(int(label))]) for row, label in zip(X, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def _write_manifest(directory: Path, written: dict[str, dict[str, str]]) -> None:
    import sklearn

    path = directory / "fixtures.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.setdefault("fixtures", {}).update(
        {name: sorted(Path(p).name for p in paths.values()) for name, paths in written.items()}
    )
    existing["scikit_learn"] = sklearn.__version__
    path.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")


def fixtures_usable(directory: str | Path, names: tuple[str, ...] = FIXTURES) -> bool:
    """True when ``directory`` holds the fixtures, pickled by the scikit-learn installed here."""
    import sklearn

    path = Path(directory) / "fixtures.json"
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    return (
        manifest.get("scikit_learn") == sklearn.__version__
        and all(n in manifest.get("fixtures", {}) for n in names)
        and all((Path(directory) / f).exists() for n in names for f in manifest["fixtures"][n])
    )
