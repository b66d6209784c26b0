"""A typed tabular fixture: synthetic customers with int, float, string and missing values.

Deterministic (numpy's seeded generator; nothing downloaded), and shaped like the tables people
deploy: counts, a zero-inflated usage column, a flag, three string columns (one with missing
values), and a churn label that depends on all of them. Two pipelines are fitted on it, both a
``ColumnTransformer`` over a DataFrame:

- ``churn_rf``: imputer + scaler on numbers, imputer + one-hot on strings, RandomForest (100 trees);
- ``churn_hgb``: numbers straight into HistGradientBoosting (NaN routed natively), one-hot strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import require

SEED = 0
COUNTRIES = ("DE", "FR", "IN", "US", "BR")
PLANS = ("basic", "plus", "pro")
PAYMENTS = ("card", "bank", "paypal")
NUMERIC = ("age", "tenure_months", "monthly_charges", "total_charges", "support_calls", "data_gb", "autopay")
CATEGORICAL = ("country", "plan", "payment")


def churn_frame(rows: int, seed: int = SEED) -> tuple[Any, np.ndarray]:
    """``(DataFrame, labels)``: ``rows`` synthetic customers."""
    pandas = require("pandas", "tabular")
    rng = np.random.default_rng(seed)
    tenure = rng.poisson(24, rows).clip(0, 72)
    monthly = np.round(rng.normal(65, 20, rows).clip(15, 150), 2)
    total = np.round(monthly * tenure + rng.normal(0, 30, rows), 2).clip(0, None)
    total[rng.random(rows) < 0.03] = np.nan  # new customers' totals are often not in yet
    calls = rng.poisson(1.5, rows) * (rng.random(rows) < 0.4)  # most call nobody
    data_gb = np.round(rng.gamma(2.0, 4.0, rows) * (rng.random(rows) < 0.7), 2)  # 30 % use no data
    frame = pandas.DataFrame(
        {
            "age": rng.integers(18, 80, rows),
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "total_charges": total,
            "support_calls": calls,
            "data_gb": data_gb,
            "autopay": (rng.random(rows) < 0.55).astype(np.int64),
            "country": rng.choice(COUNTRIES, rows, p=[0.3, 0.2, 0.2, 0.2, 0.1]).astype(object),
            "plan": rng.choice(PLANS, rows, p=[0.5, 0.3, 0.2]).astype(object),
            "payment": rng.choice(PAYMENTS, rows).astype(object),
        }
    )
    frame.loc[rng.random(rows) < 0.05, "payment"] = np.nan
    logit = (
        -1.0
        + 0.6 * calls
        - 0.05 * tenure
        + 0.02 * (monthly - 65)
        - 0.7 * frame["autopay"].to_numpy()
        + np.where(frame["plan"] == "basic", 0.5, -0.3)
        + np.where(frame["country"] == "IN", 0.4, 0.0)
        + rng.normal(0, 0.5, rows)
    )
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return frame, labels


def churn_pipelines() -> dict[str, Any]:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    def strings() -> Pipeline:
        return Pipeline(
            [
                ("impute", SimpleImputer(strategy="constant", fill_value="missing")),
                ("onehot", OneHotEncoder(handle_unknown="ignore")),
            ]
        )

    numbers = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    forest = RandomForestClassifier(n_estimators=100, max_depth=10, min_samples_leaf=3, random_state=SEED, n_jobs=1)
    return {
        "churn_rf": Pipeline(
            [
                ("pre", ColumnTransformer([("num", numbers, list(NUMERIC)), ("cat", strings(), list(CATEGORICAL))])),
                ("model", forest),
            ]
        ),
        "churn_hgb": Pipeline(
            [
                (
                    "pre",
                    ColumnTransformer([("num", "passthrough", list(NUMERIC)), ("cat", strings(), list(CATEGORICAL))]),
                ),
                ("model", HistGradientBoostingClassifier(max_iter=100, random_state=SEED)),
            ]
        ),
    }


def make_churn(directory: str | Path, train_rows: int = 6000, test_rows: int = 2000) -> dict[str, str]:
    """Write ``churn_rf.joblib``, ``churn_hgb.joblib``, ``churn_train.csv`` and ``churn_test.csv``."""
    joblib = require("joblib")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frame, labels = churn_frame(train_rows + test_rows)
    train, test = frame.iloc[:train_rows], frame.iloc[train_rows:]
    paths = {"train_csv": directory / "churn_train.csv", "test_csv": directory / "churn_test.csv"}
    for name, pipeline in churn_pipelines().items():
        pipeline.fit(train, labels[:train_rows])
        paths[name] = directory / f"{name}.joblib"
        joblib.dump(pipeline, paths[name])
    train.assign(label=labels[:train_rows]).to_csv(paths["train_csv"], index=False)
    test.assign(label=labels[train_rows:]).to_csv(paths["test_csv"], index=False)
    return {k: str(v) for k, v in paths.items()}
