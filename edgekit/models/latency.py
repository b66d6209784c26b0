"""Latency measured fairly: models interleaved call by call in one process.

Machines here are shared and noisy, so comparing two models measured a minute apart compares two
machines. Interleaving puts both under the same noise; the ratio of their medians is what we
report and decide on. Thread count is the caller's: the runtimes are built with 1 intra-op thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

DEFAULT_BATCHES = (1, 256)
# a camera or a microphone sends one example at a time, a gateway a few: 256 images would take seconds a call
TENSOR_BATCHES = (1, 16)


def batches_from(X: np.ndarray, sizes: tuple[int, ...] | None = None) -> dict[int, np.ndarray]:
    """Fixed batches cut from ``X`` (tiled when ``X`` has fewer rows than a batch): 1 and 256 rows of a
    table, 1 and 16 examples of a tensor."""
    sizes = sizes or (TENSOR_BATCHES if X.ndim > 2 else DEFAULT_BATCHES)
    return {size: np.ascontiguousarray(np.resize(X, (size, *X.shape[1:])), dtype=X.dtype) for size in sizes}


def measure(
    predictors: Mapping[str, Callable[[np.ndarray], Any]],
    batches: Mapping[int, np.ndarray],
    *,
    min_repeats: int = 30,
    max_repeats: int = 300,
    budget_seconds: float = 2.0,
) -> dict[str, dict[int, dict[str, float]]]:
    """p50/p99 milliseconds per predictor and batch size; rounds continue until the budget is spent."""
    single_thread = _limit_threads()
    samples: dict[str, dict[int, list[float]]] = {name: {size: [] for size in batches} for name in predictors}
    with single_thread:
        for predict in predictors.values():  # warm-up: first calls allocate and JIT-pack weights
            for batch in batches.values():
                predict(batch)
        start = time.perf_counter()
        rounds = 0
        while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start < budget_seconds):
            for size, batch in batches.items():
                for name, predict in predictors.items():
                    begin = time.perf_counter()
                    predict(batch)
                    samples[name][size].append(time.perf_counter() - begin)
            rounds += 1
    return {name: {size: _summary(values) for size, values in per_size.items()} for name, per_size in samples.items()}


def _summary(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "samples": int(ms.size)}


def _limit_threads():
    """Keep numpy/scikit-learn to one thread too, so the reference is timed like the candidate."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1)
