"""Bounded history: raw windows kept for a while, then rolled into hourly and daily merged buckets.

Windows of one baseline merge exactly (their compact profiles add: counts, nulls, sums, extremes), so
a bucket of a device's windows of one model version and baseline within an hour or a day answers
merged drift over any range it covers exactly as its windows would. ``RetentionPolicy`` says how long
each resolution is kept (``--raw 7d --hourly 90d --daily forever``); ``Retention(store).tick(now)``
is what the collector's leader calls periodically; ``run_pass`` is one pass of ``edgekit fleet
retention``.

What a bucket keeps: windows, rows, tested and drifted windows, labelled and correct rows, errors by
kind, the merged profile (every input's bins, nulls, unseen categories and moments; the outputs'
classes and confidence; the latency histogram), the worst window's p99 and the largest latency.
What it does not: per-window drift scores and verdicts (a merged range is judged again from its
merged profile), the per-window p50/p99 (quantiles do not add; the latency histogram does), the
alert facts and the raw payload. Alerts, the device page and ``labelled_accuracy`` read raw windows
only, so each device's newest ``KEEP_RECENT_WINDOWS`` windows stay raw whatever their age.

Each step moves rows in bounded batches, one transaction each (the rows a bucket replaces are deleted
in the transaction that writes it), so ingest waits at most one small batch, a crash loses nothing
and counts nothing twice, and a second run changes nothing. A raw window is merged outside the
transaction; the transaction only checks that its rows are still there, deletes them and adds the
batch's buckets in.

A window arriving after its device's later windows were rolled up (a gap the collector asked for, a row a
pass left raw) is merged by the next pass, once: each rollup records the seqs it passed without counting
(``history_holes``). One at or under its device's marks and in no hole is a redelivery of a counted window,
dropped. Devices resend from a spool kept about an hour, which is why raw retention is at least
``MIN_RAW_SECONDS``; and why a hole is forgotten a raw period after it was noted (its windows are then two
raw periods old): without that, a device that lost a window now and then kept a row per loss for ever.
Imports: edgekit.errors, device_agent (profiles), the store package (for typing only).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from device_agent.errors import ProfileError
from device_agent.profile import NumericSketch, Profile
from device_agent.protocol import iso
from edgekit.errors import EdgekitError

log = logging.getLogger("edgekit.fleet")

MIN_RAW_SECONDS = 3600.0  # devices resend a missing window from a spool kept an hour (agent.toml keep_acked_seconds)
KEEP_RECENT_WINDOWS = 50  # per device, always raw: alert rules read the last few, accuracy the last 50 labelled
BATCH = 500  # windows (or buckets) a transaction moves
TICK_SECONDS = 300.0  # the leader's pass, at most this often (a pass cut short by max_batches resumes at once)
DUTY_SECONDS = 30.0  # how often the leader calls ``tick`` (service.leader_duties): a pass cut short resumes this soon
DEFAULTS = {"raw": "7d", "hourly": "90d", "daily": "forever"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class HistoryStore(Protocol):
    """What retention needs of the store (``store/history_records.py``)."""

    def retention_policy(self) -> dict[str, Any] | None: ...

    def baseline(self, baseline_id: str) -> dict[str, Any] | None: ...

    def raw_windows_before(self, cutoff: str, limit: int, *, keep_recent: int = ...) -> list[dict[str, Any]]: ...

    def replace_raw(
        self,
        marks: list[int],
        buckets: Any,
        rolled: dict[str, tuple[int, str]],
        merge: Any,
        now: float,
        merged: dict[str, list[int]] | None = None,
    ) -> bool: ...

    def roll_history(
        self, source: str, target: str, before: str, bucket_of: Any, merge: Any, *, limit: int, now: float
    ) -> int: ...

    def expire_history(self, resolution: str, before: str, *, limit: int) -> int: ...

    def forget_holes(self, noted_before: float, now: float) -> int: ...


def parse_duration(text: str | float | None, name: str) -> float | None:
    """``7d``, ``36h``, ``2w`` as seconds; ``forever`` as None. One clear line for anything else."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "forever"):
        return None
    match = _DURATION.match(str(text).strip().lower())
    if match is None or float(match[1]) <= 0:
        raise EdgekitError(
            f"{name} {text!r} is not a retention period", "write a number and s, m, h, d or w (e.g. 7d), or forever"
        )
    return float(match[1]) * _SECONDS[match[2]]


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each resolution is kept, in seconds (None: forever). Raw windows older than ``raw`` roll
    into hourly buckets, hourly buckets older than ``hourly`` into daily ones, daily buckets older than
    ``daily`` are deleted."""

    raw: float | None = 7 * 86400.0
    hourly: float | None = 90 * 86400.0
    daily: float | None = None

    def __post_init__(self) -> None:
        if self.raw is not None and self.raw < MIN_RAW_SECONDS:
            raise EdgekitError(
                f"--raw {_shown(self.raw)} is too short",
                "keep raw windows at least 1h: devices resend a missing window for about an hour",
            )
        forever = float("inf")
        spans = [forever if s is None else s for s in (self.raw, self.hourly, self.daily)]
        if not spans[0] <= spans[1] <= spans[2]:
            raise EdgekitError(
                f"retention raw {_shown(self.raw)}, hourly {_shown(self.hourly)}, daily {_shown(self.daily)} "
                "is out of order",
                "each resolution is kept at least as long as the finer one: --raw <= --hourly <= --daily",
            )

    @classmethod
    def parse(
        cls, raw: str | None = None, hourly: str | None = None, daily: str | None = None, *, prefix: str = "--"
    ) -> RetentionPolicy:
        """From the CLI's texts; a missing one takes its default (7d, 90d, forever)."""
        given = {"raw": raw, "hourly": hourly, "daily": daily}
        texts = {name: DEFAULTS[name] if text is None else text for name, text in given.items()}
        return cls(**{name: parse_duration(text, prefix + name) for name, text in texts.items()})

    @classmethod
    def from_text(cls, text: str) -> RetentionPolicy:
        """``raw=7d,hourly=90d,daily=forever`` (the collector's setting); a missing part takes its default."""
        parts: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in DEFAULTS:
                raise EdgekitError(
                    f"retention {item!r} is not raw=, hourly= or daily=", "e.g. raw=7d,hourly=90d,daily=forever"
                )
            parts[name.strip()] = value.strip()
        return cls.parse(**parts, prefix="retention ")

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RetentionPolicy:
        return cls(**{name: doc.get(name) for name in DEFAULTS})

    def to_dict(self) -> dict[str, Any]:
        return {"raw": self.raw, "hourly": self.hourly, "daily": self.daily}

    def describe(self) -> str:
        return f"raw {_shown(self.raw)}, hourly {_shown(self.hourly)}, daily {_shown(self.daily)}"


def _shown(seconds: float | None) -> str:
    if seconds is None:
        return "forever"
    for unit in ("w", "d", "h", "m"):
        if seconds >= _SECONDS[unit] and seconds % _SECONDS[unit] == 0:
            return f"{seconds / _SECONDS[unit]:g}{unit}"
    return f"{seconds:g}s"


@dataclass
class RetentionPass:
    """What one pass did."""

    rolled: int = 0  # raw windows merged into hourly buckets
    redeliveries: int = 0  # raw windows dropped: already counted in a bucket
    unmergeable: int = 0  # raw windows whose profile did not fit their baseline: counted, profile left out
    hourly_rolled: int = 0  # hourly buckets merged into daily ones
    expired: int = 0  # daily buckets deleted
    holes_forgotten: int = 0  # missing windows no device resends any more (history_records.forget_holes)
    batches: int = 0
    done: bool = True  # False: cut short by max_batches, more to do
    seconds: float = 0.0
    policy: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"rolled {self.rolled} raw window(s) into hourly buckets and {self.hourly_rolled} hourly bucket(s) into "
            f"daily ones; deleted {self.rolled + self.redeliveries} raw row(s) ({self.redeliveries} redelivered), "
            f"{self.hourly_rolled} hourly and {self.expired} expired daily bucket(s) in {self.batches} batch(es)"
            + (f"; forgot {self.holes_forgotten} hole(s) no window will fill" if self.holes_forgotten else "")
            + ("" if self.done else "; more to do")
        )


class Retention:
    """The leader's periodic duty: ``tick(now)`` runs a pass of the stored policy (or the one given) at most
    every ``every`` seconds, ``max_batches`` transactions at a time; a pass cut short resumes next tick."""

    def __init__(
        self,
        store: HistoryStore,
        policy: RetentionPolicy | None = None,
        *,
        every: float = TICK_SECONDS,
        max_batches: int = 20,
    ) -> None:
        self.store, self.policy, self.every, self.max_batches = store, policy, every, max_batches
        self._next = 0.0

    @classmethod
    def of(cls, store: HistoryStore, setting: str | None) -> Retention:
        """The leader's retention: the collector's ``retention`` setting, else the policy stored in the database."""
        return cls(store, RetentionPolicy.from_text(setting) if setting else None)

    def tick(self, now: float | None = None) -> RetentionPass | None:
        now = time.time() if now is None else now
        if now < self._next:
            return None
        stored = self.store.retention_policy()
        policy = self.policy or (RetentionPolicy.from_dict(stored) if stored else None)
        if policy is None:
            self._next = now + self.every
            return None
        result = run_pass(self.store, policy, now, max_batches=self.max_batches)
        self._next = now if not result.done else now + self.every
        if result.batches:
            log.info("retention: %s", result.describe())
        return result


def run_pass(
    store: HistoryStore, policy: RetentionPolicy, now: float, *, batch: int = BATCH, max_batches: int | None = None
) -> RetentionPass:
    """Roll up and expire what ``policy`` says is due at ``now``: raw windows into hourly buckets, hourly
    into daily, expired daily buckets deleted; at most ``max_batches`` transactions (None: until done)."""
    started = time.monotonic()
    result = RetentionPass(policy=policy.to_dict())
    budget = [float("inf") if max_batches is None else max_batches]
    if policy.raw is not None:
        _roll_raw(store, _hour(iso(now - policy.raw)), result, batch, budget, now)
        if budget[0] > 0:  # the late windows stored are merged (forget_holes keeps a hole whose window waits)
            result.holes_forgotten = store.forget_holes(now - policy.raw, now)
    if policy.hourly is not None:
        day_cutoff = _day(iso(now - policy.hourly))
        while budget[0] > 0 and (
            count := store.roll_history("hour", "day", day_cutoff, _day, merge_buckets, limit=batch, now=now)
        ):
            result.hourly_rolled, result.batches, budget[0] = (
                result.hourly_rolled + count,
                result.batches + 1,
                budget[0] - 1,
            )
    if policy.daily is not None:
        expired_before = _day(iso(now - policy.daily))
        while budget[0] > 0 and (count := store.expire_history("day", expired_before, limit=batch)):
            result.expired, result.batches, budget[0] = result.expired + count, result.batches + 1, budget[0] - 1
    result.done = budget[0] > 0
    result.seconds = time.monotonic() - started
    return result


def _roll_raw(
    store: HistoryStore, cutoff: str, result: RetentionPass, batch: int, budget: list[float], now: float
) -> None:
    baselines: dict[str, Profile | None] = {}
    while budget[0] > 0:
        rows = store.raw_windows_before(cutoff, batch, keep_recent=KEEP_RECENT_WINDOWS)
        if not rows:
            return
        budget[0] -= 1
        buckets: dict[tuple[Any, ...], dict[str, Any]] = {}
        rolled: dict[str, tuple[int, str]] = {}
        merged: dict[str, list[int]] = {}
        redelivered = unmergeable = 0
        for row in rows:
            if _redelivered(row):
                redelivered += 1
                continue
            bucket, fits = window_bucket(row, _baseline(store, baselines, row["baseline_id"]))
            unmergeable += not fits
            key = tuple(bucket[k] for k in ("bucket", "device", "model", "model_version", "baseline_id"))
            buckets[key] = merge_buckets(buckets[key], bucket) if key in buckets else bucket
            marked = rolled.get(row["device"]) or (row["rolled_seq"] or 0, row["rolled_end"] or "")
            rolled[row["device"]] = (max(row["seq"], marked[0]), max(row["window_end"], marked[1]))
            merged.setdefault(row["device"], []).append(row["seq"])
        marks = [row["mark"] for row in rows]
        if store.replace_raw(marks, list(buckets.values()), rolled, merge_buckets, now, merged=merged):
            result.batches += 1
            result.rolled += len(rows) - redelivered
            result.redeliveries += redelivered
            result.unmergeable += unmergeable


def _redelivered(row: dict[str, Any]) -> bool:
    """A window a bucket counts already: at or under both of its device's marks and in none of its holes (the
    marks and holes as stored; a window can be in one batch once only)."""
    if row["rolled_seq"] is None or row["in_hole"]:
        return False
    return row["seq"] <= row["rolled_seq"] and row["window_end"] <= row["rolled_end"]


def _baseline(store: HistoryStore, cache: dict[str, Profile | None], baseline_id: str) -> Profile | None:
    if baseline_id not in cache:
        document = store.baseline(baseline_id)
        try:
            cache[baseline_id] = Profile.from_dict(document) if document else None
        except ProfileError:
            cache[baseline_id] = None
    return cache[baseline_id]


def window_bucket(row: dict[str, Any], baseline: Profile | None) -> tuple[dict[str, Any], bool]:
    """One raw window as an hourly bucket of one window, and whether its profile could be kept. With its
    baseline the profile is read through it (a version-1 window's categorical counts are completed as
    merged drift would read them) and written back at full precision."""
    doc = json.loads(row["payload"])
    accuracy, latency = doc.get("accuracy") or {}, doc.get("latency") or {}
    profile, fits = doc.get("profile"), True
    if baseline is not None:
        try:
            profile = exact_compact(baseline.from_compact(profile))
        except ProfileError:
            profile, fits = None, False
    errors = {str(k): v for k, v in (doc.get("errors") or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
    return {
        "resolution": "hour",
        "bucket": _hour(row["window_end"]),
        "device": row["device"],
        "model": row["model"],
        "model_version": row["model_version"],
        "baseline_id": row["baseline_id"],
        "fleet": row["fleet"],
        "first_start": row["window_start"],
        "last_end": row["window_end"],
        "windows": 1,
        "rows": row["rows"],
        "tested": int(row["drifted"] is not None),
        "drifted": int(bool(row["drifted"])),
        "labelled": row["labelled"] or 0,
        "correct": int(accuracy.get("correct") or 0),
        "errors": errors,
        "p99_ms_max": latency.get("p99_ms"),
        "max_ms": latency.get("max_ms"),
        "profile": profile,
    }, fits


def merge_buckets(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two buckets of one key as one: counters add, extremes widen, profiles merge exactly."""
    merged = dict(a)
    for column in ("windows", "rows", "tested", "drifted", "labelled", "correct"):
        merged[column] = a[column] + b[column]
    merged["errors"] = {k: a["errors"].get(k, 0) + b["errors"].get(k, 0) for k in sorted({*a["errors"], *b["errors"]})}
    merged["first_start"] = min(a["first_start"], b["first_start"])
    merged["last_end"] = max(a["last_end"], b["last_end"])
    merged["fleet"] = b["fleet"] if b["last_end"] >= a["last_end"] else a["fleet"]
    for column in ("p99_ms_max", "max_ms"):
        values = [v for v in (a[column], b[column]) if v is not None]
        merged[column] = max(values) if values else None
    try:
        merged["profile"] = merge_compact(a["profile"], b["profile"])
    except ProfileError as exc:  # windows whose profiles do not fit each other: keep the larger part
        log.warning("retention: cannot merge two profiles of baseline %s (%s)", a["baseline_id"], exc)
        merged["profile"] = max((a, b), key=lambda x: x["windows"])["profile"]
    return merged


def merge_compact(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two compact profiles of one baseline added (``Profile.merge`` on the wire form): every count adds,
    a numeric sketch's sums add and its extremes widen."""
    if a is None or b is None:
        return a if b is None else b
    if a.get("baseline_id") != b.get("baseline_id") or len(a["features"]) != len(b["features"]):
        raise ProfileError("the profiles are of different baselines")
    if set(a["outputs"]) != set(b["outputs"]):
        raise ProfileError("the profiles have different outputs")
    return {
        "baseline_id": a["baseline_id"],
        "rows": a["rows"] + b["rows"],
        "features": [_merge_sketch(x, y) for x, y in zip(a["features"], b["features"], strict=True)],
        "outputs": {k: _merge_sketch(a["outputs"][k], b["outputs"][k]) for k in sorted(a["outputs"])},
        "latency_ms": _merge_sketch(a["latency_ms"], b["latency_ms"]),
    }


def _merge_sketch(x: list[Any], y: list[Any]) -> list[Any]:
    if len(x) != len(y) or len(x[0]) != len(y[0]):
        raise ProfileError("two sketches of different shapes")
    counts = [p + q for p, q in zip(x[0], y[0], strict=True)]
    if len(x) == 7:  # numeric: counts, nulls, infs, sum, sum of squares, min, max
        low = [v for v in (x[5], y[5]) if v is not None]
        high = [v for v in (x[6], y[6]) if v is not None]
        return [
            counts,
            x[1] + y[1],
            x[2] + y[2],
            x[3] + y[3],
            x[4] + y[4],
            min(low, default=None),
            max(high, default=None),
        ]
    return [counts, *(p + q for p, q in zip(x[1:], y[1:], strict=True))]  # categorical: counts, nulls, unseen


def exact_compact(profile: Profile) -> dict[str, Any]:
    """``Profile.to_compact`` at full precision: a bucket's sums are added again, so they are not rounded."""

    def sketch(s: Any) -> list[Any]:
        if not isinstance(s, NumericSketch):
            return s.compact()
        bounds = [s.minimum, s.maximum] if s.count else [None, None]
        return [s.counts.tolist(), s.nulls, s.infs, s.total, s.total_sq, *bounds]

    return {
        "baseline_id": profile.baseline_id,
        "rows": profile.rows,
        "features": [sketch(s) for s in profile.features],
        "outputs": {k: sketch(s) for k, s in sorted(profile.outputs.items())},
        "latency_ms": sketch(profile.latency_ms),
    }


def _hour(timestamp: str) -> str:
    """The hour a window-end time (``2024-05-01T13:42:07.12Z``) falls in, in the same form."""
    return timestamp[:13] + ":00:00.00Z"


def _day(timestamp: str) -> str:
    return timestamp[:10] + "T00:00:00.00Z"
