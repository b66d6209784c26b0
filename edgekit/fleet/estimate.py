"""A window's label-free performance estimate, computed at ingest from its histogram and the bundle's map.

The bundle's baseline profile may carry a calibration (``edgekit package --eval``, written by
``edgekit.bundle.calibration``): per slot of the ``confidence`` sketch, the accuracy the model showed on
labelled eval data (a regressor: per slot of the ``prediction`` sketch, its mean absolute error). A
window's compact profile carries that sketch's counts, so its estimate is ``counts @ values / rows``: no
labels, no raw rows. It goes into the window's alert facts (``estimated_accuracy`` and the map's
``expected_accuracy``, or ``estimated_mae``/``expected_mae``) beside the realized ``accuracy`` that
delayed labels give, and the ``estimated_accuracy_drop`` rule reads it there. It assumes that a
prediction made with a given confidence is right as often as on the eval data: true when the mix of
inputs moves within what the eval data covered (covariate shift in CBPE's sense), not when inputs leave
it (noise, occlusion, rescaled features), where a model is confidently wrong and the estimate stays high
(``scripts/bench_cbpe.py`` measures both; docs/bundle.md).

The map reaches the collector in the device's ``baseline`` message (the profile's ``calibration``
field). A baseline is stored once per ``baseline_id``, and two versions trained on the same data share
one; so the map names the model version it was made for, and a window of another version gets no
estimate from it. Maps seen in baseline messages are kept in memory per (baseline, model, version),
which covers a later version sharing the bins; ingest workers, which see no baseline messages, read
the stored one. No map (a bundle packaged without ``--eval``, an agent that predates the field and
drops it): no estimate, no alert.

Imports: ``edgekit.bundle.calibration`` (the format), nothing of the store.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgekit.bundle.calibration import CALIBRATION_SCHEMA
from edgekit.errors import StoreError

log = logging.getLogger("edgekit.fleet")
RETRY_SECONDS = 30.0  # a baseline not stored yet is looked for again after this long
NAMES = {"accuracy": ("estimated_accuracy", "expected_accuracy"), "mae": ("estimated_mae", "expected_mae")}


@dataclass(frozen=True)
class Calibration:
    """A checked map: ``values`` per slot of the ``output`` sketch, ``expected`` on the eval data."""

    metric: str
    output: str
    values: tuple[float, ...]
    expected: float
    model: tuple[str, int] | None

    @classmethod
    def read(cls, doc: Any) -> Calibration | None:
        """The map in ``doc`` (a profile's ``calibration``), or None for an absent, unknown or malformed one:
        a collector never refuses a baseline over its estimate."""
        if not isinstance(doc, dict) or doc.get("schema") != CALIBRATION_SCHEMA or doc.get("metric") not in NAMES:
            return None
        values, expected, model = doc.get("values"), doc.get("expected"), doc.get("model")
        if not isinstance(values, list) or not values or not all(_number(v) for v in values) or not _number(expected):
            return None
        identity = None
        if isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("version"), int):
            identity = (model["name"], model["version"])
        return cls(doc["metric"], str(doc.get("output")), tuple(float(v) for v in values), float(expected), identity)

    def fits(self, model: dict[str, Any]) -> bool:
        return self.model is None or self.model == (model.get("name"), model.get("version"))

    def estimate(self, compact: dict[str, Any]) -> float | None:
        """The window's estimate from its compact profile (``Profile.to_compact``), or None when the window
        has no such sketch, no rows in it, or counts of another length (a profile the map was not made for)."""
        sketch = (compact.get("outputs") or {}).get(self.output)
        counts = sketch[0] if isinstance(sketch, list) and sketch else None
        if not isinstance(counts, list) or len(counts) != len(self.values) or not all(_number(c) for c in counts):
            return None
        total = sum(counts)
        if total <= 0:
            return None
        return sum(c * v for c, v in zip(counts, self.values, strict=True)) / total

    def facts(self, summary: dict[str, Any]) -> dict[str, Any]:
        value = self.estimate(summary["profile"])
        if value is None:
            return {}
        estimated, expected = NAMES[self.metric]
        return {estimated: round(value, 5), expected: round(self.expected, 5)}


class Estimates:
    """The maps of the baselines a collector has seen, and each window's estimate from them."""

    def __init__(self, baseline_of: Callable[[str], dict[str, Any] | None], *, clock: Callable[[], float]) -> None:
        """``baseline_of``: a stored baseline profile by id (``SqlStore.baseline``)."""
        self.baseline_of, self.clock = baseline_of, clock
        self._maps: dict[tuple[str, str, int], Calibration | None] = {}
        self._stored: dict[str, tuple[Calibration | None, float]] = {}  # by baseline id: the map, when read

    def learn(self, baseline: dict[str, Any]) -> None:
        """A checked ``baseline`` message: its map is the one for its model version's windows."""
        model = baseline["model"]
        self._maps[(baseline["baseline_id"], model["name"], model["version"])] = Calibration.read(
            baseline["profile"].get("calibration")
        )

    def facts(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The estimate's alert facts for a checked summary; empty without a map that fits it."""
        calibration = self._calibration(summary["profile"]["baseline_id"], summary["model"])
        try:
            return calibration.facts(summary) if calibration is not None else {}
        except (TypeError, ValueError, KeyError):  # the compact profile is not checked deeper than its keys
            return {}

    def _calibration(self, baseline_id: str, model: dict[str, Any]) -> Calibration | None:
        key = (baseline_id, model["name"], model["version"])
        if key in self._maps:
            return self._maps[key]
        stored, read_at = self._stored.get(baseline_id, (None, -math.inf))
        now = self.clock()
        if stored is None and now - read_at >= RETRY_SECONDS:
            try:
                profile = self.baseline_of(baseline_id)
            except StoreError:  # the estimate is optional: a database hiccup must not cost the summary
                return None
            stored = Calibration.read(profile.get("calibration")) if isinstance(profile, dict) else None
            self._stored[baseline_id] = (stored, now)
            if profile is not None:  # a stored baseline does not change: no need to ask again
                self._stored[baseline_id] = (stored, math.inf)
        return stored if stored is not None and stored.fits(model) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
