"""The collector's HTTP side: a server-rendered dashboard, JSON APIs and Prometheus metrics.

    GET /                      the fleet table and open alerts
    GET /devices/<device>      that device's drift per feature over time (inline SVG), its windows, its
                               categorical columns against the baseline and its data quality per column
    GET /drift?model=&version=&fleet=&since=&feature=   fleet-wide merged drift, and one feature's
                               distribution over the fleet against its baseline
    GET /api/status            ``fleet status --json``
    GET /api/leader            which collector holds the leader lease, since when (``fleet leader --json``)
    GET /api/drift?device=&model=&version=&since=   merged drift (``fleet drift --json``)
    GET /api/alerts            open and recent alerts
    GET /alerts/<id>/timeline, /api/alerts/<id>/timeline   what the retrain sink did about that alert;
                               /retrains its runs (``retrain.py``, ``pages/timeline.py``)
    GET /metrics               Prometheus text (prometheus-client)
    GET /rollouts, /rollouts/<id>   rollouts: waves, devices per state, reasons
    GET /bundles/<sha256>      bundle bytes for devices, with Range (an interrupted download resumes);
                               with the device (or API) token when the collector has one ([update] token)
    GET  /api/bundles          stored bundles;  POST /api/bundles (the bundle's bytes) verifies and stores one
    GET  /api/rollouts[/<id>]  rollout status;  POST /api/rollouts {sha256, fleet, devices, waves, ...} starts one
    POST /api/rollouts/<id>/(pause|resume|abort);  POST /api/rollbacks {instruction, signature, devices}
    /api/samples/..., /samples   field samples: ask a device, take its upload, serve the rows (``samples.py``)

POSTs need ``Authorization: Bearer <token>`` when the collector has an API token. A device token
(``--device-token-file``) is taken only where devices call: ``GET /bundles/<sha256>`` and the
field-sample chunks (``POST /api/samples/<device>/<id>``); anywhere else it gets 401. The routes are
plain ``Request -> Response`` functions served by the same waitress server as the agent's API
(:mod:`device_agent.httpserver`: timeouts, connection limit, body limit, TLS).

The pages themselves (HTML and inline SVG, no JavaScript) are rendered from data in ``pages/``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

from device_agent.config import HttpLimits
from device_agent.errors import ServeError
from device_agent.wsgi import HttpError, Request, Response, error_response, json_response, wsgi_app
from edgekit.errors import EdgekitError, StoreUnavailable
from edgekit.fleet.auth import bearer_ok, device_route_ok
from edgekit.fleet.leader import LEADER_LEASE, describe_lease
from edgekit.fleet.merge import device_columns, merged_drift, since_timestamp
from edgekit.fleet.pages.device import render_device
from edgekit.fleet.pages.drift import render_fleet_drift
from edgekit.fleet.pages.fleet import render_fleet

if TYPE_CHECKING:
    from device_agent.httpserver import HttpServer
    from edgekit.fleet.config import CollectorConfig
    from edgekit.fleet.rollouts import RolloutController
    from edgekit.fleet.store import SqlStore


class Fleet(Protocol):
    """What the routes use of a running collector: its store, alerts, rollouts and API token."""

    store: SqlStore
    alerts: Any
    rollouts: RolloutController | None
    config: CollectorConfig
    ingestor: Any


# Bundles are uploaded whole: a body limit of 1 GiB, and the time a Pi-sized link needs to send it.
COLLECTOR_LIMITS = HttpLimits(max_body_bytes=1 << 30, body_timeout=600.0)
_BUNDLE_ROUTE = re.compile(r"^/bundles/(?P<sha>[0-9a-f]{64})$")
_TIMELINE_ROUTE = re.compile(r"^(?P<api>/api)?/alerts/(?P<id>[0-9]{1,18})/timeline$")
_ROLLOUT_ROUTE = re.compile(r"^/api/rollouts/(?P<id>[A-Za-z0-9._-]{1,64})(?:/(?P<verb>pause|resume|abort))?$")
HTML = "text/html; charset=utf-8"


def serve(
    collector: Fleet,
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


def route(collector: Fleet, request: Request) -> Response:
    """The answer to one request (the HTTP server, TLS and limits are the caller's business). The store out
    of reach is a 503 with ``Retry-After``, not a 400: the request was fine, and is worth sending again."""
    try:
        return _route(collector, request)
    except StoreUnavailable as exc:
        return error_response(503, f"the fleet store is unavailable ({exc}); try again shortly", [("Retry-After", "5")])


def _route(collector: Fleet, request: Request) -> Response:
    if request.path.startswith("/api/samples") or request.path == "/samples":  # its own token check, GETs too
        from edgekit.fleet.samples import route as samples_route

        return samples_route(collector, request)
    if request.method == "POST":
        return _post(collector, request)
    if request.method != "GET":
        raise HttpError(
            405, f"{request.method} is not served; the collector takes GET and POST", [("Allow", "GET, HEAD, POST")]
        )
    try:
        return _get(collector, request)
    except StoreUnavailable:
        raise
    except (EdgekitError, ValueError) as exc:
        return error_response(400, str(exc))


def _get(collector: Fleet, request: Request) -> Response:
    path, query, store = request.path, request.query, collector.store
    if path == "/":
        return Response(200, render_fleet(store.status(), _alerts(collector), _leader(store)), HTML)
    if path.startswith("/devices/"):
        device = path.split("/", 2)[2]
        if device not in {d["device"] for d in store.status()}:
            return error_response(404, f"no device {device!r} is known to this collector")
        summaries = list(store.summaries(device=device))
        facts = store.recent_facts(device, 50)  # the windows' label-free accuracy estimates, beside labels'
        return Response(200, render_device(device, summaries, device_columns(store, summaries), facts), HTML)
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
    if path == "/api/leader":
        return json_response(_leader(store))
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
    if _TIMELINE_ROUTE.match(path) or path == "/retrains":
        return _timeline(store, path)
    if path == "/metrics":
        from edgekit.fleet.metrics import render

        return Response(200, render(collector), "text/plain; version=0.0.4")
    if _BUNDLE_ROUTE.match(path):
        return _bundle(collector, request, _BUNDLE_ROUTE.match(path)["sha"])
    if path in ("/api/rollouts", "/api/bundles", "/rollouts") or path.startswith(("/api/rollouts/", "/rollouts/")):
        return _rollout_get(collector, path)
    return error_response(404, f"no route {path}")


def _post(collector: Fleet, request: Request) -> Response:
    if not bearer_ok(request, collector.config.api_token):
        return error_response(401, "missing or wrong API token; set EDGEKIT_COLLECTOR_TOKEN (a device token is not it)")
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
    except StoreUnavailable:
        raise
    except (EdgekitError, ValueError, TypeError, KeyError) as exc:
        return error_response(getattr(exc, "http_status", 400), str(exc))
    return error_response(404, f"no route POST {path}")


def _rollout_get(collector: Fleet, path: str) -> Response:
    from edgekit.fleet.pages.rollouts import render_rollout, render_rollouts

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
    except StoreUnavailable:
        raise
    except EdgekitError as exc:
        return error_response(404, str(exc))
    if path.startswith("/api/"):
        return json_response(status)
    return Response(200, render_rollout(status), HTML)


def _timeline(store: SqlStore, path: str) -> Response:
    from edgekit.fleet.pages.timeline import render_runs, render_timeline

    if path == "/retrains":
        return Response(200, render_runs(store.retrain_runs()), HTML)
    match = _TIMELINE_ROUTE.match(path)
    alert = store.alert(int(match["id"]))
    if alert is None:
        return error_response(404, f"no alert {match['id']}")
    timeline = store.timeline(alert["id"])
    if match["api"]:
        return json_response({"alert": alert, **(timeline or {"run": None, "steps": []})})
    return Response(200, render_timeline(alert, timeline), HTML)


def _bundle(collector: Fleet, request: Request, sha256: str) -> Response:
    """The bundle's bytes; ``Range: bytes=N-[M]`` gets 206 and the rest, so devices resume. With an API token
    set, only for the bearer of it or of the device token: a bundle is the fleet's model, and its URL is no
    secret (it is in every device's retained ``desired`` message)."""
    if not device_route_ok(collector, request):
        return error_response(
            401,
            "missing or wrong token for a bundle download; set [update] token_file (or EDGEKIT_COLLECTOR_TOKEN) "
            "in the device's agent.toml to the collector's device token",
        )
    wanted = request.header("range")
    stored = collector.rollouts.bundle_file(sha256)  # written from the fleet database on first use
    if stored is None:
        return error_response(404, f"no bundle {sha256}")
    with open(stored, "rb") as handle:
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


def _leader(store: SqlStore) -> dict[str, Any]:
    return describe_lease(store.lease(LEADER_LEASE))


def _alerts(collector: Fleet) -> list[dict[str, Any]]:
    return collector.alerts.list(open_only=False, limit=50) if collector.alerts is not None else []
