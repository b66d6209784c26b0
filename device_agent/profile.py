"""Profiles: compact, mergeable sketches of what a model sees and says.

A baseline profile is made on the host from training data and travels in the bundle; a device
makes window profiles with the *same bin definitions*, so profiles of one baseline merge by
addition: windows into a device, devices into a fleet, exactly. Drift is then a comparison of
two count vectors, never of raw data.

Numeric features are binned on the baseline's quantiles. Bin layout, ``k`` bins from ``k-1`` cuts::

    [ underflow (< low) | [low, c1) | [c1, c2) | ... | [c_{k-1}, high] | overflow (> high) ]

NaN and ±inf are counted apart (``nulls``, ``infs``), with count, sum, sum of squares, min and
max of the finite values. Categorical values (and predicted classes) count the baseline's top
categories plus one "other".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .binning import BinLookup, NumericBlock, numeric_bins, slot_thresholds
from .canonical import canonical_json, sha256_hex
from .categories import CategoricalSketch
from .errors import ProfileError

# 2: categorical input columns, whose sketches count ``unseen`` values (and may keep the ``known``
# vocabulary); compact windows send ``[counts, nulls, unseen]`` for them. Version 1 still reads.
# 3: a numeric sketch may take ``per_row`` values from each example (a tensor's per-channel element
# histogram: ``tensor_signals``), so a profile's rows are ``sum(per_row)`` columns wide and the drift
# tests count examples, not values. A sketch with ``per_row`` 1 is written exactly as in version 2 (its
# ``baseline_id`` does not change), and compact windows are unchanged. Versions 1 and 2 still read.
PROFILE_SCHEMA = "edgekit.profile/3"
READABLE_PROFILE_SCHEMAS = ("edgekit.profile/1", "edgekit.profile/2", PROFILE_SCHEMA)
DEFAULT_BINS = 10
CONFIDENCE_CUTS = tuple(round(0.1 * i, 1) for i in range(1, 10))
LATENCY_CUTS_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


@dataclass
class NumericSketch:
    """Binned counts and moments of one numeric column. ``low``/``high`` may be None (unbounded)."""

    name: str
    cuts: np.ndarray
    low: float | None
    high: float | None
    counts: np.ndarray = None  # type: ignore[assignment]
    count: int = 0
    nulls: int = 0
    infs: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    per_row: int = 1  # values each example adds (``tensor_signals``: a subsample of a channel's elements)

    kind = "numeric"

    def __post_init__(self) -> None:
        self.cuts = np.asarray(self.cuts, dtype=np.float64)
        if int(self.per_row) != self.per_row or self.per_row < 1:
            raise ProfileError(f"feature {self.name!r}: per_row must be a positive integer, not {self.per_row!r}")
        self.per_row = int(self.per_row)
        if self.counts is None:
            self.counts = np.zeros(len(self.cuts) + 3, dtype=np.int64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.shape != (len(self.cuts) + 3,):
            raise ProfileError(
                f"feature {self.name!r}: {len(self.counts)} counts for {len(self.cuts)} cuts (expected cuts + 3)"
            )

    @classmethod
    def from_values(cls, name: str, values: np.ndarray, bins: int = DEFAULT_BINS, *, per_row: int = 1) -> NumericSketch:
        """A baseline sketch: cuts at the quantiles of ``values``, then ``values`` counted into it.

        A column with at most ``bins`` distinct finite values (counts, flags, codes) gets a bin per value
        instead, and a value holding more than ``1 / bins`` of the rows (a point mass: the zeros of a
        sparse sensor or pixel) a bin of its own beside quantile bins over the rest; between those bins,
        gap bins see values that leave the baseline's grid. The limit keeps a sketch at most
        ``2 * bins + 1`` slots, so the summary and the update (one pass per cut) stay within about twice
        those of quantile bins; a limit of ``2 * bins`` found no more shifts on the digits' 17-valued
        pixels for three times the slots (the rules and the measurements: ``binning``). ``per_row``
        says how many of ``values`` each example gave (the drift tests count examples).
        """
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            sketch = cls(name, np.empty(0), None, None, per_row=per_row)
        else:
            sketch = cls(name, *numeric_bins(finite, bins), per_row=per_row)
        sketch.update(values)
        return sketch

    def empty_like(self) -> NumericSketch:
        return NumericSketch(self.name, self.cuts, self.low, self.high, per_row=self.per_row)

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if math.isfinite(low) and math.isfinite(high):  # NaN propagates through min and max: all finite
            finite = values
        else:
            nan = np.isnan(values)
            inf = np.isinf(values)
            finite = values[~(nan | inf)]
            self.nulls += int(nan.sum())
            self.infs += int(inf.sum())
            if finite.size == 0:
                return
            low, high = float(finite.min()), float(finite.max())
        self.counts += np.bincount(self._slots(finite), minlength=len(self.counts))
        self.count += int(finite.size)
        self.total += float(finite.sum())
        self.total_sq += float(np.dot(finite, finite))
        self.minimum = min(self.minimum, low)
        self.maximum = max(self.maximum, high)

    def update_counted(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Count ``counts[i]`` copies of ``values[i]``: a batch's latency is one value for all its rows, so
        the monitor sketches it once per request, not once per row."""
        values = np.asarray(values, dtype=np.float64).ravel()
        counts = np.asarray(counts, dtype=np.int64).ravel()
        finite = np.isfinite(values)
        if not finite.all():
            self.nulls += int(counts[np.isnan(values)].sum())
            self.infs += int(counts[np.isinf(values)].sum())
            values, counts = values[finite], counts[finite]
        kept = counts > 0
        if not kept.all():
            values, counts = values[kept], counts[kept]
        if values.size == 0:
            return
        self.counts += np.bincount(self._slots(values), weights=counts, minlength=len(self.counts)).astype(np.int64)
        self.count += int(counts.sum())
        self.total += float(np.dot(values, counts))
        self.total_sq += float(np.dot(values * values, counts))
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))

    def _slots(self, finite: np.ndarray) -> np.ndarray:
        """Each finite value's slot: ``< low`` 0, then a bin per cut, ``> high`` the last."""
        edges = self.__dict__.get("_edges")
        if edges is None:  # the block's thresholds (``slot_thresholds``): in order, one searchsorted finds a slot
            edges = slot_thresholds(self.cuts, self.low, self.high, np.float64)
            self._edges = edges = edges if bool((np.diff(edges) > 0).all()) else False
        if edges is not False:
            return np.searchsorted(edges, finite, side="right")
        index = np.searchsorted(self.cuts, finite, side="right") + 1  # cuts outside [low, high]: as they say
        if self.low is not None:
            index[finite < self.low] = 0
        if self.high is not None:
            index[finite > self.high] = len(self.counts) - 1
        return index

    def definition(self) -> dict[str, Any]:
        doc = {"name": self.name, "kind": self.kind, "cuts": self.cuts.tolist(), "low": self.low, "high": self.high}
        if self.per_row != 1:  # absent when 1, so version-2 sketches (and their baseline ids) stay as they were
            doc["per_row"] = self.per_row
        return doc

    def merge(self, other: NumericSketch) -> None:
        _check_same_definition(self, other)
        self.counts += other.counts
        self.count += other.count
        self.nulls += other.nulls
        self.infs += other.infs
        self.total += other.total
        self.total_sq += other.total_sq
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def std(self) -> float | None:
        if not self.count:
            return None
        variance = self.total_sq / self.count - (self.total / self.count) ** 2
        return math.sqrt(max(variance, 0.0))

    def quantile(self, q: float) -> float | None:
        """Approximate quantile from the bins (upper edge of the bin where the CDF passes q)."""
        if not self.count:
            return None
        cdf = np.cumsum(self.counts) / self.counts.sum()
        position = int(np.searchsorted(cdf, q, side="left"))
        edges = [self.low] + self.cuts.tolist() + [self.high]
        if position == 0:
            return self.minimum
        if position >= len(self.counts) - 1:
            return self.maximum
        upper = edges[position]
        return float(upper) if upper is not None else self.maximum

    def to_dict(self) -> dict[str, Any]:
        doc = self.definition()
        doc.update(
            counts=self.counts.tolist(),
            count=self.count,
            nulls=self.nulls,
            infs=self.infs,
            sum=self.total,
            sum_sq=self.total_sq,
            min=self.minimum if self.count else None,
            max=self.maximum if self.count else None,
        )
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> NumericSketch:
        return cls(
            name=doc["name"],
            cuts=np.asarray(doc["cuts"], dtype=np.float64),
            low=doc["low"],
            high=doc["high"],
            counts=np.asarray(doc["counts"], dtype=np.int64),
            count=int(doc["count"]),
            nulls=int(doc["nulls"]),
            infs=int(doc.get("infs", 0)),
            total=float(doc["sum"]),
            total_sq=float(doc["sum_sq"]),
            minimum=math.inf if doc["min"] is None else float(doc["min"]),
            maximum=-math.inf if doc["max"] is None else float(doc["max"]),
            per_row=int(doc.get("per_row", 1)),
        )


Sketch = NumericSketch | CategoricalSketch


@dataclass
class Profile:
    """Sketches of the inputs, the outputs and (on devices) latency, under one baseline id."""

    features: list[Sketch]
    outputs: dict[str, Sketch]
    latency_ms: NumericSketch
    rows: int = 0
    # A baseline's optional map from an output's bins to the model's expected accuracy (``edgekit package
    # --eval``); carried, never read, on the device, and outside ``baseline_id``: windows and older agents agree.
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.baseline_id = sha256_hex(canonical_json(self._definition()))[:16]
        self._numeric_block: NumericBlock | None = None
        self._other_columns: list[tuple[int, Sketch]] = []
        self._width = 0
        self._pending_outputs: list[tuple[str, np.ndarray]] = []  # ``update_outputs(settle=False)``, by output
        self._pending_output_rows = 0
        # the binning tables by rows' dtype, shared by a baseline and all its windows (one definition)
        self._tables: dict[np.dtype, BinLookup] = {}

    def _definition(self) -> dict[str, Any]:
        return {
            "features": [s.definition() for s in self.features],
            "outputs": {k: s.definition() for k, s in sorted(self.outputs.items())},
            "latency_ms": self.latency_ms.definition(),
        }

    @property
    def feature_names(self) -> list[str]:
        return [s.name for s in self.features]

    @property
    def width(self) -> int:
        """Columns of the rows ``update_inputs`` takes: a sketch with ``per_row`` K reads K consecutive ones."""
        return sum(getattr(s, "per_row", 1) for s in self.features)

    def feature(self, name: str) -> Sketch:
        for sketch in self.features:
            if sketch.name == name:
                return sketch
        raise KeyError(name)

    def empty_like(self) -> Profile:
        """A zero-count profile with this one's bins: what a device fills during one window."""
        window = Profile(
            features=[s.empty_like() for s in self.features],
            outputs={k: s.empty_like() for k, s in self.outputs.items()},
            latency_ms=self.latency_ms.empty_like(),
        )
        window._tables = self._tables
        return window

    def update_inputs(self, rows: np.ndarray, *, settle: bool = True) -> None:
        """Sketch a batch of rows: a numeric matrix, or the object array of typed columns. Each row is one
        example, ``width`` columns wide: a sketch with ``per_row`` K takes K consecutive columns.

        ``settle=False`` leaves the numeric sketches' counts and moments pending until ``settle`` (or
        anything that reads the whole profile: ``to_dict``, ``to_compact``, ``merge``): a monitor sketching
        many small batches pays the per-sketch bookkeeping once per window instead of once per batch."""
        rows = np.asarray(rows)
        if self._numeric_block is None:
            self._prepare()
        if rows.ndim != 2 or rows.shape[1] != self._width:
            raise ProfileError(
                f"rows of shape {rows.shape} do not fit a profile of {len(self.features)} features "
                f"({self._width} columns)"
            )
        block = self._numeric_block
        if rows.dtype == object:  # typed columns: the numeric ones as one float matrix for the block
            block.update(rows[:, block.columns].astype(np.float64), columns_taken=True)
        else:
            block.update(rows)
        for column, sketch in self._other_columns:
            sketch.update(rows[:, column])
        self.rows += rows.shape[0]
        if settle:
            block.settle()

    def _prepare(self) -> None:
        """The numeric block and the other columns, once: the features do not change after a profile is made."""
        starts = np.cumsum([0, *(getattr(s, "per_row", 1) for s in self.features)])[:-1]
        self._numeric_block = NumericBlock(
            [(int(i), s) for i, s in zip(starts, self.features, strict=True) if isinstance(s, NumericSketch)],
            self._tables,
        )
        self._other_columns = [(int(i), s) for i, s in zip(starts, self.features, strict=True) if s.kind != "numeric"]
        self._width = self.width

    def settle(self) -> None:
        """Hand the sketches what ``update_inputs`` and ``update_outputs`` with ``settle=False`` left pending."""
        if self._numeric_block is not None:
            self._numeric_block.settle()
        pending, self._pending_outputs, self._pending_output_rows = self._pending_outputs, [], 0
        for key in dict.fromkeys(k for k, _ in pending):
            self.outputs[key].update(np.concatenate([a for k, a in pending if k == key]))

    def update_outputs(
        self, *, labels: Any = None, probabilities: Any = None, values: Any = None, settle: bool = True
    ) -> None:
        """Sketch the model's answers. ``settle=False`` gathers them until ``settle`` or until
        ``OUTPUT_ROWS_GATHERED`` rows wait: a categorical update has a fixed cost that small requests would
        each pay again."""
        gathered = []
        if labels is not None and "prediction" in self.outputs:
            gathered.append(("prediction", np.asarray(labels).ravel()))
        if values is not None and "prediction" in self.outputs:
            gathered.append(("prediction", np.asarray(values, dtype=np.float64).ravel()))
        if probabilities is not None and "confidence" in self.outputs:
            gathered.append(("confidence", np.max(np.asarray(probabilities), axis=1)))
        if settle:
            for key, array in gathered:
                self.outputs[key].update(array)
            return
        self._pending_outputs.extend(gathered)
        self._pending_output_rows += max((len(a) for _, a in gathered), default=0)
        if self._pending_output_rows >= OUTPUT_ROWS_GATHERED:
            self.settle()

    def update_latency(self, milliseconds: Any) -> None:
        self.latency_ms.update(np.asarray(milliseconds, dtype=np.float64))

    def merge(self, other: Profile) -> Profile:
        self.settle()
        other.settle()
        if other.baseline_id != self.baseline_id:
            raise ProfileError(
                f"cannot merge a profile of baseline {other.baseline_id} into one of baseline {self.baseline_id}"
            )
        for mine, theirs in zip(self.features, other.features, strict=True):
            mine.merge(theirs)
        for key, sketch in self.outputs.items():
            sketch.merge(other.outputs[key])
        self.latency_ms.merge(other.latency_ms)
        self.rows += other.rows
        return self

    def to_dict(self) -> dict[str, Any]:
        self.settle()
        return {
            "schema": PROFILE_SCHEMA,
            "baseline_id": self.baseline_id,
            "rows": self.rows,
            "features": [s.to_dict() for s in self.features],
            "outputs": {k: s.to_dict() for k, s in sorted(self.outputs.items())},
            "latency_ms": self.latency_ms.to_dict(),
            **({"calibration": self.calibration} if self.calibration else {}),
        }

    def to_compact(self) -> dict[str, Any]:
        """Counts and moments only, positionally; the bins are the baseline's (named by ``baseline_id``).

        This is what a device sends every window: a 64-feature window fits in a few kilobytes.
        """
        self.settle()
        return {
            "baseline_id": self.baseline_id,
            "rows": self.rows,
            "features": [_compact(s) for s in self.features],
            "outputs": {k: _compact(s) for k, s in sorted(self.outputs.items())},
            "latency_ms": _compact(self.latency_ms),
        }

    def from_compact(self, doc: dict[str, Any]) -> Profile:
        """A window profile rebuilt from ``to_compact`` output, on this (baseline) profile's bins."""
        if doc.get("baseline_id") != self.baseline_id:
            raise ProfileError(
                f"window of baseline {doc.get('baseline_id')!r} does not match baseline {self.baseline_id}"
            )
        window = self.empty_like()
        try:
            if len(doc["features"]) != len(window.features) or set(doc["outputs"]) != set(window.outputs):
                raise ProfileError("window profile does not have the baseline's features and outputs")
            for sketch, values in zip(window.features, doc["features"], strict=True):
                _fill(sketch, values)
            for key, sketch in window.outputs.items():
                _fill(sketch, doc["outputs"][key])
            _fill(window.latency_ms, doc["latency_ms"])
            window.rows = int(doc["rows"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProfileError(f"malformed compact profile: {exc!r}") from exc
        return window

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Profile:
        if not isinstance(doc, dict) or doc.get("schema") not in READABLE_PROFILE_SCHEMAS:
            raise ProfileError(
                f"not an {PROFILE_SCHEMA} document (schema={doc.get('schema') if isinstance(doc, dict) else None!r})"
            )
        try:
            profile = cls(
                features=[_sketch_from_dict(d) for d in doc["features"]],
                outputs={k: _sketch_from_dict(d) for k, d in doc["outputs"].items()},
                latency_ms=NumericSketch.from_dict(doc["latency_ms"]),
                rows=int(doc["rows"]),
                calibration=doc.get("calibration") if isinstance(doc.get("calibration"), dict) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"malformed profile: {exc!r}") from exc
        if doc.get("baseline_id", profile.baseline_id) != profile.baseline_id:
            raise ProfileError("profile baseline_id does not match its bin definitions (edited or corrupted)")
        return profile


OUTPUT_ROWS_GATHERED = 4096  # answers gathered before their sketches are updated (``update_outputs``)


def build_baseline(
    rows: np.ndarray,
    feature_names: Sequence[str],
    *,
    labels: Sequence[Any] | None = None,
    predicted_labels: Any = None,
    probabilities: Any = None,
    predicted_values: Any = None,
    bins: int = DEFAULT_BINS,
    kinds: Sequence[str] | None = None,
    per_row: Sequence[int] | None = None,
) -> Profile:
    """The baseline profile of training ``rows`` and of the model's answers on them.

    Classifiers give ``labels`` (the class list, fixing the category order), ``predicted_labels``
    and ``probabilities``; regressors give ``predicted_values``. ``kinds`` (numeric or categorical
    per column; all numeric when absent) picks each column's sketch; typed columns come as an
    object array. ``per_row`` (1 per feature when absent) is how many consecutive columns of a row
    each numeric feature's sketch takes (``TensorSignals.per_row``); rows are ``sum(per_row)`` wide.
    """
    rows = np.asarray(rows, dtype=object if kinds and set(kinds) - {"numeric"} else np.float64)
    features = _input_sketches(rows, feature_names, kinds, per_row, bins)
    outputs: dict[str, Sketch] = {}
    if labels is not None:
        outputs["prediction"] = CategoricalSketch.from_values(
            "prediction", predicted_labels if predicted_labels is not None else [], categories=labels
        )
        outputs["confidence"] = NumericSketch("confidence", np.asarray(CONFIDENCE_CUTS), 0.0, 1.0)
        if probabilities is not None:
            outputs["confidence"].update(np.max(np.asarray(probabilities), axis=1))
    elif predicted_values is not None:
        outputs["prediction"] = NumericSketch.from_values(
            "prediction", np.asarray(predicted_values, dtype=np.float64).ravel(), bins
        )
    profile = Profile(
        features=features,
        outputs=outputs,
        latency_ms=NumericSketch("latency_ms", np.asarray(LATENCY_CUTS_MS), 0.0, None),
    )
    profile.rows = rows.shape[0]
    return profile


def _input_sketches(
    rows: np.ndarray,
    names: Sequence[str],
    kinds: Sequence[str] | None,
    per_row: Sequence[int] | None,
    bins: int,
) -> list[Sketch]:
    kinds = kinds or ("numeric",) * len(names)
    per_row = list(per_row) if per_row is not None else [1] * len(names)
    if len(per_row) != len(names) or len(kinds) != len(names):
        raise ProfileError(f"{len(names)} feature names for {len(kinds)} kinds and {len(per_row)} per_row counts")
    if rows.ndim != 2 or rows.shape[1] != sum(per_row):
        raise ProfileError(
            f"baseline rows of shape {rows.shape} do not match {len(names)} features ({sum(per_row)} columns)"
        )
    if any(k != 1 and kind != "numeric" for k, kind in zip(per_row, kinds, strict=True)):
        raise ProfileError("only numeric features take more than one value per row")
    starts = np.cumsum([0, *per_row])[:-1]
    return [
        CategoricalSketch.unused(name, rows[:, i])
        if kind == "unused"
        else CategoricalSketch.from_values(name, rows[:, i])
        if kind == "categorical"
        else NumericSketch.from_values(name, rows[:, i : i + k].astype(np.float64).ravel(), bins, per_row=k)
        for i, k, name, kind in zip(starts, per_row, names, kinds, strict=True)
    ]


def _short(value: float) -> float | int:
    """Six significant digits, and no ".0" on whole numbers: summaries go over the air every window."""
    short = float(f"{value:.6g}")
    return int(short) if short.is_integer() and abs(short) < 2**53 else short


def _compact(sketch: Sketch) -> list[Any]:
    """``[counts, nulls, unseen]`` for categorical sketches; ``[counts, nulls, infs, sum, sum_sq, min, max]`` for
    numeric ones (the finite count is the sum of the bin counts, so it is not sent)."""
    if isinstance(sketch, CategoricalSketch):
        return sketch.compact()
    bounds = [_short(sketch.minimum), _short(sketch.maximum)] if sketch.count else [None, None]
    return [sketch.counts.tolist(), sketch.nulls, sketch.infs, _short(sketch.total), _short(sketch.total_sq), *bounds]


def _fill(sketch: Sketch, values: list[Any]) -> None:
    counts = np.asarray(values[0], dtype=np.int64)
    if counts.shape != sketch.counts.shape or (counts < 0).any():
        raise ProfileError(
            f"feature {sketch.name!r}: {len(counts)} counts where the baseline has {len(sketch.counts)} bins"
        )
    sketch.counts = counts
    if isinstance(sketch, CategoricalSketch):
        sketch.fill(values)
        return
    sketch.count, sketch.nulls, sketch.infs = int(counts.sum()), int(values[1]), int(values[2])
    sketch.total, sketch.total_sq = float(values[3]), float(values[4])
    sketch.minimum = math.inf if values[5] is None else float(values[5])
    sketch.maximum = -math.inf if values[6] is None else float(values[6])


def _sketch_from_dict(doc: dict[str, Any]) -> Sketch:
    kind = doc.get("kind")
    if kind == "numeric":
        return NumericSketch.from_dict(doc)
    if kind == "categorical":
        return CategoricalSketch.from_dict(doc)
    raise ProfileError(f"unknown sketch kind {kind!r}")


def _check_same_definition(mine: Sketch, theirs: Sketch) -> None:
    if mine.definition() != theirs.definition():
        raise ProfileError(f"feature {mine.name!r}: cannot merge sketches with different bins or categories")
