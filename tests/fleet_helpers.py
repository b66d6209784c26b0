"""Real summaries for collector tests, made by the device's own code (one format, two sides)."""

from __future__ import annotations

import json
import time

import numpy as np

from device_agent.drift import drift_report
from device_agent.monitor import ClosedWindow
from device_agent.profile import build_baseline
from device_agent.protocol import baseline_payload, build_summary, encode, state_payload

NAMES = [f"f{i}" for i in range(8)]
MODEL = {"name": "m", "version": 1}


def baseline(seed: int = 0):
    rng = np.random.default_rng(seed)
    return build_baseline(
        rng.normal(size=(5000, len(NAMES))),
        NAMES,
        labels=[0, 1],
        predicted_labels=rng.integers(0, 2, 5000),
        probabilities=rng.dirichlet([1, 1], 5000),
    )


def summary(
    base,
    device: str,
    seq: int,
    *,
    fleet: str = "f",
    rows: int = 500,
    shift: float = 0.0,
    seed: int | None = None,
    start: float = 1.7e9,
    null_rate: float = 0.0,
    latency_ms: float = 1.0,
    errors: dict | None = None,
    labelled: int = 0,
    correct: int = 0,
    model: dict = MODEL,
) -> tuple[str, bytes]:
    rng = np.random.default_rng(seq if seed is None else seed)
    X = rng.normal(size=(rows, len(NAMES)))
    X[:, 0] += shift
    if null_rate:
        X[rng.random(X.shape) < null_rate] = np.nan
    window = base.empty_like()
    window.update_inputs(X)
    window.update_outputs(labels=rng.integers(0, 2, rows), probabilities=rng.dirichlet([1, 1], rows))
    window.update_latency(np.full(rows, latency_ms))
    closed = ClosedWindow(
        window,
        start + seq * 60,
        start + seq * 60 + 60,
        np.full(rows, latency_ms),
        errors or {},
        labelled,
        correct,
        drift=drift_report(base, window, None),
    )
    doc = build_summary(closed, device=device, fleet=fleet, model=model, seq=seq)
    return f"edgekit/v1/{fleet}/{device}/summary", encode(doc)


def baseline_message(base, device: str, fleet: str = "f") -> tuple[str, bytes]:
    return f"edgekit/v1/{fleet}/{device}/baseline", encode(baseline_payload(device=device, model=MODEL, baseline=base))


def state(device: str, online: bool, fleet: str = "f", model: dict = MODEL) -> tuple[str, bytes]:
    return f"edgekit/v1/{fleet}/{device}/state", json.dumps(
        state_payload(
            online=online, device=device, fleet=fleet, model=model, runtime="onnxruntime", agent_version="0.1.0"
        )
    ).encode()


def wait(predicate, timeout=30.0, what="condition"):
    """Poll ``predicate`` every 0.1 s until it holds; ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
