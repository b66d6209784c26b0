"""An alert's loop as text: its retrain run's steps as the fleet store recorded them, then the end of the rollout
the run started and the alert's closing, in seconds from the alert's opening.

One rendering for the two places that print it: ``edgekit demo`` at its end and ``edgekit fleet timeline``
(the dashboard's ``/alerts/<id>/timeline`` shows the same data as HTML).
"""

from __future__ import annotations

from typing import Any


def alert_loop(store: Any, alert_id: int) -> dict[str, Any] | None:
    """``{"alert", "run", "steps", "rollout"}`` for ``alert_id`` from the store (``rollout``: the row of the
    rollout its run started, or None); None when there is no such alert."""
    alert = store.alert(alert_id)
    if alert is None:
        return None
    timeline = store.timeline(alert_id) or {"run": None, "steps": []}
    started = [s["detail"].get("rollout") for s in timeline["steps"] if s["step"] == "rollout started"]
    found = store.rollout(started[-1]) if started and started[-1] else None
    return {"alert": alert, **timeline, "rollout": found[0] if found else None}


def timeline_lines(loop: dict[str, Any], where: str) -> list[str]:
    """The lines for ``loop`` (``alert_loop``'s document); ``where`` says where else to see it."""
    alert = loop["alert"]
    opened = alert["opened_at"]
    lines = [
        f"the loop, as the fleet store recorded it for alert {alert['id']} ({alert['rule']} on "
        f"{alert['device']}/{alert['subject']}){where}:"
    ]
    for step in loop["steps"]:
        lines.append(f"  {step['at'] - opened:+7.1f} s  {step['step']:<18} {step['message']}")
    ends = []  # the rollout's end and the alert's closing, in the order they happened
    rollout = loop["rollout"]
    if rollout is not None and rollout.get("finished_at"):
        ends.append((rollout["finished_at"], f"rollout {rollout['state']}", rollout["reason"] or ""))
    if alert["state"] == "closed":
        why = (
            f"{alert['rule']} on {alert['subject']} cleared: {alert['device']}'s windows fit the new bundle's baseline"
        )
        ends.append((alert["closed_at"], "alert closed", why))
    for at, what, message in sorted(ends):
        lines.append(f"  {at - opened:+7.1f} s  {what:<18} {message}")
    if alert["state"] != "closed":
        lines.append(f"  {'':>9}  {'alert still open':<18} {alert['message']}")
    run = loop["run"] or {}
    lines.append(f"  retrain run: {run.get('state', 'none')}" + (f" ({run['outcome']})" if run.get("outcome") else ""))
    return lines
