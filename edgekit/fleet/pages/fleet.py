"""``/``: the fleet table and the open alerts."""

from __future__ import annotations

import html
from typing import Any

from edgekit.fleet.pages import page


def render_fleet(status: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> bytes:
    rows = "".join(
        f"<tr><td><a href='/devices/{html.escape(d['device'])}'>{html.escape(d['device'])}</a></td><td>{html.escape(d['fleet'])}</td>"
        f"<td class='{'ok' if d['online'] else 'bad'}'>{'online' if d['online'] else 'offline' if d['online'] is False else '?'}</td>"
        f"<td>{html.escape(str(d['model']))} v{d['model_version']}</td><td>{d['windows']}</td><td>{d['rows']}</td>"
        f"<td class='{'bad' if d['drifted'] else 'ok'}'>{'drifted' if d['drifted'] else 'no' if d['drifted'] is False else '-'}</td>"
        f"<td>{html.escape(str(d['worst_feature'] or '-'))}</td><td>{d['missing_seqs']}</td><td>{d['rejected']}</td></tr>"
        for d in status
    )
    open_alerts = [a for a in alerts if a["state"] == "open"]
    alert_rows = (
        "".join(
            f"<tr><td class='bad'>{html.escape(a['rule'])}</td><td>{html.escape(a['device'])}</td><td>{html.escape(a['subject'])}</td><td>{html.escape(a['message'])}</td></tr>"
            for a in open_alerts
        )
        or "<tr><td colspan='4' class='muted'>no open alerts</td></tr>"
    )
    body = (
        f"<h1>edgekit fleet</h1><p><a href='/drift'>fleet-wide drift</a> · <a href='/rollouts'>rollouts</a></p><p class='muted'>{len(status)} devices, {sum(1 for d in status if d['online'])} online, "
        f"{sum(1 for d in status if d['drifted'])} drifted</p><table><tr><th>device</th><th>fleet</th><th>state</th><th>model</th><th>windows</th>"
        f"<th>rows</th><th>drift</th><th>worst feature</th><th>missing</th><th>rejected</th></tr>{rows}</table>"
        f"<h2>Open alerts</h2><table><tr><th>rule</th><th>device</th><th>subject</th><th>message</th></tr>{alert_rows}</table>"
    )
    return page("edgekit fleet", body)
