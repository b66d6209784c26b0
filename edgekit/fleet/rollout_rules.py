"""The rollout's abort rules, read against what its devices reported (``rollouts.RolloutController._advance``).

Imports: edgekit.fleet.rollout_spec only.
"""

from __future__ import annotations

import statistics
from typing import Any

from edgekit.fleet.rollout_spec import RolloutSpec, parse_abort_rules

FAILED_DEVICE_STATES = ("failed", "rolled_back")


def abort_rule_tripped(rollout: dict[str, Any], spec: RolloutSpec, devices: list[dict[str, Any]]) -> str | None:
    """The first of the rollout's abort rules that what its devices reported trips, said as the abort's reason
    (``failed>20% tripped (failed = 25.0%)``); None when none does."""
    sent = [d for d in devices if d["state"] != "pending"]
    observed: dict[str, float | None] = {"failed": None, "agreement": None, "p99_ms": None, "drift": None}
    if sent:
        observed["failed"] = sum(d["state"] in FAILED_DEVICE_STATES for d in sent) / len(sent)
    shadows = [d["facts"].get("shadow") for d in devices if d["facts"].get("shadow")]
    rows = sum(s.get("rows") or 0 for s in shadows if s.get("agreement") is not None)
    if rows:
        observed["agreement"] = (
            sum((s.get("rows") or 0) * s["agreement"] for s in shadows if s.get("agreement") is not None) / rows
        )
    p99s = [s["p99_ms"] for s in shadows if s.get("p99_ms") is not None]
    if p99s:
        observed["p99_ms"] = statistics.median(p99s)
    moved = [d for d in devices if d["state"] == "succeeded"]
    if moved and spec.rule("drift"):
        drifted = sum(bool(d["drifted"]) and d["model_version"] == rollout["version"] for d in moved)
        observed["drift"] = drifted / len(moved)
    for rule in spec.abort_on:
        if rule.tripped(observed[rule.metric]):
            shown = (
                f"{observed[rule.metric]:.1%}" if rule.metric in ("failed", "drift") else f"{observed[rule.metric]:.4g}"
            )
            return f"{rule} tripped ({rule.metric} = {shown})"
    return None


def rule_value(spec: dict[str, Any], metric: str) -> float | None:
    """The threshold of the spec's abort rule on ``metric`` (what the devices' shadow phase is told), or None."""
    rule = next((r for r in parse_abort_rules(",".join(spec["abort_on"])) if r.metric == metric), None)
    return None if rule is None else rule.value
