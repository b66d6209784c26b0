#!/usr/bin/env python3
"""The agent's HTTP server against the standard library's (and cheroot, the other candidate): a table and JSON.

Each server runs the agent's real routes (``device_agent.server.route``) on the digits model in a
process of its own, so its threads and RSS are its own:

- ``stdlib``: ``ThreadingHTTPServer`` with an HTTP/1.1 handler (what the agent ran before), the baseline
- ``waitress``: the agent as shipped (``edge-agent run``: device_agent.httpserver)
- ``cheroot``: cheroot's WSGI server with 4 threads (skipped unless ``pip install cheroot``)

Figures, as ratios against the baseline measured in the same run (rounds interleaved):
- one-row predict over loopback on one keep-alive connection: mean and p50 latency
- requests per second with 16 concurrent keep-alive clients (in a client process of their own)
- 1,000 half-open connections (a request line, then nothing): the server's threads and RSS during
  the attack and 10 s after it ends, and /healthz latency on a fresh connection during it
- the server's idle RSS, and the install size and wheel tags of each library
- the cost of one hand-off between two threads on this machine (waitress makes two a request)

    python scripts/bench_http.py [--quick] [--out bench-results/bench_http.json]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import io
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PREDICT = "/v1/models/digits:predict"
TARGETS = {
    "latency_ratio_max": 1.0,
    "threads_over_limit_max": 8,
    "rss_extra_mb_max": 10.0,
    "healthz_under_attack_ms_max": 100.0,
}
LIMIT = 100  # the agent's default max_connections


# --- the server process --------------------------------------------------------------------------------


def serve(kind: str, config_path: str, port_file: str) -> None:
    """Run one kind of server on the agent's routes until killed; write its port to ``port_file``."""
    from device_agent import Agent
    from device_agent.config import load_config
    from device_agent.server import route
    from device_agent.wsgi import wsgi_app

    config = load_config(config_path)
    agent = Agent(config).start(http=(kind == "waitress"), mqtt=False)
    app = wsgi_app(lambda request: route(agent, config.server, request))
    if kind == "waitress":
        port = agent.server.server_address[1]
    elif kind == "stdlib":
        server = _stdlib_server(app)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
    else:
        from cheroot.wsgi import Server

        server = Server(("127.0.0.1", 0), app, numthreads=4, timeout=10)
        server.prepare()
        threading.Thread(target=server.serve, daemon=True).start()
        port = server.bind_addr[1]
    Path(port_file).write_text(str(port))
    threading.Event().wait()


def _stdlib_server(app):
    """The standard library's threading server with an HTTP/1.1 handler over the same WSGI app."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def handle_one(self):
            length = self.headers.get("Content-Length")
            environ = {
                "REQUEST_METHOD": self.command,
                "PATH_INFO": self.path.split("?")[0],
                "QUERY_STRING": "",
                "wsgi.input": io.BytesIO(self.rfile.read(int(length)) if length else b""),
                **({"CONTENT_LENGTH": length} if length else {}),
                **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in self.headers.items()},
            }
            if "Content-Type" in self.headers:
                environ["CONTENT_TYPE"] = self.headers["Content-Type"]
            captured = {}
            body = b"".join(app(environ, lambda status, headers: captured.update(status=status, headers=headers)))
            self.send_response(int(captured["status"].split()[0]))
            for name, value in captured["headers"]:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = handle_one

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


class ServerProcess:
    def __init__(self, kind: str, config: Path, work: Path) -> None:
        port_file = work / f"{kind}.port"
        port_file.unlink(missing_ok=True)
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, str(config), str(port_file)], stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {kind} server did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def threads(self) -> int:
        return self.status("Threads")

    def rss_mb(self) -> float:
        return self.status("VmRSS") / 1024

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


# --- the measurements -------------------------------------------------------------------------------


def latency_us(port: int, body: bytes, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        conn.request("POST", PREDICT, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        times.append((time.perf_counter() - start) * 1e6)
        assert response.status == 200
    conn.close()
    return times


def throughput(port: int, body: bytes, clients: int, seconds: float) -> float:
    """Requests a second from ``clients`` keep-alive connections, driven by a separate process."""
    code = (
        f"import http.client, threading, time\nbody = {body!r}\ncount = [0]\nend = time.monotonic() + {seconds}\n"
        "def run():\n"
        f"    c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=30)\n"
        "    n = 0\n"
        "    while time.monotonic() < end:\n"
        f"        c.request('POST', {PREDICT!r}, body, {{'Content-Type': 'application/json'}}); "
        "c.getresponse().read(); n += 1\n"
        "    count[0] += n\n"
        f"threads = [threading.Thread(target=run) for _ in range({clients})]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\nprint(count[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout) / seconds


def healthz_ms(port: int, timeout: float = 10) -> float:
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        conn.close()
    except OSError:
        return timeout * 1000  # no answer in time
    return (time.perf_counter() - start) * 1000


def half_open(server: ServerProcess, connections: int, hold: float) -> dict:
    """``connections`` clients that send a request line and stop; the server's cost during and after."""
    threads_before, rss_before = server.threads(), server.rss_mb()
    socks = []
    for _ in range(connections):
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n")
            socks.append(sock)
        except OSError:
            break
    health, peak_threads, peak_rss = [], 0, 0.0
    end = time.monotonic() + hold
    while time.monotonic() < end:
        health.append(healthz_ms(server.port, timeout=5))
        peak_threads, peak_rss = max(peak_threads, server.threads()), max(peak_rss, server.rss_mb())
        time.sleep(0.2)
    for sock in socks:
        sock.close()
    time.sleep(10)
    return {
        "connections": len(socks),
        "threads_before": threads_before,
        "threads_peak": peak_threads,
        "threads_after_10s": server.threads(),
        "rss_before_mb": rss_before,
        "rss_peak_mb": peak_rss,
        "rss_after_10s_mb": server.rss_mb(),
        "healthz_max_ms": max(health),
        "healthz_median_ms": statistics.median(health),
    }


def thread_handoff_us(n: int = 20000) -> float:
    """One wake-up of another thread and back, halved: what each hand-off between waitress's I/O
    thread and a worker costs on this machine (the standard library's server makes none)."""
    ping, pong = threading.Semaphore(0), threading.Semaphore(0)

    def other() -> None:
        for _ in range(n):
            ping.acquire()
            pong.release()

    threading.Thread(target=other, daemon=True).start()
    start = time.perf_counter()
    for _ in range(n):
        ping.release()
        pong.acquire()
    return (time.perf_counter() - start) / n / 2 * 1e6


def library_facts(name: str, deps: tuple[str, ...]) -> dict:
    size, tags = 0, []
    for dist_name in (name, *deps):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return {"installed": False}
        size += sum(f.size or 0 for f in dist.files or ())
        tags += [
            line.split(":", 1)[1].strip()
            for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")
        ]
    return {
        "installed": True,
        "install_kb": size / 1024,
        "wheel_tags": sorted(set(tags)),
        "version": importlib.metadata.version(name),
    }


def setup(work: Path) -> tuple[Path, bytes]:
    from bench_agent import setup as bench_setup

    paths = bench_setup(work)
    from device_agent.signing import load_public_key
    from device_agent.state import StateDir

    StateDir(work / "state").install(paths["bundle"], load_public_key(paths["public"]))
    config = work / "agent.toml"
    config.write_text(
        f'device_id = "bench"\nstate_dir = "{work / "state"}"\n[trust]\npublic_key = "{paths["public"]}"\n'
        '[server]\nlisten = "127.0.0.1:0"\n[monitor]\nwindow_rows = 1000\n'
    )
    body = json.dumps({"instances": np.load(paths["test"])["X"][:1].tolist()}).encode()
    return config, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "bench_http.json"))
    parser.add_argument("--quick", action="store_true", help="fewer requests and a shorter attack (a smoke run)")
    parser.add_argument(
        "--with-cheroot",
        choices=("auto", "no"),
        default="auto",
        help="compare cheroot too when it is installed (default)",
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    kinds = ["stdlib", "waitress"] + (
        ["cheroot"] if args.with_cheroot == "auto" and library_facts("cheroot", ())["installed"] else []
    )
    requests, rounds, seconds, hold = (300, 2, 2.0, 3.0) if args.quick else (1500, 4, 5.0, 8.0)
    results: dict = {"kinds": kinds, "thread_handoff_us": thread_handoff_us()}
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-http-") as tmp:
        work = Path(tmp)
        config, body = setup(work)
        servers = {kind: ServerProcess(kind, config, work) for kind in kinds}
        try:
            for server in servers.values():
                latency_us(server.port, body, 200)  # warm up
            samples: dict[str, list[float]] = {kind: [] for kind in kinds}
            for _ in range(rounds):  # interleaved, so the machine's noise falls on every kind alike
                for kind, server in servers.items():
                    samples[kind] += latency_us(server.port, body, requests)
            for kind, server in servers.items():
                results[kind] = {
                    "latency_mean_us": statistics.fmean(samples[kind]),
                    "latency_p50_us": statistics.median(samples[kind]),
                    "rps_16_clients": throughput(server.port, body, 16, seconds),
                    "idle_rss_mb": server.rss_mb(),
                }
            for kind, server in servers.items():
                results[kind]["half_open"] = half_open(server, 1000, hold)
        finally:
            for server in servers.values():
                server.stop()
    results["libraries"] = {
        "waitress": library_facts("waitress", ()),
        "cheroot": library_facts("cheroot", ("jaraco.functools", "more-itertools")),
    }
    return report(results, args.out)


def report(results: dict, out: str) -> int:
    from bench_report import print_checks, write_json

    base, new = results["stdlib"], results["waitress"]
    attack = new["half_open"]
    checks = [
        (
            "one-row predict, keep-alive: waitress / stdlib mean latency",
            new["latency_mean_us"] / base["latency_mean_us"],
            f"≤ {TARGETS['latency_ratio_max']}",
            new["latency_mean_us"] / base["latency_mean_us"] <= TARGETS["latency_ratio_max"],
        ),
        (
            "one-row predict, keep-alive: waitress / stdlib p50 latency",
            new["latency_p50_us"] / base["latency_p50_us"],
            "info",
            True,
        ),
        (
            "16 keep-alive clients: waitress / stdlib requests per second",
            new["rps_16_clients"] / base["rps_16_clients"],
            "info",
            True,
        ),
        (
            "1,000 half-open: agent threads during, over the connection limit",
            attack["threads_peak"] - LIMIT,
            f"≤ {TARGETS['threads_over_limit_max']}",
            attack["threads_peak"] - LIMIT <= TARGETS["threads_over_limit_max"],
        ),
        (
            "1,000 half-open: agent RSS during, above before (MB)",
            attack["rss_peak_mb"] - attack["rss_before_mb"],
            f"≤ {TARGETS['rss_extra_mb_max']}",
            attack["rss_peak_mb"] - attack["rss_before_mb"] <= TARGETS["rss_extra_mb_max"],
        ),
        (
            "1,000 half-open: agent RSS 10 s after, above before (MB)",
            attack["rss_after_10s_mb"] - attack["rss_before_mb"],
            f"≤ {TARGETS['rss_extra_mb_max']}",
            attack["rss_after_10s_mb"] - attack["rss_before_mb"] <= TARGETS["rss_extra_mb_max"],
        ),
        (
            "1,000 half-open: /healthz worst latency during (ms)",
            attack["healthz_max_ms"],
            f"≤ {TARGETS['healthz_under_attack_ms_max']:g}",
            attack["healthz_max_ms"] <= TARGETS["healthz_under_attack_ms_max"],
        ),
    ]
    print_checks(checks)
    print()
    columns = ("latency_mean_us", "latency_p50_us", "rps_16_clients", "idle_rss_mb")
    print(
        f"{'server':10}"
        + "".join(f"{c:>17}" for c in columns)
        + f"{'threads b/peak/after':>22}{'RSS b/peak/after MB':>22}{'healthz max ms':>16}"
    )
    for kind in results["kinds"]:
        r, h = results[kind], results[kind]["half_open"]
        print(
            f"{kind:10}"
            + "".join(f"{r[c]:>17.1f}" for c in columns)
            + f"{h['threads_before']:>8}/{h['threads_peak']}/{h['threads_after_10s']:<8}".rjust(22)
            + f"{h['rss_before_mb']:.0f}/{h['rss_peak_mb']:.0f}/{h['rss_after_10s_mb']:.0f}".rjust(22)
            + f"{h['healthz_max_ms']:>16.0f}"
        )
    extra = new["latency_p50_us"] - base["latency_p50_us"]
    print(
        f"waitress adds {extra:.0f} µs at p50; "
        f"one hand-off between two threads costs {results['thread_handoff_us']:.0f} µs here, "
        "and waitress makes two a request (I/O thread to worker, worker back to the I/O thread)"
    )
    for name, facts in results["libraries"].items():
        if facts["installed"]:
            print(
                f"{name} {facts['version']}: {facts['install_kb']:.0f} KB installed (with dependencies), "
                f"wheels {', '.join(facts['wheel_tags'])}"
            )
    write_json(out, checks, targets=TARGETS, results=results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:])
    else:
        raise SystemExit(main())
