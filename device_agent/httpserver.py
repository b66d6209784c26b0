"""Serving a WSGI app on waitress with the limits a device on a LAN needs: the agent's API and the collector's
dashboard.

Why waitress (measured in ``scripts/bench_http.py`` against cheroot and the standard library's server):
one I/O thread reads every request to its end and hands only complete requests to a fixed pool of
worker threads, so a client that sends half a request and stops costs a socket, never a thread.
Cheroot reads requests in its worker threads (ten trickling clients hold ten workers) and does TLS
handshakes in its connection manager's thread. Waitress is pure Python with no dependencies.

What this module adds to waitress, in one channel subclass:

- **Deadlines.** Waitress only closes connections idle for ``channel_timeout``, which a client that
  trickles a byte every few seconds resets forever. Here a request's head must arrive within
  ``header_timeout`` of its first byte (of the accept, for a connection's first request, so a stalled
  TLS handshake counts) and its body within ``body_timeout`` of the head's end; past either the client
  gets 408 and the connection is closed.
- **TLS.** Waitress has none. The accepted socket is wrapped in a non-blocking ``SSLSocket`` and the
  handshake runs inside the first reads, on the I/O thread, without blocking other connections.
- **JSON errors.** What waitress refuses before the app runs (413, 431, a malformed chunk, 501, both
  Content-Length and Transfer-Encoding) is answered as ``{"error": "..."}`` naming the limit, like
  every answer of the apps themselves.

- **A connection limit that a slow client cannot hold.** Beyond ``max_connections``, a new connection
  closes the connection that has done nothing useful for longest (idle between requests, or still
  sending its head); only when every connection has a request in flight is the new one answered 503.
  Waitress's own limit (stop accepting) is kept as a backstop at twice that.

Limits come from :class:`~device_agent.config.HttpLimits`. No thread is ever made per connection:
``threads`` workers run requests, one more thread does all the I/O.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import HttpLimits
from .errors import ServeError

try:
    from waitress import wasyncore
    from waitress.adjustments import Adjustments
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser, ParsingError
    from waitress.server import TcpWSGIServer
    from waitress.task import ErrorTask, WSGITask
    from waitress.utilities import BadRequest, RequestEntityTooLarge, RequestHeaderFieldsTooLarge, ServerNotImplemented
except ImportError as exc:  # the agent's and the host's extras bring it
    raise ServeError(
        "the HTTP server needs waitress, which is not installed", "pip install 'edgekit-ml[agent]'"
    ) from exc

log = logging.getLogger("device_agent.http")
LOOP_SECONDS = 0.5  # the I/O loop wakes at least this often to check deadlines and to stop
ACCEPT_BATCH = 64  # connections accepted in one turn of the I/O loop


@dataclass(frozen=True)
class LimitNames:
    """How the user sets each limit, for the messages that name them (agent.toml keys or CLI flags)."""

    max_body_bytes: str = "[server] max_body_bytes"
    max_header_bytes: str = "[server] max_header_bytes"
    header_timeout: str = "[server] header_timeout"
    body_timeout: str = "[server] body_timeout"


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server context for a PEM certificate (chain) and key; TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ServeError(
            f"cannot load the TLS certificate {cert} with key {key} ({exc})",
            "give a PEM certificate and its unencrypted PEM key "
            "(openssl req -x509 -newkey ... makes a self-signed pair)",
        ) from exc
    return context


class HttpServer:
    """A running server: ``server_address``, ``scheme``, ``shutdown()`` (the standard library's names)."""

    def __init__(self, wsgi_server: Any, socket_map: dict, dispatcher: Any, scheme: str, name: str) -> None:
        self._server, self._map, self._dispatcher, self.scheme = wsgi_server, socket_map, dispatcher, scheme
        self.server_address = (wsgi_server.effective_host, int(wsgi_server.effective_port))
        self._stopping = threading.Event()
        self._closing = threading.Lock()  # the loop closes the wake-up pipe only after shutdown has written to it
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            wasyncore.loop(timeout=LOOP_SECONDS, map=self._map, use_poll=True, count=1)
        with self._closing:
            wasyncore.close_all(self._map)

    def connections(self) -> int:
        """Open client connections (the listening socket and the wake-up pipe are not counted)."""
        return sum(isinstance(obj, HTTPChannel) for obj in list(self._map.values()))

    def shutdown(self) -> None:
        """Stop accepting, close every connection, stop the worker threads (requests in flight get 5 s)."""
        with self._closing:
            # set and pulled under the lock: a loop that wakes on its own between the two would
            # otherwise close the pipe first, and the write would hit a closed (or reused) descriptor
            if self._stopping.is_set():
                return
            self._stopping.set()
            self._server.pull_trigger()
        self._thread.join(timeout=LOOP_SECONDS * 4)
        self._dispatcher.shutdown(cancel_pending=True, timeout=5)

    server_close = shutdown  # the standard library's servers are stopped in two calls; one does here


def serve_wsgi(
    app: Callable,
    address: tuple[str, int],
    *,
    limits: HttpLimits = HttpLimits(),
    tls: ssl.SSLContext | None = None,
    name: str = "edgekit-http",
    ident: str = "edgekit",
    limit_names: LimitNames = LimitNames(),
) -> HttpServer:
    """Serve ``app`` on ``address`` (port 0: any free port) in background threads until ``shutdown()``."""
    socket_map: dict = {}
    host, port = address
    try:
        server = _Server(
            app,
            socket_map,
            adj=Adjustments(
                host=host,
                port=port,
                ident=ident,
                url_scheme="https" if tls else "http",
                threads=limits.threads,
                connection_limit=2 * limits.max_connections + 16,
                channel_timeout=limits.idle_timeout,
                cleanup_interval=1,
                asyncore_use_poll=True,  # poll: no 1,024-descriptor ceiling of select
                max_request_body_size=limits.max_body_bytes + 1,  # waitress refuses a body of exactly its limit
                max_request_header_size=limits.max_header_bytes,
                expose_tracebacks=False,
            ),
        )
    except (OSError, ValueError) as exc:
        raise ServeError(
            f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})",
            "free the port or choose another address",
        ) from exc
    server.channel_class = type("Channel", (_Channel,), {"limits": limits, "tls": tls, "names": limit_names})
    return HttpServer(server, socket_map, server.task_dispatcher, "https" if tls else "http", name)


class _Server(TcpWSGIServer):
    """Waitress's TCP server, accepting up to ACCEPT_BATCH connections a turn of the I/O loop, not one.

    Each turn rebuilds the poll set over every connection, so a burst of a thousand connections
    accepted one a turn kept a new client waiting in the backlog for 140 ms (scripts/bench_http.py)."""

    def handle_accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                accepted = self.accept()
                if accepted is None:  # nothing more waiting
                    return
                sock, addr = accepted
                self.set_socket_options(sock)
            except OSError:  # the client left before we got to it; as waitress does, go on
                return
            self.channel_class(self, sock, self.fix_addr(addr), self.adj, map=self._map)


class _Parser(HTTPRequestParser):
    """Waitress's parser, stricter about chunked bodies.

    It refuses a request that frames its body twice (a request-smuggling vector), a chunk whose
    declared size would pass the body limit (before its bytes are read: waitress counts only what
    has arrived), and a trailer field without a colon."""

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            raise ParsingError("the request has both Content-Length and Transfer-Encoding; send only one")

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        chunks = self.body_rcv if self.chunked and self.error is None else None
        if chunks is None:
            return consumed
        if not self.completed and len(chunks.buf) + chunks.chunk_remainder >= self.adj.max_request_body_size:
            self.error, self.completed = RequestEntityTooLarge("the chunked body is over the limit"), True
        elif self.completed and any(b":" not in line for line in chunks.trailer.splitlines() if line):
            self.error = BadRequest("malformed trailer field (a trailer is 'Name: value')")
        return consumed


class _JsonErrorTask(ErrorTask):
    """What waitress refuses before the app runs, answered as JSON that names the limit."""

    def execute(self) -> None:
        code, message = _describe(self.request, self.channel.limits, self.channel.names)
        body = json.dumps({"error": message}).encode()
        self.status = f"{code} {self.request.error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


def _describe(request: Any, limits: HttpLimits, names: LimitNames) -> tuple[int, str]:
    error = request.error
    if isinstance(error, RequestEntityTooLarge):
        limit = f"{limits.max_body_bytes}-byte limit ({names.max_body_bytes})"
        if request.chunked:
            return 413, f"the chunked body is over the {limit}"
        return 413, f"the body of {request.content_length} bytes is over the {limit}"
    if isinstance(error, RequestHeaderFieldsTooLarge):
        return (
            431,
            f"the request line and headers are over the {limits.max_header_bytes}-byte limit "
            f"({names.max_header_bytes})",
        )
    if isinstance(error, ServerNotImplemented):
        return (
            501,
            "this Transfer-Encoding is not supported; "
            "send the body with Transfer-Encoding: chunked or a Content-Length",
        )
    text = str(error.body)
    if "chunk" in text.lower() or "trailer" in text:
        return 400, f"malformed chunked body ({text})"
    return error.code, f"malformed request ({text})"


class _Task(WSGITask):
    """Waitress's WSGI task, sending a whole small response in one write (waitress sends the head apart:
    a second syscall, and a second wake-up of a keep-alive client waiting for the body)."""

    def write(self, data: bytes) -> None:
        if (
            not self.wrote_header
            and data
            and self.has_body
            and not self.chunked_response
            and self.content_length == len(data)
        ):
            head = self.build_response_header()
            self.wrote_header, self.content_bytes_written = True, len(data)
            self.channel.write_soon(head + data)
            return
        super().write(data)


class _Channel(HTTPChannel):
    """One client connection: waitress's, plus deadlines for each request and TLS when configured."""

    limits: HttpLimits
    tls: ssl.SSLContext | None
    names: LimitNames
    parser_class = _Parser
    task_class = _Task
    error_task_class = _JsonErrorTask

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: dict | None = None) -> None:  # noqa: A002 - waitress's name
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        super().__init__(server, sock, addr, adj, map=map)
        # The first request's head is due header_timeout after the accept (a TLS handshake included).
        self._since = time.monotonic()  # when this connection last started to wait for a client's bytes
        self._deadline: float | None = self._since + self.limits.header_timeout
        self._in_body = False
        self._tls_up = False  # the handshake is done once the first application bytes arrive
        self._make_room()

    # -- the connection limit ------------------------------------------------------------------------
    def _make_room(self) -> None:
        channels = self.server.active_channels
        if len(channels) <= self.limits.max_connections:
            return
        waiting = [c for c in channels.values() if c is not self and c._waiting_for_client()]
        if waiting:
            victim = min(waiting, key=lambda c: c._since)
            log.debug(
                "%d connections: closing %s, waiting for its client since %.1f s",
                len(channels),
                victim.addr,
                time.monotonic() - victim._since,
            )
            victim.handle_close()
        else:
            self._answer_and_close(
                "503 Service Unavailable",
                f"all {self.limits.max_connections} connections have requests in flight (max_connections); "
                "retry shortly",
            )

    def _waiting_for_client(self) -> bool:
        """Idle between requests or still receiving one: closing it loses no work of the server's."""
        return not (
            self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed or self._in_body
        )

    # -- deadlines ---------------------------------------------------------------------------------
    def received(self, data: bytes) -> bool:
        result = super().received(data)
        partial = self.request
        if partial is None:  # between requests: the idle timeout (waitress's channel_timeout) applies
            if self._deadline is not None or self._in_body:
                self._since = time.monotonic()
            self._deadline, self._in_body = None, False
        elif not partial.headers_finished:
            if self._deadline is None:
                self._since = time.monotonic()
                self._deadline = self._since + self.limits.header_timeout
        elif not self._in_body:
            self._deadline, self._in_body = time.monotonic() + self.limits.body_timeout, True
        return result

    def readable(self) -> bool:
        # Called on every turn of the I/O loop (at least every LOOP_SECONDS): the cheapest place to check.
        if self._deadline is not None and time.monotonic() > self._deadline and not self.will_close:
            self._time_out()
        return super().readable()

    def _time_out(self) -> None:
        if self.requests or self.total_outbufs_len:  # a response is on its way: answer after it, not into it
            self._deadline = time.monotonic() + LOOP_SECONDS
            return
        self._deadline = None
        if self.tls is not None and not self._tls_up:  # no TLS session to answer in: hang up
            log.debug("closing %s: no TLS handshake within %g s", self.addr, self.limits.header_timeout)
            self.will_close = True
            return
        if self._in_body:
            message = f"the body did not arrive within {self.limits.body_timeout:g} s ({self.names.body_timeout})"
        else:
            message = (
                f"the request line and headers did not arrive within {self.limits.header_timeout:g} s "
                f"({self.names.header_timeout})"
            )
        log.debug("closing %s: %s", self.addr, message)
        self._answer_and_close("408 Request Timeout", message)

    def _answer_and_close(self, status: str, message: str) -> None:
        """Answer from the I/O thread, outside any request (there is none, or it is incomplete), and hang up."""
        body = json.dumps({"error": message}).encode()
        data = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with self.outbuf_lock:
            self.outbufs[-1].append(data)
            self.total_outbufs_len += len(data)
        self.close_when_flushed = True

    # -- TLS ----------------------------------------------------------------------------------------
    def handle_read(self) -> None:
        if self.tls is None:
            return super().handle_read()
        try:
            data = self.socket.recv(self.adj.recv_bytes)
            while data and self.socket.pending():  # a TLS record larger than recv_bytes: select will not say so
                data += self.socket.recv(self.socket.pending())
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # the handshake goes on, or a record is still arriving
        except OSError as exc:  # ssl.SSLError included: a failed handshake, plain HTTP on the TLS port
            log.debug("TLS connection from %s closed: %s", self.addr, exc)
            self.handle_close()
            return
        if not data:
            self.handle_close()
            return
        self._tls_up = True
        self.last_activity = time.time()
        self.received(data)

    def send(self, data: bytes, do_close: bool = True) -> int:
        if self.tls is None:
            return super().send(data, do_close=do_close)
        try:
            return self.socket.send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return 0  # OpenSSL wants the same bytes again when the socket is writable
        except OSError:
            if do_close:
                self.handle_close()
            return 0
