"""``/``: the fleet table and the open alerts."""

from __future__ import annotations

import html
import time
from typing import Any

from edgekit.fleet.pages import page


def render_fleet(
    status: list[dict[str, Any]], alerts: list[dict[str, Any]], leader: dict[str, Any] | None = None
) -> bytes:
    """``leader``: the lease as ``/api/leader`` shows it (holder, since, held), for the header."""
    rows = "".join(
        f"<tr><td><a href='/devices/{html.escape(d['device'])}'>{html.escape(d['device'])}</a></td>"
        f"<td>{html.escape(d['fleet'])}</td>"
        f"<td class='{'ok' if d['online'] else 'bad'}'>"
        f"{'online' if d['online'] else 'offline' if d['online'] is False else '?'}</td>"
        f"<td>{html.escape(str(d['model']))} v{d['model_version']}</td><td>{d['windows']}</td><td>{d['rows']}</td>"
        f"<td class='{'bad' if d['drifted'] else 'ok'}'>"
        f"{'drifted' if d['drifted'] else 'no' if d['drifted'] is False else '-'}</td>"
        f"<td>{html.escape(str(d['worst_feature'] or '-'))}</td>"
        f"<td>{d['missing_seqs']}</td><td>{d['rejected']}</td></tr>"
        for d in status
    )
    open_alerts = [a for a in alerts if a["state"] == "open"]
    alert_rows = (
        "".join(
            f"<tr><td class='bad'><a href='/alerts/{a['id']}/timeline'>{html.escape(a['rule'])}</a></td>"
            f"<td>{html.escape(a['device'])}</td>"
            f"<td>{html.escape(a['subject'])}</td><td>{html.escape(a['message'])}</td></tr>"
            for a in open_alerts
        )
        or "<tr><td colspan='4' class='muted'>no open alerts</td></tr>"
    )
    online = sum(1 for d in status if d["online"])
    drifted = sum(1 for d in status if d["drifted"])
    header = (
        "<tr><th>device</th><th>fleet</th><th>state</th><th>model</th><th>windows</th>"
        "<th>rows</th><th>drift</th><th>worst feature</th><th>missing</th><th>rejected</th></tr>"
    )
    alert_header = "<tr><th>rule</th><th>device</th><th>subject</th><th>message</th></tr>"
    body = (
        "<h1>edgekit fleet</h1><p><a href='/drift'>fleet-wide drift</a> · <a href='/rollouts'>rollouts</a> · "
        "<a href='/retrains'>retrains</a></p>"
        f"<p class='muted'>{len(status)} devices, {online} online, {drifted} drifted</p>"
        f"{leader_line(leader)}"
        f"<table>{header}{rows}</table>"
        f"<h2>Open alerts</h2><table>{alert_header}{alert_rows}</table>"
    )
    return page("edgekit fleet", body)


def leader_line(leader: dict[str, Any] | None) -> str:
    """Which collector runs alerts, gap requests and rollouts, and since when (or that none does now)."""
    if not leader or not leader.get("held"):
        last = f" (last: {html.escape(leader['holder'])})" if leader else ""
        return f"<p class='bad'>leader: none holds the lease{last}; alerts and rollouts wait for one</p>"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(leader["since"]))
    return f"<p class='muted'>leader: <b>{html.escape(leader['holder'])}</b> since {since}</p>"
