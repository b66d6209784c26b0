"""The sketch of a categorical column (and of a classifier's predicted class): counts per category.

A baseline keeps its ``top`` most frequent categories as bins plus one "other" slot, and counts
missing values apart. Drift is the same chi-square test as for numeric bins (``drift.py``): a
shift that moves 10 % of rows from one category to another changes two bins' counts.

``unseen`` counts values the baseline never saw at all, which is what a data-quality alert wants
(not counted for a column the model drops, nor past ``MAX_KNOWN`` distinct values, where it cannot be told):
a new country code in production is news even when "other" already held rare known ones. The
baseline remembers every value it saw (``known``, at most ``MAX_KNOWN``) only when there are more
of them than bins; otherwise the bins are the whole vocabulary and "other" is exactly unseen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ProfileError

DEFAULT_TOP = 20
MAX_KNOWN = 5_000  # past this the vocabulary is not kept, and unseen values are not told from rare ones


@dataclass
class CategoricalSketch:
    """Counts of the baseline's categories plus a final "other" slot, missing and unseen values."""

    name: str
    categories: list[Any]
    counts: np.ndarray = None  # type: ignore[assignment]
    nulls: int = 0
    known: list[Any] | None = None  # the whole baseline vocabulary, when it is larger than ``categories``
    unseen: int = 0
    tracks_unseen: bool = True  # False for a column the model drops (an id): every value is new, and no news
    _index: dict[Any, int] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _known: frozenset[Any] | None = field(default=None, repr=False, compare=False)

    kind = "categorical"

    def __post_init__(self) -> None:
        self.categories = list(self.categories)
        if self.counts is None:
            self.counts = np.zeros(len(self.categories) + 1, dtype=np.int64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.shape != (len(self.categories) + 1,):
            raise ProfileError(
                f"feature {self.name!r}: {len(self.counts)} counts for {len(self.categories)} categories (expected + 1)"
            )
        self._index = {_category_key(c): i for i, c in enumerate(self.categories)}
        self._known = frozenset(_category_key(c) for c in self.known) if self.known is not None else None

    @classmethod
    def from_values(
        cls, name: str, values: Sequence[Any], top: int = DEFAULT_TOP, categories: Sequence[Any] | None = None
    ) -> CategoricalSketch:
        """A baseline sketch over the ``top`` most frequent values (or the given ``categories``)."""
        known = None
        if categories is None:
            present = [v for v in np.asarray(values, dtype=object).ravel().tolist() if not _is_missing(v)]
            unique, freq = np.unique(
                np.asarray([_category_key(v) for v in present], dtype=object).astype(str), return_counts=True
            )
            order = np.argsort(-freq, kind="stable")
            by_key = {str(_category_key(v)): _json_scalar(v) for v in present}
            categories = [by_key[unique[i]] for i in order[:top]]
            if top < len(order) <= MAX_KNOWN:
                known = sorted((by_key[u] for u in unique), key=str)
            elif len(order) > MAX_KNOWN:  # too many to remember: "unseen" cannot be told, so it is not counted
                return cls.unused(name, values, categories=[_json_scalar(c) for c in categories])
        sketch = cls(name, [_json_scalar(c) for c in categories], known=known)
        sketch.update(values)
        return sketch

    @classmethod
    def unused(cls, name: str, values: Sequence[Any], categories: Sequence[Any] = ()) -> CategoricalSketch:
        """A sketch that counts no unseen values: a column the model drops (no categories: nothing to
        drift), or one with more distinct values than ``MAX_KNOWN`` (its top categories still drift)."""
        sketch = cls(name, list(categories), tracks_unseen=False)
        sketch.update(values)
        return sketch

    def empty_like(self) -> CategoricalSketch:
        return CategoricalSketch(self.name, self.categories, known=self.known, tracks_unseen=self.tracks_unseen)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def update(self, values: Iterable[Any]) -> None:
        array = np.asarray(values)
        if array.dtype.kind in "iu" and self.categories and all(isinstance(c, int) for c in self.categories):
            self._update_integers(array.ravel())
            return
        other = len(self.categories)
        for value in array.ravel().tolist():
            if _is_missing(value):
                self.nulls += 1
                continue
            key = _category_key(value)
            slot = self._index.get(key, other)
            self.counts[slot] += 1
            if slot == other and self.tracks_unseen and (self._known is None or key not in self._known):
                self.unseen += 1

    def _update_integers(self, values: np.ndarray) -> None:
        # The hot path for predicted classes: a vectorised lookup instead of a dict per value.
        categories = np.asarray(self.categories, dtype=np.int64)
        order = np.argsort(categories)
        position = np.searchsorted(categories[order], values)
        position = np.clip(position, 0, len(categories) - 1)
        known = categories[order][position] == values
        slots = np.where(known, order[position], len(categories))
        self.counts += np.bincount(slots, minlength=len(self.counts))
        others = values[~known]
        if self.tracks_unseen:
            self.unseen += sum(1 for v in others.tolist() if self._known is None or v not in self._known)

    def definition(self) -> dict[str, Any]:
        doc = {"name": self.name, "kind": self.kind, "categories": self.categories}
        if self.known is not None:  # absent for a vocabulary the bins hold whole: older definitions read the same
            doc["known"] = self.known
        if not self.tracks_unseen:
            doc["unused"] = True
        return doc

    def merge(self, other: CategoricalSketch) -> None:
        if self.definition() != other.definition():
            raise ProfileError(f"feature {self.name!r}: cannot merge sketches with different bins or categories")
        self.counts += other.counts
        self.nulls += other.nulls
        self.unseen += other.unseen

    def to_dict(self) -> dict[str, Any]:
        doc = self.definition()
        doc.update(counts=self.counts.tolist(), nulls=self.nulls, unseen=self.unseen)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CategoricalSketch:
        return cls(
            name=doc["name"],
            categories=doc["categories"],
            counts=np.asarray(doc["counts"], dtype=np.int64),
            nulls=int(doc.get("nulls", 0)),
            known=doc.get("known"),
            unseen=int(doc.get("unseen", 0)),
            tracks_unseen=not doc.get("unused", False),
        )

    def compact(self) -> list[Any]:
        """``[counts, nulls, unseen]``: what a window sends (version-1 windows sent no ``unseen``)."""
        return [self.counts.tolist(), self.nulls, self.unseen]

    def fill(self, values: list[Any]) -> None:
        self.nulls = int(values[1])
        # a version-1 window: "other" was all it knew, and unseen is what "other" holds when the bins are the vocabulary
        self.unseen = int(values[2]) if len(values) > 2 else (int(self.counts[-1]) if self.known is None else 0)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _json_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _category_key(value: Any) -> Any:
    value = _json_scalar(value)
    # 3 and 3.0 are the same class; keep bools and strings apart from numbers.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
