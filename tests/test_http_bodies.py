"""Request bodies on the agent's and the collector's HTTP servers: Content-Length, chunked, neither.

Raw sockets, so the tests control every byte (chunk sizes, extensions, trailers, keep-alive).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from device_agent import Agent
from tests.agent_helpers import config_of, free_port, make_device


class Raw:
    """One keep-alive connection: send raw bytes, read one response at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def request(self, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        return self.response()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", 0)))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        return self.file.read(1) == b""


def chunked(data: bytes, sizes=(7, 1, 30), *, extensions: bool = True, trailer: bool = True) -> bytes:
    out, i, n = b"", 0, 0
    while i < len(data):
        size = sizes[n % len(sizes)]
        piece, i, n = data[i : i + size], i + size, n + 1
        out += (
            f"{len(piece):x}".encode()
            + (b";name=value;flag" if extensions and n == 1 else b"")
            + b"\r\n"
            + piece
            + b"\r\n"
        )
    return out + b"0\r\n" + (b"X-Checksum: abc\r\nX-Other: 1\r\n" if trailer else b"") + b"\r\n"


def post_head(path: str, *headers: str) -> str:
    return "\n".join([f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]) + "\n"


@pytest.fixture
def agent(tmp_path, bundle, keypair):
    with Agent(config_of(make_device(tmp_path / "dev", bundle, keypair[1], window_rows=100))).start() as running:
        yield running


@pytest.fixture
def raw_agent(agent):
    conn = Raw(agent.server.server_address[1])
    yield conn
    conn.close()


@pytest.fixture
def small_agent(tmp_path, bundle, keypair):
    """An agent whose [server] max_body_bytes is 64."""
    with Agent(
        config_of(make_device(tmp_path / "dev", bundle, keypair[1], server={"max_body_bytes": 64}))
    ).start() as running:
        conn = Raw(running.server.server_address[1])
        yield conn
        conn.close()


PREDICT = "/v1/models/digits:predict"


def predict_body(digits, rows=slice(0, 3)) -> bytes:
    return json.dumps({"instances": np.load(digits.test)["X"][rows].tolist()}).encode()


def test_chunked_predict_is_answered_like_content_length_and_the_connection_stays_open(raw_agent, digits):
    body = predict_body(digits)
    status, _, plain = raw_agent.request(post_head(PREDICT, f"Content-Length: {len(body)}"), body)
    assert status == 200
    status, headers, answer = raw_agent.request(post_head(PREDICT, "Transfer-Encoding: chunked"), chunked(body))
    assert status == 200 and headers.get("connection", "").lower() != "close"
    assert json.loads(answer)["predictions"] == json.loads(plain)["predictions"]
    # two more requests on the same connection after the chunked one: the trailer was read to its end
    status, _, again = raw_agent.request(
        post_head(PREDICT, "Transfer-Encoding: chunked"),
        chunked(body, sizes=(len(body),), extensions=False, trailer=False),
    )
    assert status == 200 and json.loads(again)["predictions"] == json.loads(plain)["predictions"]
    status, _, health = raw_agent.request("GET /healthz HTTP/1.1\nHost: 127.0.0.1\n")
    assert status == 200 and json.loads(health)["status"] == "ok"


def test_chunked_body_over_the_limit_is_413_before_the_rest_is_read(small_agent):
    raw_agent = small_agent
    # 40 + 40 passes 64 at the second chunk; the third chunk and the terminator are never sent
    start = b"28\r\n" + b"[" * 40 + b"\r\n" + b"28\r\n"
    status, headers, body = raw_agent.request(post_head(PREDICT, "Transfer-Encoding: chunked"), start)
    assert status == 413 and "64-byte limit" in json.loads(body)["error"]
    assert headers.get("connection", "").lower() == "close" and raw_agent.closed_by_server()


def test_a_content_length_over_the_limit_is_413(small_agent):
    raw_agent = small_agent
    status, _, body = raw_agent.request(post_head(PREDICT, "Content-Length: 65"))
    assert status == 413 and "65 bytes" in json.loads(body)["error"]


def test_a_post_without_length_or_chunked_is_411_naming_the_fix(raw_agent):
    status, headers, body = raw_agent.request(post_head(PREDICT))
    error = json.loads(body)["error"]
    assert status == 411 and "Content-Length" in error and "Transfer-Encoding: chunked" in error
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "bad",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # not hex
        b"2\r\n{}XX0\r\n\r\n",  # no CRLF after the data
        b"\r\n{}\r\n0\r\n\r\n",  # empty size
        b"2\r\n{}\r\n0\r\nno-colon\r\n\r\n",  # malformed trailer
        b"-2\r\n{}\r\n0\r\n\r\n",
    ],
)  # negative
def test_a_malformed_chunk_is_400(raw_agent, bad):
    status, _, body = raw_agent.request(post_head(PREDICT, "Transfer-Encoding: chunked"), bad)
    error = json.loads(body)["error"]
    assert status == 400 and ("chunk" in error or "trailer" in error), error


def test_unsupported_codings_and_both_framings_are_refused(raw_agent, agent):
    status, _, _ = raw_agent.request(post_head(PREDICT, "Transfer-Encoding: gzip, chunked"), b"0\r\n\r\n")
    assert status == 501
    other = Raw(agent.server.server_address[1])
    try:
        status, _, _ = other.request(
            post_head(PREDICT, "Content-Length: 6", "Transfer-Encoding: chunked"), b"0\r\n\r\n"
        )
        assert status == 400
    finally:
        other.close()


# --- the collector ---------------------------------------------------------------------------------


class FakeRollouts:
    def __init__(self) -> None:
        self.uploads: list[bytes] = []

    def add_bundle(self, data: bytes) -> dict:
        self.uploads.append(data)
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def pause(self, rollout_id: str) -> dict:
        return {"id": rollout_id, "state": "paused"}


@contextlib.contextmanager
def running_collector(**limits):
    from edgekit.fleet.web import COLLECTOR_LIMITS, serve

    rollouts = FakeRollouts()
    server = serve(
        SimpleNamespace(rollouts=rollouts, store=None, alerts=None, config=SimpleNamespace(api_token=None)),
        f"127.0.0.1:{free_port()}",
        limits=replace(COLLECTOR_LIMITS, **limits) if limits else COLLECTOR_LIMITS,
    )
    conn = Raw(server.server_address[1])
    try:
        yield SimpleNamespace(conn=conn, rollouts=rollouts, port=server.server_address[1])
    finally:
        conn.close()
        server.shutdown()


@pytest.fixture
def collector():
    with running_collector() as running:
        yield running


def test_collector_takes_a_chunked_upload_and_keeps_the_connection(collector):
    data = bytes(range(256)) * 40
    status, _, body = collector.conn.request(
        post_head("/api/bundles", "Transfer-Encoding: chunked"), chunked(data, sizes=(1000, 3, 4096))
    )
    assert status == 201 and json.loads(body) == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert collector.rollouts.uploads == [data]
    status, _, body = collector.conn.request(post_head("/api/rollouts/r-1/pause", "Content-Length: 0"))
    assert status == 200 and json.loads(body)["state"] == "paused"
    status, _, body = collector.conn.request(
        post_head("/api/rollouts/r-2/pause", "Transfer-Encoding: chunked"), b"0\r\n\r\n"
    )
    assert status == 200 and json.loads(body)["id"] == "r-2"


def test_collector_chunked_upload_over_the_limit_is_413():
    with running_collector(max_body_bytes=100) as collector:
        status, _, body = collector.conn.request(
            post_head("/api/bundles", "Transfer-Encoding: chunked"), b"50\r\n" + b"x" * 80 + b"\r\n50\r\n"
        )
        assert status == 413 and "100-byte limit" in json.loads(body)["error"]
        assert collector.conn.closed_by_server() and collector.rollouts.uploads == []


def test_collector_post_without_length_is_411_and_malformed_chunk_is_400(collector):
    status, _, body = collector.conn.request(post_head("/api/bundles"))
    assert status == 411 and "Transfer-Encoding: chunked" in json.loads(body)["error"]
    conn = Raw(collector.port)
    try:  # the client gives up mid-chunk: the incomplete request is dropped and the connection closed
        conn.sock.sendall(
            post_head("/api/bundles", "Transfer-Encoding: chunked").replace("\n", "\r\n").encode() + b"\r\n5\r\nab"
        )
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.closed_by_server()
    finally:
        conn.close()
    conn = Raw(collector.port)
    try:
        status, _, body = conn.request(
            post_head("/api/bundles", "Transfer-Encoding: chunked"), b"g\r\nabc\r\n0\r\n\r\n"
        )
        assert status == 400 and "chunk size" in json.loads(body)["error"].lower()
    finally:
        conn.close()
    assert collector.rollouts.uploads == []
