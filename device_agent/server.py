"""The agent's HTTP API, in the KServe / TF-Serving v1 style: routes as plain functions, served by waitress.

    POST /v1/models/<name>:predict   {"instances": [[...], ...]}
                                     -> {"predictions", "ids", "model_version", "probabilities"}
    POST /v1/models/<name>:feedback  {"id": ..., "label": ...}  (or {"feedback": [{"id", "label"}, ...]})
    GET  /v1/models/<name>           status and version
    GET  /healthz                    200 while a model is loaded
    GET  /metrics                    Prometheus text
    /v2/...                          the Open Inference Protocol v2 (KServe v2, Triton): :mod:`device_agent.v2`

Bodies come with Content-Length or Transfer-Encoding: chunked (neither: 411; over [server]
max_body_bytes: 413). Bad requests get 400 with ``{"error": "..."}`` and the server keeps serving.
With a token set, every route but /healthz needs ``Authorization: Bearer <token>``. With
[server] tls_cert and tls_key, the same API is served over HTTPS. The connection limits and
timeouts are in :mod:`device_agent.httpserver`.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import TYPE_CHECKING, Any, Protocol

from .config import AgentConfig, ServerConfig
from .errors import AgentError, ConfigError, InputError, ServeError
from .instances import TooManyRows, numeric_instances
from .metrics import Observed, render_metrics
from .schema import MATRIX, request_rows
from .serving import PredictResult
from .v2 import HEALTH_PREFIX, V2Served
from .v2 import route as v2_route
from .wsgi import JSON_TYPES, HttpError, Request, Response, error_response, json_response, wsgi_app

if TYPE_CHECKING:
    from .httpserver import HttpServer


class Served(Observed, V2Served, Protocol):
    """What the routes need of an agent: the metrics' view, the v2 routes' view, predictions and feedback."""

    config: AgentConfig

    def predict(self, rows: Any) -> PredictResult: ...

    def feedback(self, prediction_id: str, label: Any) -> str: ...


_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?::(?P<verb>predict|feedback))?$")
log = logging.getLogger("device_agent.server")


def serve(agent: Served, config: ServerConfig) -> HttpServer:
    """Start serving ``agent``'s API in background threads; a ``ConfigError`` if it cannot start."""
    try:
        from .httpserver import serve_wsgi, tls_context

        tls = tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        return serve_wsgi(
            wsgi_app(lambda request: route(agent, config, request)),
            config.address,
            limits=config.limits,
            tls=tls,
            name="edgekit-http",
            ident="edgekit-agent",
        )
    except ServeError as exc:
        raise ConfigError(
            agent.config.source, exc.problem, exc.fix or "free the port or change [server] listen"
        ) from exc


def route(agent: Served, config: ServerConfig, request: Request) -> Response:
    """The answer to one request (the HTTP server, TLS and limits are the caller's business)."""
    if request.path == "/healthz" and request.method == "GET":
        return json_response({"status": "ok", "model": agent.model_info})
    if request.path.startswith(HEALTH_PREFIX):  # v2 hook: open like /healthz (probes carry no token)
        return v2_route(agent, config, request)
    if config.token and not _authorized(request, config.token):
        return error_response(401, "missing or wrong bearer token")
    if request.path == "/v2" or request.path.startswith("/v2/"):  # v2 hook: the Open Inference Protocol
        return v2_route(agent, config, request)
    if request.path == "/metrics":
        _allow(request, "GET")
        return Response(200, render_metrics(agent).encode(), "text/plain; version=0.0.4")
    match = _ROUTE.match(request.path)
    if not match:
        if request.path == "/healthz":
            _allow(request, "GET")
        return error_response(
            404,
            f"no route {request.method} {request.path}"
            + ("; use /v1/models/<name>:predict" if request.method == "POST" else ""),
        )
    if match["name"] != agent.model_info["name"]:
        return error_response(404, f"no model named {match['name']!r}; this agent serves {agent.model_info['name']!r}")
    if not match["verb"]:
        _allow(request, "GET")
        return json_response(agent.status())
    if request.method != "POST":
        return json_response({"error": f"{match['verb']} takes POST", "allow": "POST"}, 405, [("Allow", "POST")])
    try:
        if match["verb"] == "predict":
            rows = _numeric_rows(agent, config, request)
            if rows is not None:
                return Response(200, agent.predict(rows).json_body(), "application/json")
            return json_response(_predict(agent, config, request.json_object()))
        return json_response(_feedback(agent, request.json_object()))
    except InputError as exc:
        return error_response(400, str(exc))
    except AgentError as exc:
        return error_response(500, str(exc))


def _predict(agent: Served, config: ServerConfig, body: dict[str, Any]) -> dict[str, Any]:
    instances = request_rows(body)
    rows = _row_count(instances)
    if rows > config.max_rows:
        raise HttpError(413, _too_many(rows, config.max_rows))
    return agent.predict(instances).to_json()


def _numeric_rows(agent: Served, config: ServerConfig, request: Request) -> Any:
    """A plain numeric ``instances`` body read straight into the model's dtype (``instances``), with the
    row limit checked before anything is allocated; None for any other body (parsed the ordinary way)."""
    schema = agent.schema
    if schema.layout != MATRIX or request.media_type not in JSON_TYPES:
        return None
    try:
        return numeric_instances(request.body, schema.dtype, config.max_rows)
    except TooManyRows as exc:
        raise HttpError(413, _too_many(exc.rows, config.max_rows)) from None


def _too_many(rows: int, limit: int) -> str:
    return f"the request has {rows} rows, over the limit of {limit} ([server] max_rows); send smaller batches"


def _row_count(instances: Any) -> int:
    if isinstance(instances, dict):  # columnar: the longest column
        return max((len(v) for v in instances.values() if isinstance(v, list)), default=0)
    return len(instances) if isinstance(instances, list) else 0


def _feedback(agent: Served, body: dict[str, Any]) -> dict[str, Any]:
    items = body.get("feedback", [body])
    if not isinstance(items, list) or not all(isinstance(i, dict) and "id" in i and "label" in i for i in items):
        raise InputError("feedback needs 'id' and 'label'", 'send {"id": "<id from :predict>", "label": ...}')
    statuses = [agent.feedback(item["id"], item["label"]) for item in items]
    return {
        "accepted": statuses.count("accepted"),
        "unknown": [i["id"] for i, s in zip(items, statuses, strict=True) if s == "unknown"],
        "duplicate": [i["id"] for i, s in zip(items, statuses, strict=True) if s == "duplicate"],
    }


def _authorized(request: Request, token: str) -> bool:
    header = request.header("authorization")
    return header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token.encode())


def _allow(request: Request, *methods: str) -> None:
    if request.method not in methods:
        raise HttpError(405, f"{request.path} takes {' or '.join(methods)}", [("Allow", ", ".join(methods))])
