"""``/alerts/<id>/timeline``: what the retrain sink did about one alert, step by step; ``/retrains``: its runs.

The steps are the store's (``store/timeline_records.py``), written by ``fleet/retrain.py``; a step's details
(the promotion's report, the command's stderr, the commands left to an operator) are shown as they were
recorded, so the page and ``/api/alerts/<id>/timeline`` never disagree.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from edgekit.fleet.pages import page

_STATUS = {"ok": "ok", "bad": "bad", "muted": "muted"}
_RUN_CLASS = {"succeeded": "ok", "failed": "bad", "running": "", "kept": "muted", "awaiting": "", "skipped": "muted"}


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def render_timeline(alert: dict[str, Any], timeline: dict[str, Any] | None) -> bytes:
    """The alert, then its retrain's steps (or a line saying the sink did not act on it)."""
    e = html.escape
    head = (
        f"<h1>Alert {alert['id']}: {e(alert['rule'])} on {e(alert['device'])}/{e(alert['subject'])}</h1>"
        "<p><a href='/'>fleet</a> · <a href='/retrains'>retrains</a> · "
        f"<a href='/api/alerts/{alert['id']}/timeline'>JSON</a></p>"
        f"<p>{e(alert['message'])} <span class='muted'>({e(alert['state'])}, opened {_when(alert['opened_at'])} UTC)"
        "</span></p>"
    )
    if timeline is None:
        body = "<p class='muted'>the retrain sink did not act on this alert (not one of its rules, or none set)</p>"
        return page(f"alert {alert['id']}", head + body)
    run = timeline["run"]
    summary = (
        f"<p>retrain: <span class='{_RUN_CLASS.get(run['state'], '')}'>{e(run['state'])}</span>"
        f"{' — ' + e(run['outcome']) if run['outcome'] else ''}</p>"
    )
    rows = "".join(_step_row(step) for step in timeline["steps"])
    table = f"<table><tr><th>time (UTC)</th><th>step</th><th>message</th><th>details</th></tr>{rows}</table>"
    return page(f"alert {alert['id']} timeline", head + summary + table)


def _step_row(step: dict[str, Any]) -> str:
    e = html.escape
    detail = step["detail"] or {}
    extra = ""
    if step["step"] == "rollout started" and detail.get("rollout"):
        extra = f"<a href='/rollouts/{e(detail['rollout'])}'>rollout {e(detail['rollout'])}</a>"
    elif detail.get("commands"):
        extra = "<pre>" + e("\n".join(detail["commands"])) + "</pre>"
    elif detail.get("stderr_tail"):
        extra = f"<details><summary>stderr</summary><pre>{e(detail['stderr_tail'])}</pre></details>"
    if detail and step["step"] != "rollout started":
        shown = json.dumps(detail, indent=1, default=str)
        extra += f"<details><summary>recorded</summary><pre>{e(shown[:20000])}</pre></details>"
    return (
        f"<tr><td>{_when(step['at'])}</td><td class='{_STATUS.get(step['status'], '')}'>{e(step['step'])}</td>"
        f"<td>{e(step['message'])}</td><td>{extra}</td></tr>"
    )


def render_runs(runs: list[dict[str, Any]]) -> bytes:
    """The retrain sink's runs, newest first, each linked to its alert's timeline."""
    e = html.escape
    rows = (
        "".join(
            f"<tr><td><a href='/alerts/{r['alert']}/timeline'>alert {r['alert']}</a></td><td>{e(r['rule'])}</td>"
            f"<td>{e(r['device'])}</td><td>{e(r['model'])}</td>"
            f"<td class='{_RUN_CLASS.get(r['state'], '')}'>{e(r['state'])}</td><td>{e(r['outcome'])}</td>"
            f"<td>{_when(r['started_at'])}</td><td>{_when(r['finished_at'])}</td></tr>"
            for r in runs
        )
        or "<tr><td colspan='8' class='muted'>the retrain sink has not run</td></tr>"
    )
    head = (
        "<tr><th>alert</th><th>rule</th><th>device</th><th>model</th><th>state</th><th>outcome</th>"
        "<th>started (UTC)</th><th>finished</th></tr>"
    )
    return page("retrains", f"<h1>Retrains</h1><p><a href='/'>fleet</a></p><table>{head}{rows}</table>")
