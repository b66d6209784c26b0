"""XGBoost and LightGBM reference models in their own file formats, made deterministically.

Nothing is downloaded; the data are datasets scikit-learn ships. Both are small (tens of KB) and
single-threaded, so the same library version writes the same file on every machine.

- xgb_cancer: XGBoost ``binary:logistic``, 20 trees of depth 3 on breast cancer, trained with 5 % of
  its values missing so its splits learn where NaN goes; saved with ``save_model`` as JSON.
- lgb_wine: LightGBM ``multiclass``, 20 rounds of 3 trees of 8 leaves on wine, trained without
  missing values (LightGBM then treats a NaN as 0); saved with ``save_model`` as text.

Each comes with ``<name>_train.npz`` and ``<name>_test.npz``: a stratified third held out, a tenth
of the held-out values set to NaN, in the library's own precision (float32 for XGBoost, float64 for
LightGBM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import require
from edgekit.models.boosters import BOOST_EXTRA

SEED = 0
BOOSTER_FIXTURES = ("xgb_cancer", "lgb_wine")


def make_booster_fixture(directory: Path, name: str) -> dict[str, str]:
    """Write ``name``'s model file and its train/test rows into ``directory``; the paths written."""
    from sklearn.model_selection import train_test_split

    X, y, feature_names = _dataset(name)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.33, random_state=SEED, stratify=y)
    rng = np.random.default_rng(SEED)
    if name == "xgb_cancer":
        X_train = _with_missing(X_train, rng, 0.05)
    X_test = _with_missing(X_test, rng, 0.10)
    paths = {
        "model": directory / (f"{name}.json" if name == "xgb_cancer" else f"{name}.txt"),
        "train": directory / f"{name}_train.npz",
        "test": directory / f"{name}_test.npz",
    }
    _train(name, X_train, y_train, feature_names).save_model(str(paths["model"]))
    np.savez(paths["train"], X=X_train, y=y_train, feature_names=np.asarray(feature_names))
    np.savez(paths["test"], X=X_test, y=y_test, feature_names=np.asarray(feature_names))
    return {k: str(v) for k, v in paths.items()}


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_breast_cancer, load_wine

    if name == "xgb_cancer":
        data = load_breast_cancer()
        return data.data.astype(np.float32), data.target, [n.replace(" ", "_") for n in data.feature_names]
    data = load_wine()
    return data.data.astype(np.float64), data.target, [n.replace("/", "_") for n in data.feature_names]


def _with_missing(X: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    X = X.copy()
    X[rng.random(X.shape) < share] = np.nan
    return X


def _train(name: str, X: np.ndarray, y: np.ndarray, feature_names: list[str]) -> Any:
    """The booster itself (not a scikit-learn wrapper): what ``save_model`` writes is all a device needs."""
    if name == "xgb_cancer":
        xgboost = require("xgboost", BOOST_EXTRA)
        params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": SEED}
        data = xgboost.DMatrix(X, label=y, feature_names=feature_names)
        return xgboost.train(params, data, num_boost_round=20)
    lightgbm = require("lightgbm", BOOST_EXTRA)
    params = {
        "objective": "multiclass",
        "num_class": 3,
        "num_leaves": 8,
        "min_data_in_leaf": 5,
        "num_threads": 1,
        "deterministic": True,
        "seed": SEED,
        "verbose": -1,
    }
    return lightgbm.train(params, lightgbm.Dataset(X, label=y, feature_name=feature_names), num_boost_round=20)
