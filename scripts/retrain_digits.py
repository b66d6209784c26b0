#!/usr/bin/env python3
"""Retrain the digits model on its training data plus the labelled field samples: the example command of
the collector's retrain sink (``[sinks.retrain]`` in alerts.toml, docs/retrain.md).

The sink runs it with a JSON document on stdin (schema ``edgekit.retrain/1``); it writes ``model.joblib`` in the
alert's work folder and prints that path as its last line. Run by hand::

    python scripts/retrain_digits.py --train fixtures/digits_train.npz --samples field.csv -o model.joblib

The code is ``edgekit/local/retrain_example.py`` (one copy: ``edgekit demo`` runs it from an installed package,
where this folder is not); this file is the example's address in the repository.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a clone without edgekit installed

from edgekit.local.retrain_example import fit, main, read_field  # noqa: E402

__all__ = ["fit", "main", "read_field"]

if __name__ == "__main__":
    sys.exit(main())
