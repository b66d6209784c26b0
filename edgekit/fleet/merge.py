"""Drift over any slice of the fleet: windows of the same baseline merged by addition, then compared.

Profiles of one baseline add exactly, so "this device over the last hour", "model digits v3 on
every device" and "the whole fleet today" are all one merge and one comparison. Windows of
different baselines (different model versions) are reported as separate groups.

Past the retention period (``retention.py``) windows are kept as hourly and daily buckets of merged
windows; ``merged_drift`` reads each window at the resolution it is kept at, and each report says
which resolutions it used and how many windows each gave.
"""

from __future__ import annotations

import re
import time
from typing import Any

from device_agent.categories import CategoricalSketch
from device_agent.drift import drift_report
from device_agent.errors import ProfileError
from device_agent.profile import Profile
from device_agent.protocol import iso
from edgekit.errors import EdgekitError
from edgekit.fleet.store import SqlStore

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_timestamp(text: str | None, now: float | None = None) -> str | None:
    """``1h`` / ``30m`` / ``2d`` ago, as the ISO form window times are stored in."""
    if text is None:
        return None
    match = _DURATION.match(text.strip())
    if match is None:
        raise EdgekitError(f"--since {text!r} is not a duration", "write it as a number and s, m, h or d, e.g. 1h")
    return iso((time.time() if now is None else now) - float(match[1]) * _SECONDS[match[2]])


# Merged over many windows, n is so large that every difference is statistically significant; the
# merged verdict then rests on effect size: PSI >= 0.1 is the usual "moderate shift" band.
MERGED_MIN_PSI = 0.1


def merged_drift(store: SqlStore, **selection: Any) -> list[dict[str, Any]]:
    """One drift report per baseline among the selected windows (device, model, version, fleet, since),
    raw where raw windows are kept, from hourly and daily buckets before that (``resolutions``)."""
    groups: dict[str, dict[str, Any]] = {}
    for summary in store.history_windows(**selection):
        baseline_id = summary["profile"]["baseline_id"]
        group = groups.get(baseline_id)
        if group is None:
            document = store.baseline(baseline_id)
            group = groups[baseline_id] = {
                "baseline_id": baseline_id,
                "model": summary["model"]["name"],
                "versions": set(),
                "devices": set(),
                "windows": 0,
                "rows": 0,
                "first": summary["window"]["start"],
                "last": summary["window"]["end"],
                "baseline": Profile.from_dict(document) if document else None,
                "merged": None,
                "resolutions": {},
            }
            if group["baseline"] is not None:
                group["merged"] = group["baseline"].empty_like()
        group["devices"].add(summary["device"])
        group["versions"].add(summary["model"]["version"])  # versions trained on the same data share a baseline
        windows, resolution = summary.get("windows", 1), summary.get("resolution", "raw")
        group["windows"] += windows
        group["resolutions"][resolution] = group["resolutions"].get(resolution, 0) + windows
        group["rows"] += summary["rows"]
        group["first"] = min(group["first"], summary["window"]["start"])
        group["last"] = max(group["last"], summary["window"]["end"])
        if group["merged"] is not None and "features" in summary["profile"]:  # a bucket may have lost its profile
            group["merged"].merge(group["baseline"].from_compact(summary["profile"]))
    return [_report(group) for group in groups.values()]


def _report(group: dict[str, Any]) -> dict[str, Any]:
    report = {k: group[k] for k in ("baseline_id", "model", "windows", "rows", "first", "last")}
    order = {"raw": 0, "hour": 1, "day": 2}
    report["resolutions"] = dict(sorted(group["resolutions"].items(), key=lambda kv: order.get(kv[0], 3)))
    report["devices"] = sorted(group["devices"])
    report["model_versions"] = sorted(group["versions"])
    report["model_version"] = report["model_versions"][-1]  # the newest of them
    if group["merged"] is None:
        report["drift"] = None
        report["note"] = "no device has published this baseline yet; drift cannot be computed"
    else:
        report["drift"] = drift_report(group["baseline"], group["merged"], {"min_psi": MERGED_MIN_PSI})
        report["feature_distributions"] = {
            s.name: {"baseline": b.counts.tolist(), "window": s.counts.tolist()}
            for s, b in zip(group["merged"].features, group["baseline"].features, strict=True)
        }
        report["categories"] = _categories(group["baseline"], group["merged"])
    return report


# The device page's "recent": enough rows for a category's share to mean something, few enough
# windows that a shift shows soon after it starts.
RECENT_WINDOWS = 10


def device_columns(store: SqlStore, summaries: list[dict[str, Any]], windows: int = RECENT_WINDOWS) -> dict[str, Any]:
    """What the device page draws per input column over the device's last ``windows`` windows, merged
    on their baseline: each column's data quality, and each categorical column's parts against the
    baseline. Only windows of the newest window's baseline merge (a model swap starts a new one)."""
    recent = sorted(summaries, key=lambda s: s["seq"])[-windows:]
    columns: dict[str, Any] = {"windows": 0, "rows": 0, "quality": {}, "kinds": {}, "categories": [], "note": None}
    if not recent:
        return columns
    baseline_id = recent[-1]["profile"]["baseline_id"]
    document = store.baseline(baseline_id)
    if document is None:
        columns["note"] = "no device has published the baseline of these windows yet: their columns cannot be drawn"
        return columns
    try:
        baseline = Profile.from_dict(document)
        merged = baseline.empty_like()
        for summary in recent:
            if summary["profile"]["baseline_id"] == baseline_id:
                merged.merge(baseline.from_compact(summary["profile"]))
                columns["windows"] += 1
    except ProfileError as exc:  # a stored window that does not fit its baseline: say so, draw the rest of the page
        columns["note"] = f"cannot merge these windows: {exc}"
        return columns
    columns.update(
        rows=merged.rows,
        quality=column_quality(merged),
        kinds={s.name: s.kind for s in baseline.features},
        categories=list(_categories(baseline, merged).values()),
    )
    return columns


def column_quality(profile: Profile) -> dict[str, dict[str, float]]:
    """Each input column's shares of the profile's rows that are missing, unseen (categorical) or out of
    the baseline's range (numeric), for columns with any: exact, from the merged counts, so windows of
    either summary version count (a version-1 window's unseen values are what ``from_compact`` makes of it).
    A sketch of ``per_row`` K values an example (a tensor channel's elements) counts K values a row: its
    shares are of its values, never past 1."""
    found = {}
    for sketch in profile.features:
        if isinstance(sketch, CategoricalSketch):
            rows = max(1, profile.rows)
            shares = {"null_rate": sketch.nulls / rows, "unseen_rate": sketch.unseen / rows}
        else:
            values = max(1, profile.rows * sketch.per_row)
            shares = {
                "null_rate": sketch.nulls / values,
                "out_of_range_rate": int(sketch.counts[0] + sketch.counts[-1]) / values,
            }
        if any(shares.values()):
            found[sketch.name] = shares
    return found


def category_parts(baseline: CategoricalSketch, window: CategoricalSketch) -> dict[str, Any]:
    """A categorical column's rows in parts that add up to all of them, for the baseline and a window:
    each of the baseline's top categories, then "other" (a value the baseline saw, outside its top),
    "unseen" (a value the baseline never saw) and "missing"."""

    def parts(sketch: CategoricalSketch) -> list[int]:
        counts = sketch.counts.tolist()
        unseen = min(sketch.unseen, counts[-1])  # unseen values are counted in "other" too
        return [*counts[:-1], counts[-1] - unseen, unseen, sketch.nulls]

    return {
        "column": baseline.name,
        "labels": [*(str(c) for c in baseline.categories), "other", "unseen", "missing"],
        "baseline": parts(baseline),
        "recent": parts(window),
    }


def _categories(baseline: Profile, merged: Profile) -> dict[str, dict[str, Any]]:
    return {
        b.name: category_parts(b, w)
        for b, w in zip(baseline.features, merged.features, strict=True)
        if isinstance(b, CategoricalSketch)
    }
