"""The small HTTP vocabulary both servers' routes speak, and the one WSGI adapter that runs them.

A route is a plain function ``Request -> Response``: it knows nothing of sockets, threads or WSGI,
so the agent's API and the collector's dashboard are tested and served the same way, and the next
protocol (the Open Inference Protocol v2) is one more route. The adapter adds what every route
needs and none should repeat: HEAD answered as GET without the body, 411 for a body sent without
framing, 415 for a JSON route sent another media type, and a JSON 500 (logged) for a bug.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

log = logging.getLogger("device_agent.http")
# What a JSON route takes: JSON itself, and what curl -d sends when no type is given (the README's examples).
JSON_TYPES = frozenset({"", "application/json", "application/x-www-form-urlencoded", "text/plain"})
_REASONS = {
    200: "OK",
    201: "Created",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    @property
    def media_type(self) -> str:
        return self.header("content-type").split(";", 1)[0].strip().lower()

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, or :class:`HttpError` 415/400 saying what to send."""
        if self.media_type not in JSON_TYPES and not self.media_type.endswith("+json"):
            raise HttpError(415, f"the body is {self.media_type}, not JSON; send Content-Type: application/json")
        try:
            doc = json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not JSON ({exc})") from None
        except RecursionError:
            raise HttpError(400, "the body is JSON nested too deeply; send a flatter document") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "the body must be a JSON object")
        return doc


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """Raised by a route to answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.headers = status, list(headers)


def json_response(doc: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, json.dumps(doc, default=str).encode(), "application/json", list(headers))


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return json_response({"error": message}, status, headers)


def wsgi_app(route: Callable[[Request], Response]) -> Callable:
    """A WSGI application that runs ``route`` for every request."""

    def application(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        method = environ["REQUEST_METHOD"].upper()
        response = _respond(route, environ, method)
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        start_response(f"{response.status} {_REASONS.get(response.status, 'Unknown')}", headers)
        return [b""] if method == "HEAD" else [response.body]

    return application


def _respond(route: Callable[[Request], Response], environ: dict[str, Any], method: str) -> Response:
    if method in ("POST", "PUT", "PATCH") and "CONTENT_LENGTH" not in environ:
        return error_response(
            411, "the request has no Content-Length; send a Content-Length header or Transfer-Encoding: chunked"
        )
    try:
        return route(_request(environ, "GET" if method == "HEAD" else method))
    except HttpError as exc:
        return error_response(exc.status, str(exc), exc.headers)
    except Exception:  # a bug in a route: the client gets a line, the log the traceback, the server goes on
        log.exception("%s %s failed", method, environ.get("PATH_INFO"))
        return error_response(500, "internal error; the server's log has the details")


def _request(environ: dict[str, Any], method: str) -> Request:
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if key in environ:
            headers[key.replace("_", "-").lower()] = environ[key]
    length = int(environ.get("CONTENT_LENGTH") or 0)  # waitress read the whole body (de-chunked) before the route runs
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = (
        environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", "replace")
    )  # PEP 3333 hands the path as latin-1
    return Request(method, path, query, headers, environ["wsgi.input"].read(length) if length else b"")
