"""The few distribution functions drift tests need, without scipy (which a Pi should not carry).

``chi2_sf`` is the regularized upper incomplete gamma function Q(df/2, x/2), by its series below
a + 1 and its continued fraction above (the classic pairing: each converges fast where it is used).
"""

from __future__ import annotations

import math

_EPS = 1e-15
_MAX_ITER = 500


def chi2_sf(x: float, df: float) -> float:
    """P(X > x) for X ~ chi-square with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError("degrees of freedom must be positive")
    if x <= 0:
        return 1.0
    return _gamma_q(df / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    if x < a + 1.0:
        return max(0.0, 1.0 - _gamma_p_series(a, x))
    return _gamma_q_fraction(a, x)


def _gamma_p_series(a: float, x: float) -> float:
    term = total = 1.0 / a
    denominator = a
    for _ in range(_MAX_ITER):
        denominator += 1.0
        term *= x / denominator
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_q_fraction(a: float, x: float) -> float:
    # Lentz's method for the continued fraction of Q(a, x).
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def ks_sf(distance: float, n: float, m: float) -> float:
    """P(D >= distance) for the two-sample KS distance of samples of ``n`` and ``m``: the Kolmogorov
    distribution with Stephens' small-sample correction (within a few % of the exact p-value for
    continuous data from ``n * m / (n + m)`` of about 50 up; conservative for binned or tied data)."""
    if distance <= 0 or n <= 0 or m <= 0:
        return 1.0
    root = math.sqrt(n * m / (n + m))
    lam = (root + 0.12 + 0.11 / root) * distance
    if lam < 0.2:  # the series converges slowly there, and Q(0.2) = 1 - 3e-11
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2.0 * k * k * lam * lam)
        total += term if k % 2 else -term
        if term < 1e-17:
            break
    return min(1.0, max(0.0, 2.0 * total))
