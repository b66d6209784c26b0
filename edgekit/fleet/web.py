"""The collector's HTTP side: a server-rendered dashboard, JSON APIs and Prometheus metrics.

    GET /                      the fleet table and open alerts
    GET /devices/<device>      that device's drift per feature over time (inline SVG), its windows
    GET /drift?model=&version=&fleet=&since=&feature=   fleet-wide merged drift, and one feature's
                               distribution over the fleet against its baseline
    GET /api/status            ``fleet status --json``
    GET /api/drift?device=&model=&version=&since=   merged drift (``fleet drift --json``)
    GET /api/alerts            open and recent alerts
    GET /metrics               Prometheus text (prometheus-client)
    GET /rollouts, /rollouts/<id>   rollouts: waves, devices per state, reasons
    GET /bundles/<sha256>      bundle bytes for devices, with Range (an interrupted download resumes)
    GET  /api/bundles          stored bundles;  POST /api/bundles (the bundle's bytes) verifies and stores one
    GET  /api/rollouts[/<id>]  rollout status;  POST /api/rollouts {sha256, fleet, devices, waves, ...} starts one
    POST /api/rollouts/<id>/(pause|resume|abort);  POST /api/rollbacks {instruction, signature, devices}

POSTs need ``Authorization: Bearer <token>`` when the collector has an API token. The routes are
plain ``Request -> Response`` functions served by the same waitress server as the agent's API
(:mod:`device_agent.httpserver`: timeouts, connection limit, body limit, TLS).

No front-end build step, no JavaScript: HTML and SVG written here.
"""

from __future__ import annotations

import hmac
import html
import re
from typing import TYPE_CHECKING, Any

from device_agent.config import HttpLimits
from device_agent.errors import ServeError
from device_agent.wsgi import HttpError, Request, Response, error_response, json_response, wsgi_app
from edgekit.errors import EdgekitError
from edgekit.fleet.merge import merged_drift, since_timestamp

if TYPE_CHECKING:
    from device_agent.httpserver import HttpServer
    from edgekit.fleet.collector import Collector

# Bundles are uploaded whole: a body limit of 1 GiB, and the time a Pi-sized link needs to send it.
COLLECTOR_LIMITS = HttpLimits(max_body_bytes=1 << 30, body_timeout=600.0)
_BUNDLE_ROUTE = re.compile(r"^/bundles/(?P<sha>[0-9a-f]{64})$")
_ROLLOUT_ROUTE = re.compile(r"^/api/rollouts/(?P<id>[A-Za-z0-9._-]{1,64})(?:/(?P<verb>pause|resume|abort))?$")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
HTML = "text/html; charset=utf-8"


def serve(
    collector: Collector,
    listen: str,
    *,
    limits: HttpLimits = COLLECTOR_LIMITS,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> HttpServer:
    """Serve the dashboard and APIs on ``listen`` (host:port) in background threads."""
    from device_agent.httpserver import serve_wsgi, tls_context

    host, _, port = listen.rpartition(":")
    try:
        tls = tls_context(tls_cert, tls_key) if tls_cert else None
        return serve_wsgi(
            wsgi_app(lambda request: route(collector, request)),
            (host or "127.0.0.1", int(port)),
            limits=limits,
            tls=tls,
            name="edgekit-collector-http",
            ident="edgekit-collector",
            limit_names=_limit_names(),
        )
    except ValueError as exc:
        raise EdgekitError(f"cannot serve HTTP on {listen} ({exc})", "pass --http host:port") from exc
    except ServeError as exc:
        raise EdgekitError(exc.problem, exc.fix or "free the port or pass another --http host:port") from exc


def _limit_names():
    from device_agent.httpserver import LimitNames

    return LimitNames(
        **{
            name: f"--http-limit {name}=..."
            for name in ("max_body_bytes", "max_header_bytes", "header_timeout", "body_timeout")
        }
    )


def route(collector: Collector, request: Request) -> Response:
    """The answer to one request (the HTTP server, TLS and limits are the caller's business)."""
    if request.method == "POST":
        return _post(collector, request)
    if request.method != "GET":
        raise HttpError(
            405, f"{request.method} is not served; the collector takes GET and POST", [("Allow", "GET, HEAD, POST")]
        )
    try:
        return _get(collector, request)
    except (EdgekitError, ValueError) as exc:
        return error_response(400, str(exc))


def _get(collector: Collector, request: Request) -> Response:
    path, query, store = request.path, request.query, collector.store
    if path == "/":
        return Response(200, render_fleet(store.status(), _alerts(collector)), HTML)
    if path.startswith("/devices/"):
        device = path.split("/", 2)[2]
        if device not in {d["device"] for d in store.status()}:
            return error_response(404, f"no device {device!r} is known to this collector")
        return Response(200, render_device(device, list(store.summaries(device=device))), HTML)
    if path == "/drift":
        version = int(query["version"]) if "version" in query else None
        reports = merged_drift(
            store,
            model=query.get("model"),
            version=version,
            fleet=query.get("fleet"),
            since=since_timestamp(query.get("since")),
        )
        return Response(200, render_fleet_drift(reports, query.get("feature")), HTML)
    if path == "/api/status":
        return json_response(store.status())
    if path == "/api/drift":
        version = int(query["version"]) if "version" in query else None
        return json_response(
            merged_drift(
                store,
                device=query.get("device"),
                model=query.get("model"),
                version=version,
                since=since_timestamp(query.get("since")),
            )
        )
    if path == "/api/alerts":
        return json_response(_alerts(collector))
    if path == "/metrics":
        from edgekit.fleet.metrics import render

        return Response(200, render(collector), "text/plain; version=0.0.4")
    if _BUNDLE_ROUTE.match(path):
        return _bundle(collector, _BUNDLE_ROUTE.match(path)["sha"], request.header("range"))
    if path in ("/api/rollouts", "/api/bundles", "/rollouts") or path.startswith(("/api/rollouts/", "/rollouts/")):
        return _rollout_get(collector, path)
    return error_response(404, f"no route {path}")


def _post(collector: Collector, request: Request) -> Response:
    token = collector.config.api_token
    if token and not hmac.compare_digest(request.header("authorization"), f"Bearer {token}"):
        return error_response(401, "missing or wrong API token; set EDGEKIT_COLLECTOR_TOKEN")
    rollouts, path = collector.rollouts, request.path
    try:
        if path == "/api/bundles":
            return json_response(rollouts.add_bundle(request.body), 201)
        doc = request.json_object() if request.body else {}
        if path == "/api/rollouts":
            from edgekit.fleet.rollouts import start_from_request

            return json_response({"id": start_from_request(rollouts, doc)}, 201)
        if path == "/api/rollbacks":
            rollout_id = rollouts.rollback(
                doc.get("instruction") or {}, str(doc.get("signature", "")), str(doc.get("devices") or "*")
            )
            return json_response({"id": rollout_id}, 201)
        match = _ROLLOUT_ROUTE.match(path)
        if match and match["verb"]:
            return json_response(getattr(rollouts, match["verb"])(match["id"]))
    except (EdgekitError, ValueError, TypeError, KeyError) as exc:
        return error_response(getattr(exc, "http_status", 400), str(exc))
    return error_response(404, f"no route POST {path}")


def _rollout_get(collector: Collector, path: str) -> Response:
    from edgekit.fleet.rollout_views import render_rollout, render_rollouts

    rollouts = collector.rollouts
    if path == "/api/bundles":
        return json_response(rollouts.bundles())
    if path == "/api/rollouts":
        return json_response(rollouts.list())
    if path == "/rollouts":
        return Response(200, render_rollouts(rollouts.list()), HTML)
    rollout_id = path.rsplit("/", 1)[1]
    try:
        status = rollouts.status(rollout_id)
    except EdgekitError as exc:
        return error_response(404, str(exc))
    if path.startswith("/api/"):
        return json_response(status)
    return Response(200, render_rollout(status), HTML)


def _bundle(collector: Collector, sha256: str, wanted: str) -> Response:
    """The bundle's bytes; ``Range: bytes=N-[M]`` gets 206 and the rest, so devices resume."""
    stored = collector.rollouts.bundle(sha256=sha256)
    if stored is None:
        return error_response(404, f"no bundle {sha256}")
    with open(stored["path"], "rb") as handle:
        data = handle.read()
    size = len(data)
    first, last, status = 0, size - 1, 200
    if wanted:
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
        if not match or (not match[1] and not match[2]):
            return _range_error(size)
        if match[1]:
            first, last = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
        else:  # a suffix: the last N bytes
            first = max(0, size - int(match[2]))
        if first >= size or first > last:
            return _range_error(size)
        status = 206
    headers = [("Accept-Ranges", "bytes"), ("ETag", f'"{sha256}"')] + (
        [("Content-Range", f"bytes {first}-{last}/{size}")] if status == 206 else []
    )
    return Response(status, data[first : last + 1], "application/octet-stream", headers)


def _range_error(size: int) -> Response:
    return Response(416, b"", "application/octet-stream", [("Content-Range", f"bytes */{size}")])


def _alerts(collector: Collector) -> list[dict[str, Any]]:
    return collector.alerts.list(open_only=False, limit=50) if collector.alerts is not None else []


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222} h1{font-size:1.4rem} table{border-collapse:collapse;margin:.5rem 0 1.5rem}
th,td{padding:.3rem .7rem;border-bottom:1px solid #ddd;text-align:left;font-size:.9rem} th{background:#f4f4f4}
.bad{color:#b00020;font-weight:600} .ok{color:#137333} .muted{color:#888} svg{background:#fafafa;border:1px solid #ddd}
"""


def _page(title: str, body: str) -> bytes:
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>".encode()


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
    return _page("edgekit fleet", body)


def render_device(device: str, summaries: list[dict[str, Any]]) -> bytes:
    if not summaries:
        return _page(
            device,
            f"<h1>{html.escape(device)}</h1><p class='muted'>no windows stored yet</p><p><a href='/'>fleet</a></p>",
        )
    summaries.sort(key=lambda s: s["seq"])
    features = list(summaries[-1]["drift"]["features"])
    # the features that ever moved the most, so the plot shows what matters
    peak = {f: max(s["drift"]["features"].get(f, {}).get("psi", 0.0) for s in summaries) for f in features}
    shown = sorted(features, key=lambda f: -peak[f])[:6]
    chart = drift_chart(summaries, shown)
    latest = summaries[-1]
    rows = "".join(
        f"<tr><td>{html.escape(f)}</td><td>{v['psi']:.4f}</td><td>{v['ks']:.4f}</td><td>{v['js']:.4f}</td><td class='{'bad' if v['drifted'] else 'ok'}'>{'yes' if v['drifted'] else 'no'}</td></tr>"
        for f, v in sorted(latest["drift"]["features"].items(), key=lambda kv: -kv[1]["psi"])[:15]
    )
    body = (
        f"<p><a href='/'>fleet</a></p><h1>{html.escape(device)}</h1><p class='muted'>{len(summaries)} windows, model {html.escape(latest['model']['name'])} "
        f"v{latest['model']['version']}, last window {html.escape(latest['window']['end'])}</p><h2>Drift per feature (PSI) over windows</h2>{chart}"
        f"<h2>Latest window</h2><table><tr><th>feature</th><th>PSI</th><th>KS</th><th>JS</th><th>drifted</th></tr>{rows}</table>"
    )
    return _page(device, body)


def drift_chart(summaries: list[dict[str, Any]], features: list[str], width: int = 720, height: int = 260) -> str:
    """An inline SVG line chart of PSI per feature across windows, with a legend."""
    pad, legend = 40, 150
    plot_w, plot_h = width - pad - legend, height - 2 * pad
    top = max([0.05] + [s["drift"]["features"].get(f, {}).get("psi", 0.0) for s in summaries for f in features])
    count = max(1, len(summaries) - 1)
    x = lambda i: pad + plot_w * i / count  # noqa: E731
    y = lambda v: pad + plot_h * (1 - v / top)  # noqa: E731
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' aria-label='drift per feature'>",
        f"<line x1='{pad}' y1='{pad + plot_h}' x2='{pad + plot_w}' y2='{pad + plot_h}' stroke='#999'/>",
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{pad + plot_h}' stroke='#999'/>",
        f"<text x='{pad - 4}' y='{pad + 4}' font-size='10' text-anchor='end'>{top:.2f}</text>",
        f"<text x='{pad - 4}' y='{pad + plot_h}' font-size='10' text-anchor='end'>0</text>",
        f"<text x='{pad + plot_w / 2}' y='{height - 8}' font-size='11' text-anchor='middle'>window (seq {summaries[0]['seq']}…{summaries[-1]['seq']})</text>",
    ]
    for index, feature in enumerate(features):
        color = PALETTE[index % len(PALETTE)]
        points = " ".join(
            f"{x(i):.1f},{y(s['drift']['features'].get(feature, {}).get('psi', 0.0)):.1f}"
            for i, s in enumerate(summaries)
        )
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{points}'/>")
        parts.append(f"<rect x='{width - legend + 10}' y='{pad + 16 * index}' width='10' height='10' fill='{color}'/>")
        parts.append(
            f"<text x='{width - legend + 26}' y='{pad + 9 + 16 * index}' font-size='11'>{html.escape(feature)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def render_fleet_drift(reports: list[dict[str, Any]], feature: str | None) -> bytes:
    """Per model version: merged drift of every feature, and the chosen (or worst) feature's
    distribution over the whole selection drawn against its baseline."""
    sections = []
    for report in reports:
        title = f"{html.escape(report['model'])} {', '.join(f'v{v}' for v in report['model_versions'])}: {report['windows']} windows, {report['rows']:,} rows, {len(report['devices'])} device(s)"
        if report["drift"] is None:
            sections.append(f"<h2>{title}</h2><p class='muted'>{html.escape(report['note'])}</p>")
            continue
        features = report["drift"]["features"]
        chosen = feature if feature in features else report["drift"]["worst_feature"]
        rows = "".join(
            f"<tr><td><a href='?model={html.escape(report['model'])}&version={report['model_version']}&feature={html.escape(name)}'>{html.escape(name)}</a></td>"
            f"<td>{v['psi']:.4f}</td><td>{v['ks']:.4f}</td><td>{v['js']:.4f}</td><td class='{'bad' if v['drifted'] else 'ok'}'>{'yes' if v['drifted'] else 'no'}</td></tr>"
            for name, v in sorted(features.items(), key=lambda kv: -kv[1]["psi"])[:12]
        )
        chart = distribution_chart(chosen, report["feature_distributions"][chosen]) if chosen else ""
        sections.append(
            f"<h2>{title}</h2><p>merged verdict: <b class='{'bad' if report['drift']['drifted'] else 'ok'}'>"
            f"{'drifted' if report['drift']['drifted'] else 'no drift'}</b></p>{chart}"
            f"<table><tr><th>feature</th><th>PSI</th><th>KS</th><th>JS</th><th>drifted</th></tr>{rows}</table>"
        )
    body = "<p><a href='/'>fleet</a></p><h1>Fleet-wide drift</h1>" + (
        "".join(sections) or "<p class='muted'>no windows stored yet</p>"
    )
    return _page("fleet drift", body)


def distribution_chart(feature: str, counts: dict[str, list[int]], width: int = 720, height: int = 240) -> str:
    """Bars of the baseline's and the fleet's share per bin (underflow first, overflow last), side by side."""
    baseline, window = counts["baseline"], counts["window"]
    shares = [[c / max(1, sum(series)) for c in series] for series in (baseline, window)]
    top = max(max(s) for s in shares) or 1.0
    pad, bins = 36, len(baseline)
    slot = (width - 2 * pad) / bins
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' aria-label='distribution of {html.escape(feature)}'>",
        f"<text x='{pad}' y='16' font-size='12'>{html.escape(feature)}: share of rows per bin (grey: baseline, blue: fleet)</text>",
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#999'/>",
    ]
    for index in range(bins):
        for series, (color, offset) in enumerate((("#bbbbbb", 0.1), ("#1f77b4", 0.5))):
            value = shares[series][index]
            bar = (height - 2 * pad - 10) * value / top
            parts.append(
                f"<rect x='{pad + slot * (index + offset):.1f}' y='{height - pad - bar:.1f}' width='{slot * 0.38:.1f}' height='{bar:.1f}' fill='{color}'/>"
            )
    parts.append(f"<text x='{pad}' y='{height - 12}' font-size='10'>below baseline min</text>")
    parts.append(
        f"<text x='{width - pad}' y='{height - 12}' font-size='10' text-anchor='end'>above baseline max</text></svg>"
    )
    return "".join(parts)
