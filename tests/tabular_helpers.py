"""Typed tabular summaries for collector tests: a number and two string columns, sketched by the device's own code.

``shift`` moves that share of rows from country "IN" to "BR" (known categories: drift, nothing unseen);
``unseen`` gives that share of rows a country the baseline never saw ("XX"); ``missing`` leaves that
share of rows without a plan.
"""

from __future__ import annotations

import numpy as np

from device_agent.drift import drift_report
from device_agent.monitor import ClosedWindow
from device_agent.profile import build_baseline
from device_agent.protocol import baseline_payload, build_summary, encode

COLUMNS = ("amount", "country", "plan")
KINDS = ("numeric", "categorical", "categorical")
COUNTRIES = ("DE", "FR", "IN", "US", "BR")
MODEL = {"name": "churn", "version": 1}


def rows(
    count: int, rng: np.random.Generator, *, shift: float = 0.0, unseen: float = 0.0, missing: float = 0.0
) -> np.ndarray:
    table = np.empty((count, len(COLUMNS)), dtype=object)
    table[:, 0] = rng.normal(50, 10, count)
    table[:, 1] = rng.choice(COUNTRIES, count, p=[0.3, 0.2, 0.3, 0.1, 0.1])
    table[:, 2] = rng.choice(("basic", "plus", "pro"), count)
    moved = rng.random(count)
    table[(moved < shift) & (table[:, 1] == "IN"), 1] = "BR"
    table[rng.random(count) < unseen, 1] = "XX"
    table[rng.random(count) < missing, 2] = None
    return table


def typed_baseline(seed: int = 0):
    rng = np.random.default_rng(seed)
    return build_baseline(
        rows(5000, rng),
        COLUMNS,
        kinds=KINDS,
        labels=[0, 1],
        predicted_labels=rng.integers(0, 2, 5000),
        probabilities=rng.dirichlet([1, 1], 5000),
    )


def typed_summary(
    base,
    device: str,
    seq: int,
    *,
    fleet: str = "f",
    count: int = 500,
    shift: float = 0.0,
    unseen: float = 0.0,
    missing: float = 0.0,
) -> tuple[str, bytes]:
    """One closed window's ``edgekit.summary/2`` message, on the topic the device publishes it to."""
    rng = np.random.default_rng(seq)
    window = base.empty_like()
    window.update_inputs(rows(count, rng, shift=shift, unseen=unseen, missing=missing))
    window.update_outputs(labels=rng.integers(0, 2, count), probabilities=rng.dirichlet([1, 1], count))
    window.update_latency(np.full(count, 1.0))
    start = 1.7e9 + seq * 60
    closed = ClosedWindow(window, start, start + 60, np.full(count, 1.0), {}, drift=drift_report(base, window, None))
    doc = build_summary(closed, device=device, fleet=fleet, model=MODEL, seq=seq)
    return f"edgekit/v1/{fleet}/{device}/summary", encode(doc)


def typed_baseline_message(base, device: str, fleet: str = "f") -> tuple[str, bytes]:
    return f"edgekit/v1/{fleet}/{device}/baseline", encode(baseline_payload(device=device, model=MODEL, baseline=base))
