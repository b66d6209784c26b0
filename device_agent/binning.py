"""Where a numeric baseline's bin edges go: quantiles, and a bin of its own for a value that matters.

Quantile cuts alone fail columns with few distinct values or a large point mass (counts, flags,
zero-inflated sensors): tied quantiles collapse into one cut or none, and a pixel that is 0 in 94 %
of the rows gets the bins ``< 0 | [0, 16] | > 16``, where a shift inside the range cannot be seen.
So a value gets a bin of its own, ``[v - tol, v + tol)``, when

- the column has at most ``bins`` distinct finite values (then every value does), or
- it holds more than ``1 / bins`` of the finite rows (a point mass); the rest of the rows then get
  quantile bins in proportion to their share (at least 2), so every bin still holds about
  ``1 / bins`` of the rows, as quantile bins do, and the sketch does not grow past what the tests can
  resolve in a window: a pixel that is 0 in 94 % of the rows gets its zeros' bin and two more.

Between two such bins lies a gap bin that the baseline leaves empty: values moved off their grid
(a count that turns fractional, a zero that becomes 0.01) land there and are seen. ``tol`` is
``RELATIVE_TOLERANCE`` of the value, so a value that went through float32 (the agent's rows) or
six significant digits (a CSV) still lands in its own bin, and at most a quarter of the gap to the
neighbouring value, so no two values share a bin. Columns with neither keep the plain quantile
cuts, exactly as before (their baselines, and ``baseline_id``, do not change).

Why ``bins`` distinct values and not more: below it a sketch has at most ``2 * bins + 1`` slots (a
value bin and a gap bin per value), and the agent's update makes one pass per cut of the widest
sketch, so the summary and the update stay within about twice those of quantile bins (measured on
the digits: 9.5 slots per feature instead of 7.5, a 64-feature batch of 1,000 rows sketched in 1.4
times the time). Above it, heavy values still get their bins and quantiles resolve the rest. A
limit of ``2 * bins`` (a bin per value for every 17-valued digits pixel) detected the same shifts
(0.25 to 1σ, 100- and 500-row windows) with 29 slots per feature and 2.0 times the update time.

Then finding each value's slot fast (``BinLookup``), and updating every numeric sketch of a profile in
one sweep (``NumericBlock``, which ``profile.Profile`` drives).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

RELATIVE_TOLERANCE = 1e-5
_FAST_ADD_AT = tuple(int(part) for part in np.__version__.split(".")[:2]) >= (1, 25)


def numeric_bins(finite: np.ndarray, bins: int) -> tuple[np.ndarray, float, float]:
    """``(cuts, low, high)`` for a baseline column of finite values (at least one)."""
    values, counts = np.unique(finite, return_counts=True)
    few = len(values) <= bins
    masses = values if few else values[counts * bins > finite.size]
    if len(masses) == 0:
        return _quantile_cuts(finite, bins), float(values[0]), float(values[-1])
    tolerance = _tolerances(masses, values)
    lower, upper = masses - tolerance, masses + tolerance
    cuts = np.concatenate([lower, upper])
    if not few:
        rest = finite[~np.isin(finite, masses)]  # not empty: at most bins - 1 values hold over 1 / bins
        quantiles = _quantile_cuts(rest, max(2, math.ceil(bins * rest.size / finite.size)))
        in_a_mass = (quantiles[:, None] >= lower) & (quantiles[:, None] < upper)
        cuts = np.concatenate([cuts, quantiles[~in_a_mass.any(axis=1)]])
    low, high = min(float(values[0]), float(lower[0])), max(float(values[-1]), float(upper[-1]))
    cuts = np.unique(cuts)
    return cuts[(cuts > low) & (cuts < high)], low, high


def _quantile_cuts(finite: np.ndarray, bins: int) -> np.ndarray:
    quantiles = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    return quantiles[(quantiles > finite.min()) & (quantiles <= finite.max())]


def _tolerances(masses: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Half-width of each mass's bin: relative to the value (to the smallest non-zero one for 0), and at
    most a quarter of the distance to the nearest other distinct value."""
    nonzero = np.abs(values[values != 0])
    scale = np.where(masses != 0, np.abs(masses), nonzero.min() if nonzero.size else 1.0)
    position = np.searchsorted(values, masses)
    below = np.where(position > 0, masses - values[np.maximum(position - 1, 0)], np.inf)
    above = np.where(position < len(values) - 1, values[np.minimum(position + 1, len(values) - 1)] - masses, np.inf)
    return np.minimum(RELATIVE_TOLERANCE * scale, np.minimum(below, above) / 4)


# -- finding a value's bin fast -----------------------------------------------------------------------
LOOKUP_CELLS = 64  # grid cells per sketch to start with: 64 features of 512 took 512 KB, out of cache between requests
CELL_THRESHOLDS = 2  # the grid is refined while a cell holds more than this many thresholds ...
MOST_TABLE_BYTES = 4 << 20  # ... and the tables stay within this


def f32_at_or_above(values: np.ndarray) -> np.ndarray:
    """The least float32 >= each float64 value (infinities stay)."""
    rounded = np.asarray(values, dtype=np.float64).astype(np.float32)
    return np.where(rounded.astype(np.float64) < values, np.nextafter(rounded, np.float32(np.inf)), rounded)


def f32_at_or_below(values: np.ndarray) -> np.ndarray:
    """The greatest float32 <= each float64 value (infinities stay)."""
    rounded = np.asarray(values, dtype=np.float64).astype(np.float32)
    return np.where(rounded.astype(np.float64) > values, np.nextafter(rounded, np.float32(-np.inf)), rounded)


def slot_thresholds(cuts: np.ndarray, low: float | None, high: float | None, dtype: np.dtype) -> np.ndarray:
    """A numeric sketch's slots as thresholds in ``dtype``: a finite value's slot is the number of them it
    reaches (``v >= t``), counting from the underflow slot at 0.

    The bins are ``< low | [low, c1) | ... | [c_k, high] | > high``: ``low`` and each cut are reached at
    ``v >= t``, and the overflow at ``v > high``, which for a value of ``dtype`` is ``v >= next(high)``. For
    float32 values each float64 edge becomes the float32 that gives the very same answers (the least float32
    >= a cut; ``v > high`` is ``v > (the greatest float32 <= high)``), so float32 rows are binned exactly as
    their float64 values would be."""
    low = -np.inf if low is None else float(low)
    high = np.inf if high is None else float(high)
    edges = np.concatenate([[low], np.asarray(cuts, dtype=np.float64)])
    if dtype == np.float32:
        reach, top = f32_at_or_above(edges), f32_at_or_below(np.float64(high))
        return np.append(reach, np.nextafter(top, np.float32(np.inf))).astype(np.float32)
    return np.append(edges, np.nextafter(high, np.inf)).astype(np.float64)


class BinLookup:
    """Every column's slot in one sweep of a few numpy calls: a lookup table over a uniform grid.

    Each sketch's thresholds (``slot_thresholds``) span a grid of ``cells`` cells. A value's cell is
    ``clip((v - origin) * scale, 0, cells - 1)`` truncated to an integer, computed in the rows' dtype; a
    threshold's cell is computed by the very same arithmetic, and since rounding is monotone, a threshold in
    an earlier cell than the value's is below it and one in a later cell above it. So the table holds, per
    cell, the slot a value reaches through the thresholds of earlier cells, and the (at most
    ``CELL_THRESHOLDS`` here, rarely more) thresholds inside the cell itself, each compared exactly. The
    answer is exactly the count of thresholds reached, whatever the grid: the grid only decides how many
    comparisons a value needs. A point mass's two cuts ``v - tol`` and ``v + tol`` share a cell, which is
    why a cell compares two.
    """

    def __init__(self, sketches: list[tuple[np.ndarray, int]], columns: np.ndarray, dtype: Any) -> None:
        """``sketches``: each sketch's thresholds (``slot_thresholds``) and its first slot in the one count
        vector; ``columns``: which sketch each column of the rows is (a ``per_row`` sketch takes several)."""
        self.dtype = np.dtype(dtype)
        cells = LOOKUP_CELLS
        while True:
            tables = [self._tables(t, base, cells) for t, base in sketches]
            width = max((len(inside) for _, _, _, inside in tables), default=0)
            if width <= CELL_THRESHOLDS or 2 * cells * len(tables) * (8 + 4 * width) > MOST_TABLE_BYTES:
                break
            cells *= 2
        self.cells, self.width = cells, width
        self.origin = np.asarray([t[0] for t in tables], dtype=self.dtype)[columns]
        self.scale = np.asarray([t[1] for t in tables], dtype=self.dtype)[columns]
        self.base = np.concatenate([t[2] for t in tables]) if tables else np.empty(0, dtype=np.intp)
        self.inside = np.full((width, len(tables) * cells), np.inf, dtype=self.dtype)
        for j, (_, _, _, inside) in enumerate(tables):
            for k, row in enumerate(inside):
                self.inside[k, j * cells : (j + 1) * cells] = row
        self.first_cell = np.asarray(columns, dtype=np.intp) * cells
        self._lock = threading.Lock()  # the working arrays are one per table (profiles of a baseline share it)
        self._buffers: tuple[np.ndarray, ...] | None = None
        self._shaped: tuple[np.ndarray, ...] | None = None
        self._ones_cache = np.ones(0)

    def _tables(self, thresholds: np.ndarray, first_slot: int, cells: int) -> tuple[Any, Any, np.ndarray, list]:
        t = np.sort(np.asarray(thresholds, dtype=self.dtype))
        always = int(np.isneginf(t).sum())  # reached by every finite value (an unbounded low)
        t = t[np.isfinite(t)]  # +inf is never reached by a finite value
        origin, scale = self._grid(t, cells)
        cell = self.cell_of(t, origin, scale, cells)
        before = np.searchsorted(cell, np.arange(cells), side="left")  # thresholds in earlier cells
        base = (first_slot + always + before).astype(np.intp)
        counts = np.bincount(cell, minlength=cells)
        inside = [np.full(cells, np.inf, dtype=self.dtype) for _ in range(int(counts.max(initial=0)))]
        for k, row in enumerate(inside):
            has = counts > k
            row[has] = t[before[has] + k]
        return origin, scale, base, inside

    def _grid(self, t: np.ndarray, cells: int) -> tuple[Any, Any]:
        """Origin and scale spreading the cuts over the cells (the bounds, often far out, share the end
        cells); any finite positive scale is correct, the grid only decides the comparisons a cell needs."""
        t = t[1:-1] if len(t) >= 4 else t
        if len(t) < 2:
            return self.dtype.type(t[0] if len(t) else 0), self.dtype.type(1)
        span = float(t[-1]) - float(t[0])
        wanted = (cells - 1) / span if span > 0 else 1.0
        finfo = np.finfo(self.dtype)
        # a span too narrow (or too wide) for the dtype: any other finite positive scale is as correct
        scale = wanted if float(finfo.tiny) < wanted < float(finfo.max) else 1.0
        return self.dtype.type(t[0]), self.dtype.type(scale)

    def cell_of(self, values: np.ndarray, origin: Any, scale: Any, cells: int) -> np.ndarray:
        """Each threshold's cell, by the very arithmetic ``_slots`` uses for the values (the conversion to an
        integer truncates, which for a clipped, non-negative cell is its floor)."""
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.subtract(values, origin, dtype=self.dtype)
            np.multiply(x, scale, out=x)
        np.clip(x, 0, cells - 1, out=x)
        return x.astype(np.intp)

    def count(self, values: np.ndarray, counts: np.ndarray, finite: np.ndarray | None = None) -> np.ndarray:
        """Add each value's slot into ``counts`` (only where ``finite``, when given; the other values must be
        finite placeholders) and return the columns' sums and sums of squares (2 x columns, float64, over
        every value given). One lock for the whole: the working arrays are the table's."""
        with self._lock:
            scratch = self._scratch(values.shape)
            index = self._slots(values, scratch)
            index = index.reshape(-1) if finite is None else index[finite]
            if _FAST_ADD_AT:  # a little faster than adding a ``bincount``, and no temporary
                np.add.at(counts, index, 1)
            else:  # numpy before 1.25 (Raspberry Pi OS bookworm's is 1.24): ``add.at`` was 50-100x slower
                counts += np.bincount(index, minlength=len(counts))
            # the cell indexes' memory, free now (where an index is 8 bytes: not on a 32-bit build)
            wide = scratch[1].view(np.float64) if scratch[1].itemsize == 8 else np.empty(values.shape)
            np.copyto(wide, values)  # float64 whatever the rows: a window's sums add up many batches
            ones = self._ones(len(values))
            totals = ones @ wide
            np.multiply(wide, wide, out=wide)
            return np.stack([totals, ones @ wide])

    def _ones(self, n: int) -> np.ndarray:
        if len(self._ones_cache) < n:
            self._ones_cache = np.ones(n)
        return self._ones_cache[:n]

    def _slots(self, values: np.ndarray, scratch: tuple[np.ndarray, ...]) -> np.ndarray:
        """Each finite value's slot in the one count vector (intp, the shape of ``values``: rows x columns of
        ``dtype``), in the last of ``scratch`` (``_scratch``; the caller holds the lock). Working arrays are
        reused between calls: fresh ones of a batch's size would cost a page fault every few kilobytes, more
        than the arithmetic. A dozen passes over the batch, each a plain numpy loop: the cell (subtract,
        multiply, clip, as an integer, plus the column's first cell), the table (the slot below the cell,
        then each threshold inside it read and compared, the comparisons added up), the sum."""
        x, flat, reached, hits, out = scratch
        threshold = x  # the cells are read once, into ``flat``
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(values, self.origin, out=x)
            np.multiply(x, self.scale, out=x)
        np.clip(x, 0, self.cells - 1, out=x)
        np.copyto(flat, x, casting="unsafe")  # truncated: the floor of a non-negative cell
        np.add(flat, self.first_cell, out=flat)  # the column's first cell, added as an integer: exact
        np.take(self.base, flat, out=out, mode="clip")  # "clip": no buffered copy (indices are in range)
        for k in range(self.width):  # the thresholds inside each value's cell, compared exactly
            np.take(self.inside[k], flat, out=threshold, mode="clip")
            np.greater_equal(values, threshold, out=hits if k == 0 else reached)
            if k:
                hits += reached
        if self.width:
            np.add(out, hits, out=out, casting="unsafe")
        return out

    def _scratch(self, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """The working arrays for a batch of ``shape``: (cells, then each cell's threshold), (cell indexes,
        then the values widened: both 8 bytes a value), two comparison results and the slots. Arrays whose
        uses do not overlap share memory: 22 bytes a value, where the next batch finds them in the caches."""
        if self._shaped is not None and self._shaped[0].shape == shape:
            return self._shaped
        size = shape[0] * shape[1]
        if self._buffers is None or len(self._buffers[0]) < size:
            flags = np.uint8 if self.width < 255 else np.uint16
            self._buffers = (
                np.empty(size, self.dtype),
                np.empty(size, np.intp),
                np.empty(size, flags),
                np.empty(size, flags),
                np.empty(size, np.intp),
            )
        self._shaped = tuple(b[:size].reshape(shape) for b in self._buffers)  # the last shape's views, kept
        return self._shaped


# -- every numeric sketch of a profile at once ------------------------------------------------------------
HOLD_ROWS = 128  # updates of fewer rows are held until this many wait, then binned together (``_hold``)
BLOCK_VALUES = 1 << 16  # values binned in one sweep (a 1000-row, 64-feature batch): 1.4 MB of working arrays


FOLD_ROWS = 8  # rows folded into one for the per-column extremes (``_extremes``)


def _extremes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's minimum and maximum (NaN if it holds one). numpy reduces a C-ordered batch over its rows
    one row at a time, a call of its inner loop per row (64 values for the digits); folding ``FOLD_ROWS``
    rows into one row first makes the calls that many times fewer and longer (3x faster at 1,000 rows)."""
    n, width = values.shape
    whole = n - n % FOLD_ROWS
    if whole < 4 * FOLD_ROWS or not values.flags.c_contiguous:
        return values.min(axis=0), values.max(axis=0)
    folded = values[:whole].reshape(whole // FOLD_ROWS, FOLD_ROWS * width)
    minima = folded.min(axis=0).reshape(FOLD_ROWS, width).min(axis=0)
    maxima = folded.max(axis=0).reshape(FOLD_ROWS, width).max(axis=0)
    if whole < n:
        np.minimum(minima, values[whole:].min(axis=0), out=minima)
        np.maximum(maxima, values[whole:].max(axis=0), out=maxima)
    return minima, maxima


class NumericBlock:
    """Updates every numeric sketch of a profile at once, with a handful of 2-D numpy calls.

    Per feature, a dozen small numpy calls cost more than the model's own inference on a batch; here
    each value's slot comes from one lookup table over all features (``BinLookup``: a grid
    cell, a table read and two exact comparisons, a few nanoseconds a value), one ``add.at`` fills
    every feature's counts, and float32 rows (what models take) stay float32 throughout, compared
    against the float32 thresholds that give the very same bins as the float64 edges.

    A sketch with ``per_row`` K is K consecutive columns with its cuts and its slots, so the one
    count adds all K columns' values into its counts; the per-column moments, finite counts and
    bounds are then added up (or min/maxed) over each sketch's columns (``groups``, None when every
    sketch has one column: the tabular path pays nothing for it).
    """

    def __init__(self, columns: list[tuple[int, Any]], tables: dict[np.dtype, BinLookup]) -> None:
        """``columns``: each numeric sketch with the first column it reads; ``tables``: the lookup tables
        of these bins by dtype, shared with every profile of the same definition."""
        self.sketches = [s for _, s in columns]
        repeats = np.asarray([s.per_row for s in self.sketches], dtype=np.intp)
        self.columns = np.asarray([i + k for i, s in columns for k in range(s.per_row)], dtype=np.intp)
        self.slots = np.asarray([len(s.counts) for s in self.sketches], dtype=np.intp)
        self.offsets = np.concatenate([[0], np.cumsum(self.slots)[:-1]]).astype(np.intp)
        self.sketch_of_column = np.repeat(np.arange(len(self.sketches), dtype=np.intp), repeats)
        grouped = bool((repeats != 1).any())
        self.groups = np.concatenate([[0], np.cumsum(repeats)[:-1]]).astype(np.intp) if grouped else None
        self.all_columns = np.array_equal(self.columns, np.arange(len(self.columns)))
        self._lookups = tables
        self._views: list[np.ndarray] | None = None  # each sketch's counts, as views of ``self.counts``
        self._held: np.ndarray | None = None  # small updates' rows, binned together (``_hold``)
        self._held_rows = 0
        self._reset_pending()

    def lookup(self, dtype: np.dtype) -> BinLookup:
        """The table for rows of ``dtype`` (float32 or float64), built on first use (a few milliseconds)."""
        table = self._lookups.get(dtype)
        if table is None:
            thresholds = [
                (slot_thresholds(s.cuts, s.low, s.high, dtype), int(o))
                for s, o in zip(self.sketches, self.offsets, strict=True)
            ]
            table = self._lookups[dtype] = BinLookup(thresholds, self.sketch_of_column, dtype)
        return table

    def update(self, rows: np.ndarray, *, columns_taken: bool = False) -> None:
        """Bin and sum ``rows`` into the block's pending totals; ``settle`` hands them to the sketches."""
        if not self.sketches:
            return
        step = max(256, BLOCK_VALUES // len(self.columns))
        if len(rows) > step:  # the working arrays stay the size of a slice, whatever the batch (a baseline's)
            for start in range(0, len(rows), step):
                self.update(rows[start : start + step], columns_taken=columns_taken)
            return
        take = not (columns_taken or (self.all_columns and rows.dtype in (np.float32, np.float64)))
        values = rows[:, self.columns] if take else rows
        if values.dtype != np.float32:
            values = values.astype(np.float64, copy=False)
        if len(values) < HOLD_ROWS:
            self._hold(values)
        else:
            self._update(values)

    def _hold(self, values: np.ndarray) -> None:
        """Keep a few rows for later: binning costs some thirty numpy calls whatever the rows, 150 µs when
        the model's inference has just emptied the caches, which a sampled pass of ten rows would pay
        every time. Held rows are binned when ``HOLD_ROWS`` wait (or the dtype changes) and at ``settle``."""
        held, kept = self._held, self._held_rows
        if held is None or held.dtype != values.dtype or kept + len(values) > len(held):
            self._flush_held()
            if held is None or held.dtype != values.dtype:
                held = self._held = np.empty((HOLD_ROWS, len(self.columns)), values.dtype)
            kept = 0
        held[kept : kept + len(values)] = values
        self._held_rows = kept + len(values)
        self.pending = True

    def _flush_held(self) -> None:
        if self._held_rows:
            rows, self._held_rows = self._held[: self._held_rows], 0
            self._update(rows)

    def _update(self, values: np.ndarray) -> None:
        minima, maxima = _extremes(values)
        # NaN propagates through min and max, and an infinity is an extreme: finite extremes, finite values
        if math.isfinite(float(minima.sum(dtype=np.float64)) + float(maxima.sum(dtype=np.float64))):
            clean, finite, finite_count = values, None, len(values)  # the usual batch: no masks, no copies
        else:
            finite = np.isfinite(values)
            nan = np.isnan(values)
            clean = np.where(finite, values, values.dtype.type(0))
            finite_count = finite.sum(axis=0)
            minima = np.where(finite, values, np.inf).min(axis=0)
            maxima = np.where(finite, values, -np.inf).max(axis=0)
            self._add_columns(self._ints[1:], np.stack([nan.sum(axis=0), (~finite & ~nan).sum(axis=0)]))
        self._add_columns(self._sums, self.lookup(values.dtype).count(clean, self._counts, finite))
        if finite is None and self.groups is None:
            self._ints[0] += finite_count
        else:
            self._add_columns(self._ints[:1], np.broadcast_to(finite_count, (1, len(self.columns))))
        if self.groups is not None:  # a sketch's K columns into one: bounds are the extremes
            minima, maxima = np.minimum.reduceat(minima, self.groups), np.maximum.reduceat(maxima, self.groups)
        np.minimum(self._low, minima, out=self._low)
        np.maximum(self._high, maxima, out=self._high)
        self.pending = True

    def _add_columns(self, into: np.ndarray, per_column: np.ndarray) -> None:
        """Add per-column totals into per-sketch ones (a sketch's K columns add up)."""
        into += per_column if self.groups is None else np.add.reduceat(per_column, self.groups, axis=1)

    def _reset_pending(self) -> None:
        n = len(self.sketches)
        self._counts = np.zeros(int(self.slots.sum()), dtype=np.int64)
        self._ints = np.zeros((3, n), dtype=np.int64)  # finite count, nulls, infs
        self._sums = np.zeros((2, n))  # sum, sum of squares
        self._low, self._high = np.full(n, np.inf), np.full(n, -np.inf)
        self.pending = False

    def settle(self) -> None:
        """The pending totals into the sketches, in one pass over them: per batch this Python loop cost more
        than the binning of a small batch, so a monitor settles once per window, not once per request."""
        if not self.pending:
            return
        self._flush_held()
        self._add_counts(self._counts)
        columns = (*self._ints, *self._sums, self._low, self._high)
        moments = zip(self.sketches, *(a.tolist() for a in columns), strict=True)
        for sketch, count, null, inf, total, square, low, high in moments:
            sketch.count += count
            sketch.nulls += null
            sketch.infs += inf
            sketch.total += total
            sketch.total_sq += square
            sketch.minimum = min(sketch.minimum, low)
            sketch.maximum = max(sketch.maximum, high)
        self._reset_pending()

    def _add_counts(self, counts: np.ndarray) -> None:
        """Add the one count vector into every sketch with one numpy call: each sketch's counts are a view
        of ``self.counts`` (re-made whenever a sketch's counts were replaced since, e.g. by ``_fill``)."""
        views = self._views
        if views is None or any(s.counts is not v for s, v in zip(self.sketches, views, strict=True)):
            self.counts = np.concatenate([s.counts for s in self.sketches]).astype(np.int64)
            views = self._views = [
                self.counts[o : o + n] for o, n in zip(self.offsets.tolist(), self.slots.tolist(), strict=True)
            ]
            for sketch, view in zip(self.sketches, views, strict=True):
                sketch.counts = view
        self.counts += counts
