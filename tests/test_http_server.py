"""The HTTP server under attack and at its edges: slowloris, floods, deadlines, lying lengths, TLS, HTTP/1.1.

The attack tests run the agent as its own process (``edge-agent run``), so its thread count and RSS
are read from /proc without the test's own threads in them, and the attackers do not share its GIL.
Limits are set small ([server] in agent.toml) so each test takes seconds.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent import Agent
from device_agent.config import HttpLimits
from device_agent.httpserver import serve_wsgi
from device_agent.wsgi import Response, json_response, wsgi_app
from tests.agent_helpers import config_of, make_device

pytestmark = pytest.mark.network
PREDICT = "/v1/models/digits:predict"


# --- helpers ---------------------------------------------------------------------------------------


class AgentProcess:
    """``python -m device_agent run`` on a free port; its threads and RSS from /proc."""

    def __init__(self, config: Path) -> None:
        self.state = config.parent / "state"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not (self.state / "http.json").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not start: {self.process.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.1)  # http.json is written once the server listens
        self.port = json.loads((self.state / "http.json").read_text())["port"]

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(field)

    def threads(self) -> int:
        return self._status("Threads")

    def rss_mb(self) -> float:
        return self._status("VmRSS") / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()


@pytest.fixture
def agent_process(tmp_path, bundle, keypair):
    started = []

    def start(**server) -> AgentProcess:
        config = make_device(tmp_path / f"dev{len(started)}", bundle, keypair[1], server=server)
        started.append(AgentProcess(config))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def healthz_seconds(port: int, *, context: ssl.SSLContext | None = None) -> float:
    """One GET /healthz on a new connection: the seconds to a 200."""
    start = time.monotonic()
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        if context
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    )
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    finally:
        conn.close()
    return time.monotonic() - start


@pytest.fixture(autouse=True)
def close_raw_sockets(monkeypatch):
    """Every raw socket a test opens is closed at its end (unclosed ones would fail the run as ResourceWarnings)."""
    opened = []
    real = socket.create_connection

    def create_connection(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield
    for sock in opened:
        sock.close()


def read_response(sock: socket.socket, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """Read one response (head and Content-Length body) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed after {data!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def closed(sock: socket.socket, timeout: float = 15) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (no network, no openssl binary)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# --- attacks ---------------------------------------------------------------------------------------


def test_slowloris_costs_no_threads_little_memory_and_healthz_keeps_answering(agent_process):
    agent = agent_process(max_connections=60, header_timeout=4)
    threads_before, rss_before = agent.threads(), agent.rss_mb()
    attackers = []
    for _ in range(200):  # more half-open connections than the limit, each trickling its request line
        sock = socket.create_connection(("127.0.0.1", agent.port))
        sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        attackers.append(sock)
    latencies, peak_threads, peak_rss = [], 0, 0.0
    end = time.monotonic() + 8
    while time.monotonic() < end:
        for sock in attackers:
            try:
                sock.send(b"X")  # one byte a turn: resets any idle timer, never finishes the head
            except OSError:
                pass  # closed by the server: evicted or timed out
        latencies.append(healthz_seconds(agent.port))
        peak_threads, peak_rss = max(peak_threads, agent.threads()), max(peak_rss, agent.rss_mb())
        time.sleep(0.25)
    for sock in attackers:
        sock.close()
    # 4 request threads + 1 I/O thread, made at start: the attack adds none
    assert peak_threads <= threads_before + 1, (threads_before, peak_threads)
    assert peak_rss - rss_before < 15, (rss_before, peak_rss)
    # The figure is 100 ms (scripts/bench_http.py measures it); a shared CI machine gets some slack here.
    assert max(latencies) < 0.5 and float(np.median(latencies)) < 0.1, latencies


def test_a_connection_flood_past_the_limit_closes_the_idle_ones_and_serves_new_clients(agent_process):
    agent = agent_process(max_connections=20)
    threads_before = agent.threads()
    flood = [socket.create_connection(("127.0.0.1", agent.port)) for _ in range(100)]  # connect, send nothing
    time.sleep(0.5)
    assert healthz_seconds(agent.port) < 1
    dropped = sum(closed(sock, timeout=0.2) for sock in flood)
    assert dropped >= 100 - 20, dropped  # the oldest idle connections made room
    assert agent.threads() <= threads_before + 1
    for sock in flood:
        sock.close()


def test_a_head_that_never_ends_gets_408_after_header_timeout(agent_process):
    agent = agent_process(header_timeout=1.5)
    sock = socket.create_connection(("127.0.0.1", agent.port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    status, headers, body = read_response(sock)
    assert status == 408 and headers["connection"] == "close" and "header_timeout" in json.loads(body)["error"]
    assert 1.0 < time.monotonic() - start < 5
    assert closed(sock)


def test_a_lying_content_length_gets_408_after_body_timeout_and_an_overlong_one_no_more_than_the_limit(agent_process):
    agent = agent_process(body_timeout=1.5, max_body_bytes=4096)
    sock = socket.create_connection(("127.0.0.1", agent.port))
    sock.sendall(
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"inst'
    )
    status, _, body = read_response(sock)
    assert status == 408 and "body_timeout" in json.loads(body)["error"]
    # Content-Length under the limit, then megabytes more: the rest is parsed as the next request's head and refused
    rss_before = agent.rss_mb()
    sock = socket.create_connection(("127.0.0.1", agent.port))
    sock.sendall(
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    status, _, _ = read_response(sock)
    assert status == 400  # {} has no instances
    try:
        sock.sendall(b"x" * (8 << 20))
    except OSError:
        pass  # refused and closed before all of it was sent
    assert closed(sock)
    assert agent.rss_mb() - rss_before < 15


def test_a_chunked_body_past_the_limit_is_413_at_the_chunk_that_passes_it(agent_process):
    agent = agent_process(max_body_bytes=4096)
    sock = socket.create_connection(("127.0.0.1", agent.port))
    sock.sendall(
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"800\r\n"
        + b"[" * 2048
        + b"\r\n"
        + b"100000\r\n"
    )  # 2 KiB, then a chunk that says 1 MiB
    status, headers, body = read_response(sock)
    assert (
        status == 413
        and "4096-byte limit" in json.loads(body)["error"]
        and "max_body_bytes" in json.loads(body)["error"]
    )
    assert headers["connection"] == "close" and closed(sock)


def test_503_when_every_connection_has_a_request_in_flight():
    release = threading.Event()

    def slow(request):
        release.wait(20)
        return json_response({"ok": True})

    server = serve_wsgi(wsgi_app(slow), ("127.0.0.1", 0), limits=HttpLimits(max_connections=2, threads=2))
    try:
        busy = [socket.create_connection(server.server_address) for _ in range(2)]
        for sock in busy:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)
        extra = socket.create_connection(server.server_address)
        status, headers, body = read_response(extra)
        assert status == 503 and "max_connections" in json.loads(body)["error"] and closed(extra)
        release.set()
        assert all(read_response(sock)[0] == 200 for sock in busy)  # the requests in flight were not cut
    finally:
        release.set()
        server.shutdown()


# --- HTTP/1.1 done right -----------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path, bundle, keypair):
    with Agent(config_of(make_device(tmp_path / "dev", bundle, keypair[1], server={"max_rows": 5}))).start() as running:
        yield running


def test_keep_alive_reuses_one_connection(agent, digits):
    conn = http.client.HTTPConnection("127.0.0.1", agent.server.server_address[1], timeout=10)
    body = json.dumps({"instances": np.load(digits.test)["X"][:1].tolist()})
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    sock = conn.sock
    for _ in range(30):
        conn.request("POST", PREDICT, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["predictions"]
    assert conn.sock is sock  # never reconnected
    conn.close()


def test_expect_100_continue_head_and_the_4xx_answers(agent, digits):
    port = agent.server.server_address[1]
    body = json.dumps({"instances": np.load(digits.test)["X"][:2].tolist()}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
    )
    sock.settimeout(10)
    assert sock.recv(25).startswith(b"HTTP/1.1 100 Continue")
    sock.sendall(body)
    assert read_response(sock)[0] == 200
    sock.close()

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def ask(method, path, body=None, headers=None):
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    status, headers, data = ask("HEAD", "/healthz")
    assert status == 200 and data == b"" and int(headers["Content-Length"]) > 0
    assert ask("GET", "/nowhere")[0] == 404
    status, headers, _ = ask("GET", PREDICT)
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = ask("DELETE", "/metrics")
    assert status == 405 and headers["Allow"] == "GET"
    status, _, data = ask("POST", PREDICT, "a,b\n1,2\n", {"Content-Type": "text/csv"})
    assert status == 415 and "application/json" in json.loads(data)["error"]
    status, _, data = ask(
        "POST",
        PREDICT,
        json.dumps({"instances": np.load(digits.test)["X"][:6].tolist()}),
        {"Content-Type": "application/json"},
    )
    assert status == 413 and "max_rows" in json.loads(data)["error"]
    status, _, data = ask("POST", PREDICT, "{", {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in json.loads(data)["error"]
    conn.close()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * (70 << 10) + b"\r\n\r\n"
    )
    status, _, data = read_response(sock)
    assert status == 431 and "max_header_bytes" in json.loads(data)["error"]


def test_tls_with_a_self_signed_certificate(tmp_path, bundle, keypair, digits, agent_process):
    cert, key = self_signed(tmp_path)
    agent = agent_process(tls_cert=str(cert), tls_key=str(key), header_timeout=2)
    context = ssl.create_default_context(cafile=str(cert))
    stalled = socket.create_connection(("127.0.0.1", agent.port))  # a TLS handshake that never starts
    assert healthz_seconds(agent.port, context=context) < 2  # others are served meanwhile
    conn = http.client.HTTPSConnection("127.0.0.1", agent.port, context=context, timeout=10)
    body = json.dumps({"instances": np.load(digits.test)["X"][:3].tolist()})
    for _ in range(3):  # keep-alive over TLS
        conn.request("POST", PREDICT, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 3
    conn.close()
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the certificate
        healthz_seconds(agent.port, context=ssl.create_default_context())
    plain = socket.create_connection(("127.0.0.1", agent.port))  # plain HTTP on the TLS port
    plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed(plain)
    assert closed(stalled, timeout=10)  # header_timeout covers the handshake
    assert healthz_seconds(agent.port, context=context) < 2


def test_tls_config_needs_both_files_and_readable_ones(tmp_path, bundle, keypair):
    from device_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="tls_cert or tls_key but not both"):
        config_of(make_device(tmp_path / "a", bundle, keypair[1], server={"tls_cert": "cert.pem"}))
    (tmp_path / "bad.pem").write_text("not a certificate")
    config = config_of(
        make_device(
            tmp_path / "b",
            bundle,
            keypair[1],
            server={"tls_cert": str(tmp_path / "bad.pem"), "tls_key": str(tmp_path / "bad.pem")},
        )
    )
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        Agent(config).start(mqtt=False)


def test_limits_are_checked_when_the_config_is_read(tmp_path, bundle, keypair):
    from device_agent.errors import ConfigError

    for index, value in enumerate((0, True, "inf", "soon")):
        with pytest.raises(ConfigError, match=r"\[server\] header_timeout must be a positive number of seconds"):
            config_of(make_device(tmp_path / f"a{index}", bundle, keypair[1], server={"header_timeout": value}))
    with pytest.raises(ConfigError, match="max_connections must be a positive whole number, not 1.5"):
        config_of(make_device(tmp_path / "c", bundle, keypair[1], server={"max_connections": 1.5}))
    with pytest.raises(ConfigError, match="has no setting 'header_timot'.*header_timeout"):
        config_of(make_device(tmp_path / "d", bundle, keypair[1], server={"header_timot": 5}))
    limits = config_of(
        make_device(tmp_path / "b", bundle, keypair[1], server={"max_connections": 7, "idle_timeout": 2.5})
    ).server.limits
    assert (limits.max_connections, limits.idle_timeout, limits.header_timeout) == (7, 2.5, 10.0)
    with pytest.raises(ValueError, match="unknown HTTP limit 'max_conections'"):
        HttpLimits().with_values({"max_conections": 3})
    assert HttpLimits().with_values({"threads": "8", "max_body_bytes": "1e6"}).max_body_bytes == 1_000_000
    with pytest.raises(ValueError, match="threads must be a positive whole number, not 'abc'"):
        HttpLimits().with_values({"threads": "abc"})


def test_a_route_that_raises_is_a_json_500_and_the_server_goes_on(caplog):
    def broken(request):
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return Response(200, b"fine", "text/plain")

    server = serve_wsgi(wsgi_app(broken), ("127.0.0.1", 0))
    try:
        conn = http.client.HTTPConnection(*server.server_address, timeout=10)
        conn.request("GET", "/boom")
        response = conn.getresponse()
        assert response.status == 500 and "log" in json.loads(response.read())["error"]
        conn.request("GET", "/ok")
        assert conn.getresponse().read() == b"fine"
    finally:
        server.shutdown()
    assert any("a bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_the_collector_serves_https_with_its_own_limits(tmp_path):
    from types import SimpleNamespace

    from edgekit.fleet.web import COLLECTOR_LIMITS, serve

    cert, key = self_signed(tmp_path)
    server = serve(
        SimpleNamespace(alerts=None, store=None, rollouts=None, config=SimpleNamespace(api_token=None)),
        "127.0.0.1:0",
        limits=COLLECTOR_LIMITS.with_values({"max_header_bytes": 4096}),
        tls_cert=str(cert),
        tls_key=str(key),
    )
    try:
        assert server.scheme == "https"
        conn = http.client.HTTPSConnection(
            *server.server_address, context=ssl.create_default_context(cafile=str(cert)), timeout=10
        )
        conn.request("GET", "/api/alerts")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == []
        conn.request("GET", "/api/alerts", headers={"X-Big": "a" * 5000})
        response = conn.getresponse()
        assert response.status == 431 and "--http-limit max_header_bytes" in json.loads(response.read())["error"]
        conn.close()
    finally:
        server.shutdown()


def test_fleet_collect_checks_its_http_options(cli, tmp_path):
    result = cli("fleet", "collect", "--http-limit", "max_conections=3", "--duration", "0")
    assert result.exit_code == 2 and "unknown HTTP limit 'max_conections'" in result.output
    result = cli("fleet", "collect", "--http-limit", "header_timeout", "--duration", "0")
    assert result.exit_code == 2 and "NAME=VALUE" in result.output
    cert, _ = self_signed(tmp_path)
    result = cli("fleet", "collect", "--tls-cert", str(cert), "--duration", "0")
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output
