"""Drift over any slice of the fleet: windows of the same baseline merged by addition, then compared.

Profiles of one baseline add exactly, so "this device over the last hour", "model digits v3 on
every device" and "the whole fleet today" are all one merge and one comparison. Windows of
different baselines (different model versions) are reported as separate groups.
"""

from __future__ import annotations

import re
import time
from typing import Any

from device_agent.drift import drift_report
from device_agent.profile import Profile
from device_agent.protocol import iso
from edgekit.errors import EdgekitError
from edgekit.fleet.store import SqliteStore

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


def merged_drift(store: SqliteStore, **selection: Any) -> list[dict[str, Any]]:
    """One drift report per baseline among the selected windows (device, model, version, fleet, since)."""
    groups: dict[str, dict[str, Any]] = {}
    for summary in store.summaries(**selection):
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
            }
            if group["baseline"] is not None:
                group["merged"] = group["baseline"].empty_like()
        group["devices"].add(summary["device"])
        group["versions"].add(summary["model"]["version"])  # versions trained on the same data share a baseline
        group["windows"] += 1
        group["rows"] += summary["rows"]
        group["last"] = max(group["last"], summary["window"]["end"])
        if group["merged"] is not None:
            group["merged"].merge(group["baseline"].from_compact(summary["profile"]))
    return [_report(group) for group in groups.values()]


def _report(group: dict[str, Any]) -> dict[str, Any]:
    report = {k: group[k] for k in ("baseline_id", "model", "windows", "rows", "first", "last")}
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
    return report
