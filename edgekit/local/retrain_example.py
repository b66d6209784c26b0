"""The example retraining command of the retrain sink: the digits model retrained on its training data plus the
labelled field samples (``scripts/retrain_digits.py`` runs this module; so does ``edgekit demo``, which has to
work from an installed package, where ``scripts/`` is not).

The collector's retrain sink (``[sinks.retrain]`` in alerts.toml, docs/retrain.md) runs it with a JSON document
on stdin (schema ``edgekit.retrain/1``: ``samples`` is the field rows' CSV, ``trained_on`` the training files from
alerts.toml, ``workdir`` a folder of this alert's own); it writes ``model.joblib`` there and prints that path as
its last line, which the sink hands to ``edgekit promote``. Run by hand, the same arguments come from the command
line::

    python scripts/retrain_digits.py --train fixtures/digits_train.npz --samples field.csv -o model.joblib
    python -m edgekit.local.retrain_example --train fixtures/digits_train.npz --samples field.csv -o model.joblib

A small neural network (``StandardScaler`` and a 128-unit ``MLPClassifier``), not the fixtures' logistic
regression: the field may look nothing like the training data (the end-to-end test inverts the digits), and a
linear model cannot answer both; each field row is repeated ``--field-repeat`` times, since it is what the
device sees now. It needs only numpy and scikit-learn (``edgekit[host]``), no other part of edgekit.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np

META = ("id", "device", "model", "version", "seq", "ts", "drifted", "prediction", "label")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", help="the training data (.npz with X, y, feature_names)")
    parser.add_argument("--samples", help="the labelled field samples (edgekit fleet samples' CSV)")
    parser.add_argument("-o", "--output", help="where to write the model (default: <workdir>/model.joblib)")
    parser.add_argument("--field-repeat", type=int, default=3, help="copies of each field row (default 3)")
    parser.add_argument("--max-iter", type=int, default=600, help="the network's training epochs at most (default 600)")
    args = parser.parse_args(argv)
    doc = json.loads(sys.stdin.read() or "{}") if not sys.stdin.isatty() else {}
    train = args.train or next(iter(doc.get("trained_on") or []), None)
    samples = args.samples or doc.get("samples")
    output = Path(args.output or Path(doc.get("workdir") or ".") / "model.joblib")
    if not train:
        print("retrain_digits: no training data; pass --train digits_train.npz", file=sys.stderr)
        return 2
    for path in (train, samples):
        if path and not Path(path).is_file():
            print(f"retrain_digits: {path} is not a file; check trained_on / samples", file=sys.stderr)
            return 2
    with np.load(train) as data:
        X, y, names = data["X"], data["y"], [str(n) for n in data["feature_names"]]
    if samples:
        X_field, y_field = read_field(samples, names)
        print(f"retrain_digits: {len(y)} training rows, {len(y_field)} labelled field rows", file=sys.stderr)
        repeat = max(1, args.field_repeat)
        X = np.vstack([X, *[X_field] * repeat])
        y = np.concatenate([y, *[y_field.astype(y.dtype)] * repeat])
    fit(X, y, output, max_iter=args.max_iter)
    print(output.resolve())
    return 0


def read_field(path: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows of a field-samples CSV, in the training data's feature order."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("label") not in (None, "")]
    if rows and not set(names) <= set(rows[0]):
        names = [c for c in rows[0] if c not in META]  # unnamed features: every column that is not metadata
    X = np.array([[float(row[n]) if row[n] != "" else np.nan for n in names] for row in rows], dtype=np.float64)
    y = np.array([int(float(row["label"])) for row in rows])
    X = X.reshape(len(rows), len(names))
    whole = ~np.isnan(X).any(axis=1)  # the pipeline takes no missing values: such rows are left out
    return X[whole], y[whole]


def fit(X: np.ndarray, y: np.ndarray, output: Path, *, max_iter: int = 600) -> None:
    import joblib
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), MLPClassifier((128,), max_iter=max_iter, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a convergence warning is no reason to fail a retraining
        model.fit(X, y)
    output.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, output)


if __name__ == "__main__":
    sys.exit(main())
