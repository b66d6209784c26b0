"""The demo's closing of the loop: the collector's real retrain sink, configured through an ``alerts.toml`` the
demo writes, watched until the drifted device's alert closes, then printed as the store's timeline.

drift on emu-00 → the drift alert opens → the sink asks emu-00 for its field samples (kept by ``[capture]``,
labelled by the emulated app's delayed feedback) → the example retraining command
(``python -m edgekit.local.retrain_example``, what ``scripts/retrain_digits.py`` runs) → ``promote`` against
digits v2 → the bundle stored → a rollout with shadow to emu-00 → its windows, judged against the new bundle's
baseline (the rows of its drifted windows: what it now sees), no longer drift, and the alert closes.
Nothing here re-implements a step: this module writes the configuration, reads the store, and prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import tomlfile

Say = Callable[[str], None]


def write_alerts(workdir: Path, *, champion: Path, gate: Path, train: Path, key: Path) -> Path:
    """``alerts.toml`` with the demo's rules (an alert after 3 drifted windows: the first may be
    partly from before the change, and the new baseline is the others) and ``[sinks.retrain]``: the
    example command, promote against digits v2 on the held-out digits plus the field holdout, the new
    baseline from the field, and a rollout with shadow to the alert's device only (the others do not drift)."""
    retrain = {
        "rules": ["drift"],
        "models": ["digits"],
        "command": [sys.executable, "-m", "edgekit.local.retrain_example"],
        "champion": str(champion.resolve()),
        "data": [str(gate.resolve())],
        "trained_on": [str(train.resolve())],
        "baseline": "field",
        "max_regression": 0.02,
        "quantize": "none",
        "key": str(key.resolve()),
        "samples_timeout": "60s",
        "timeout": "5m",
        "cooldown": "1h",
        "workdir": "retrain",
        "rollout": {"devices": "{device}", "shadow_rows": 100, "health_seconds": 3},
    }
    doc = {
        "rules": {"drift_windows": 3, "offline_seconds": 3600, "accuracy_min_labels": 100},
        "sinks": {"log": False, "retrain": retrain},
    }
    comment = (
        "written by edgekit demo: its alert rules and the retrain sink (docs/retrain.md)\n"
        "accuracy_min_labels = 100 of ~150 labels a window: fewer make a 6-point dip noise"
    )
    return tomlfile.write(workdir / "alerts.toml", doc, comment=comment)


@dataclass
class LoopWatch:
    """Follows the retrain sink's run for ``device``: prints each new step of its timeline as it is recorded,
    and says when the loop is over (the alert closed with the device on the new version, or the run ended
    without a rollout)."""

    device: str
    say: Say
    alert_id: int | None = None
    shown: int = 0
    rollout_said: str = ""
    closed_said: bool = False
    started: dict[str, Any] = field(default_factory=dict)

    def poll(self, collector: Any) -> None:
        store = collector.store
        if self.alert_id is None:
            runs = [r for r in store.retrain_runs(limit=100) if r["device"] == self.device and r["state"] != "skipped"]
            if not runs:
                return
            self.alert_id = min(r["alert"] for r in runs)
        timeline = store.timeline(self.alert_id) or {"steps": []}
        for step in timeline["steps"][self.shown :]:
            self.say(f"      retrain: {step['step']}: {step['message']}")
            if step["step"] == "rollout started":
                self.started = step["detail"]
        self.shown = len(timeline["steps"])
        rollout = self.rollout(collector)
        if rollout is not None and rollout["state"] != self.rollout_said:
            self.rollout_said = rollout["state"]
            self.say(
                f"      retrain: rollout {rollout['id']} {rollout['state']} ({rollout['reason'] or 'in progress'})"
            )
        alert = store.alert(self.alert_id)
        if alert is not None and alert["state"] == "closed" and not self.closed_said:
            self.closed_said = True
            self.say(f"      the drift alert on {self.device} closed: {alert['rule']} on {alert['subject']} cleared")

    def rollout(self, collector: Any) -> dict[str, Any] | None:
        return collector.rollouts.status(self.started["rollout"]) if self.started.get("rollout") else None

    def done(self, collector: Any) -> bool:
        """The loop closed, or cannot any more (the run ended without a rollout, or the rollout did)."""
        if self.alert_id is None:
            return False
        run = (collector.store.timeline(self.alert_id) or {}).get("run") or {}
        if run.get("state") in ("failed", "kept", "awaiting"):
            return True
        rollout = self.rollout(collector)
        if rollout is None or rollout["state"] in ("running", "paused", "pending"):
            return False
        return rollout["state"] != "succeeded" or self.closed(collector)

    def closed(self, collector: Any) -> bool:
        alert = collector.store.alert(self.alert_id) if self.alert_id is not None else None
        return alert is not None and alert["state"] == "closed"

    def result(self, collector: Any) -> dict[str, Any] | None:
        """What the demo reports: ``alert_loop``'s document (the alert, the store's timeline, the rollout's row,
        as ``fleet timeline`` prints them) and whether the loop closed; None when no run started."""
        from edgekit.fleet.timeline_text import alert_loop

        loop = alert_loop(collector.store, self.alert_id) if self.alert_id is not None else None
        if loop is None:
            return None
        rollout = loop["rollout"]
        closed = loop["alert"]["state"] == "closed" and rollout is not None and rollout["state"] == "succeeded"
        return {**loop, "closed": closed}
