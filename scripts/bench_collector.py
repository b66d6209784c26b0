#!/usr/bin/env python3
"""Measure the fleet collector; print a table and write JSON.

1. Store ingest: 64-feature summaries (made by the device's own code) from 1,000 device ids,
   handed to the collector's ingest in batches: summaries stored per second in SQLite (or
   PostgreSQL with ``--db``).
2. End to end: Mosquitto, ``edgekit fleet collect --workers 3`` (and 2, and 1, and two
   collector commands in one group) in their own processes, and load generators
   (``bench_publisher.py``: pre-encoded QoS 1 PUBLISH packets, so they take little of the two
   cores real devices would not share) sending the same summaries as fast as the broker takes
   them: stored per second.
3. Sustained: publishers at a steady rate for ``--duration`` seconds (600 for the full 10-minute
   check) while the collector's RSS is sampled: growth from the first to the last quarter.

    python scripts/bench_collector.py [--duration 60] [--db sqlite|postgres|postgresql://...]
                                      [--out bench-results/bench_collector.json]

``--db postgres`` starts a throwaway PostgreSQL server (Debian's postgresql, edgekit/local/postgres.py)
for the run; a ``postgresql://`` URL uses that server, creating a database per run (it needs CREATEDB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import print_checks, write_json

from device_agent.drift import drift_report
from device_agent.monitor import ClosedWindow
from device_agent.profile import build_baseline
from device_agent.protocol import build_summary
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.store import is_postgres_url, open_store

DEVICES = 1000
FEATURES = 64
TARGETS = {"ingest_per_second_min": 5000}


def templates(count: int = 20) -> list[str]:
    """Summary payloads with placeholder device and seq, from real windows on a 64-feature baseline."""
    rng = np.random.default_rng(0)
    names = [f"feature_{i:02d}" for i in range(FEATURES)]
    base = build_baseline(
        rng.normal(size=(20000, FEATURES)),
        names,
        labels=list(range(10)),
        predicted_labels=rng.integers(0, 10, 20000),
        probabilities=rng.dirichlet(np.ones(10), 20000),
    )
    out = []
    for i in range(count):
        window = base.empty_like()
        window.update_inputs(rng.normal(loc=0.05 * (i % 3), size=(1000, FEATURES)))
        window.update_outputs(labels=rng.integers(0, 10, 1000), probabilities=rng.dirichlet(np.ones(10), 1000))
        closed = ClosedWindow(
            window, 1.7e9 + i, 1.7e9 + i + 60, np.full(1000, 0.02), {}, drift=drift_report(base, window)
        )
        doc = build_summary(
            closed,
            device="D",
            fleet="bench",
            model={"name": "bench", "version": 1},
            seq=0,
        )
        out.append(json.dumps(doc, separators=(",", ":")))
    return out


def payload(template: str, index: int) -> tuple[str, bytes]:
    device, seq = index % DEVICES, index // DEVICES + 1
    text = template.replace('"device":"D"', f'"device":"dev{device:04d}"').replace('"seq":0', f'"seq":{seq}')
    return f"edgekit/v1/bench/dev{device:04d}/summary", text.encode()


class Databases:
    """A fresh fleet database per run: a SQLite file in ``work``, or a new database on a PostgreSQL server."""

    def __init__(self, work: Path, kind: str) -> None:
        self.work, self.kind, self.server = work, kind, None
        if kind == "postgres":
            from edgekit.local.postgres import LocalPostgres

            self.server = LocalPostgres().start()
            self.kind = self.server.url

    @property
    def label(self) -> str:
        return "SQLite" if self.kind == "sqlite" else "PostgreSQL"

    def new(self, name: str) -> str:
        if self.kind == "sqlite":
            return str(self.work / f"{name}.db")
        import psycopg

        database = f"edgekit_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.kind, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {database}")
        return self.kind.rsplit("/", 1)[0] + "/" + database

    def drop(self, db: str) -> None:
        """Drop a finished part's database, so that the server's autovacuum of it does not take the next part's
        CPU (each part writes a few hundred MB)."""
        if self.kind == "sqlite" or self.server is None:
            return
        import psycopg

        with psycopg.connect(self.kind, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {db.rsplit('/', 1)[1]} WITH (FORCE)")

    def server_pid(self) -> int | None:
        """The local PostgreSQL server's postmaster (its backends are its children), for its CPU time."""
        if self.server is None:
            return None
        return int((self.server.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def bench_store(databases: Databases, docs: list[str], count: int = 20000) -> dict:
    db = databases.new("store-bench")
    messages = [Message(*payload(docs[i % len(docs)], i), 0.0) for i in range(count)]
    store = open_store(db)
    ingestor = Ingestor(store)
    start = time.perf_counter()
    for i in range(0, count, 1000):
        ingestor.handle(messages[i : i + 1000])
    elapsed = time.perf_counter() - start
    stored = stored_in(db)
    store.close()
    databases.drop(db)
    return {
        "store_summaries": stored,
        "store_seconds": elapsed,
        "store_per_second": stored / elapsed,
        "payload_bytes": len(messages[0].payload),
    }


class Broker:
    def __init__(self, work: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        directory = work / f"broker-{self.port}"
        directory.mkdir()
        (directory / "m.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_queued_messages 1000000\nmax_inflight_messages 1000\n"
            f"log_dest file {directory / 'broker.log'}\nlog_type subscribe\n"  # (stdout would sit in its buffer)
        )
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("mosquitto")
            os.chown(directory, user.pw_uid, user.pw_gid)
            work.chmod(0o711)  # the broker runs as mosquitto: it must reach its folder to write its log
        self.log = directory / "broker.log"
        self.process = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(directory / "m.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def wait_for_subscriptions(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the broker has taken ``count`` shared summary subscriptions (its log names each; ``$SYS``
        counts only plain ones): a summary published before one exists reaches no one (the collectors' sessions
        are new), and the part would then wait for it until its timeout. The fixed 1.5 s pause this replaces
        lost summaries on a loaded machine, where a collector took longer than that to start."""
        deadline = time.perf_counter() + timeout
        made = 0
        while made < count:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the collectors made {made} of {count} summary subscriptions in {timeout:.0f} s")
            time.sleep(0.05)
            with contextlib.suppress(OSError):
                made = sum(" $share/" in line for line in self.log.read_text().splitlines())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def family(pid: int) -> list[int]:
    """A process and its descendants (a collector and its ingest workers)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [p for child in (task / "children").read_text().split() for p in family(int(child))]
        except OSError:
            pass
    return pids


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants."""
    total = 0
    for member in family(pid):
        with open(f"/proc/{member}/status") as status:
            total += next((int(line.split()[1]) for line in status if line.startswith("VmRSS")), 0)  # 0: exiting
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process and its live descendants have used so far."""
    total = 0
    for member in family(pid):
        with open(f"/proc/{member}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def stored_in(db: str) -> int:
    """Summaries in the database (0 before the collector has made it)."""
    if is_postgres_url(db):
        import psycopg

        try:
            with psycopg.connect(db) as connection:
                return connection.execute("SELECT count(*) FROM summaries").fetchone()[0]
        except psycopg.Error:
            return 0
    try:
        with sqlite3.connect(db, timeout=10) as connection:
            return connection.execute("SELECT count(*) FROM summaries").fetchone()[0]
    except sqlite3.Error:
        return 0


def run_pipeline(
    work: Path,
    databases: Databases,
    docs: list[str],
    *,
    total: int,
    rate: float,
    publishers: int = 2,
    collectors: int = 1,
    workers: int = 1,
    sample_every: float = 2.0,
    timeout: float = 900,
) -> dict:
    """Collectors (each with ``workers`` processes) in one shared-subscription group, writing one database,
    fed by publisher processes."""
    broker = Broker(work)
    db = databases.new(f"fleet-{total}-{int(rate)}-{collectors}-{workers}")
    open_store(db).close()  # create and migrate once, before collectors race to
    group = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgekit.cli",
                "fleet",
                "collect",
                "--broker",
                f"mqtt://127.0.0.1:{broker.port}",
                "--db",
                str(db),
                "--http",
                "",
                "--client-id",
                f"bench-{int(rate)}-{i}",
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(collectors)
    ]
    templates_file = work / "templates.json"
    templates_file.write_text(json.dumps(docs))
    script = Path(__file__).with_name("bench_publisher.py")
    try:
        broker.wait_for_subscriptions(collectors * workers)  # each process's shared summary subscription
        share = total // publishers
        server = databases.server_pid()
        cpu_before = {"collector": sum(cpu_seconds(c.pid) for c in group), "broker": cpu_seconds(broker.process.pid)}
        if server is not None:
            cpu_before["database"] = cpu_seconds(server)
        start = time.perf_counter()
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(broker.port),
                    str(i * share),
                    str(share),
                    str(rate / publishers),
                    str(templates_file),
                ]
            )
            for i in range(publishers)
        ]
        samples, publisher_cpu, running = [], 0.0, {w.pid: w for w in workers}
        last_sample = 0.0
        while stored_in(db) < share * publishers and time.perf_counter() - start < timeout:
            time.sleep(0.1)  # fine enough not to round a 6 s burst up by a sampling period
            for pid in list(running):
                done, status, usage = os.wait4(pid, os.WNOHANG)  # reaps a finished publisher, with the CPU time it used
                if done:
                    running.pop(pid).returncode = os.waitstatus_to_exitcode(status)
                    publisher_cpu += usage.ru_utime + usage.ru_stime
                    if status:
                        raise RuntimeError(f"a publisher failed (exit {os.waitstatus_to_exitcode(status)})")
            now = time.perf_counter() - start
            if now - last_sample >= sample_every:
                samples.append((now, stored_in(db), sum(rss_mb(c.pid) for c in group) / len(group)))
                last_sample = now
        elapsed = time.perf_counter() - start
        cpu = {
            "collector": sum(cpu_seconds(c.pid) for c in group) - cpu_before["collector"],
            "broker": cpu_seconds(broker.process.pid) - cpu_before["broker"],
            "publishers": publisher_cpu,
        }
        if server is not None:
            cpu["database"] = cpu_seconds(server) - cpu_before["database"]
        for pid, worker in running.items():
            _, status, usage = os.wait4(pid, 0)
            worker.returncode = os.waitstatus_to_exitcode(status)
            cpu["publishers"] += usage.ru_utime + usage.ru_stime
        count = stored_in(db)
    finally:
        for member in group:
            member.send_signal(signal.SIGTERM)
        for member in group:
            member.wait(30)
        broker.stop()
        databases.drop(db)
    quarter = max(1, len(samples) // 4)
    first, last = np.mean([s[2] for s in samples[:quarter]]), np.mean([s[2] for s in samples[-quarter:]])
    return {
        "sent": share * publishers,
        "stored": count,
        "seconds": elapsed,
        "per_second": count / elapsed,
        "cpu_seconds": cpu,
        "per_collector_cpu_second": count / max(cpu["collector"], 1e-9),
        "rss_first_quarter_mb": float(first),
        "rss_last_quarter_mb": float(last),
        "rss_growth_mb": float(last - first),
        "samples": samples,
    }


def leader_failover(work: Path, databases: Databases, trials: int = 3) -> dict:
    """Two ``fleet collect`` processes on one database; SIGKILL the one holding the leader lease and time
    until the other holds it (the lease is 10 s, renewed and tried every 2.5 s: at most 12.5 s)."""
    broker = Broker(work)
    db = databases.new("failover")
    store = open_store(db)
    times, group = [], {}
    try:
        group = {f"bench-leader-{i}": _collector(broker.port, db, f"bench-leader-{i}", workers=1) for i in range(2)}
        for _ in range(trials):
            lease = _wait_for(lambda: _held(store), 30)
            killed = lease.holder
            group[killed].send_signal(signal.SIGKILL)
            group[killed].wait(10)
            start = time.perf_counter()
            _wait_for(lambda: _held(store, other_than=killed), 30)  # noqa: B023 (polled at once)
            times.append(time.perf_counter() - start)
            group[killed] = _collector(broker.port, db, killed, workers=1)  # back, as a follower
    finally:
        for process in group.values():
            process.send_signal(signal.SIGTERM)
        for process in group.values():
            process.wait(30)
        store.close()
        broker.stop()
    return {"failover_seconds": times, "failover_max_seconds": max(times)}


def _collector(port: int, db: str, client_id: str, *, workers: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgekit.cli", "fleet", "collect", "--broker", f"mqtt://127.0.0.1:{port}",
         "--db", db, "--http", "", "--client-id", client_id, "--workers", str(workers)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _held(store, other_than: str | None = None):
    lease = store.lease("leader")
    if lease is None or lease.expires_at <= lease.now or lease.holder == other_than:
        return None
    return lease


def _wait_for(predicate, timeout: float):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise RuntimeError("timed out")


PARTS = {
    "store": lambda work, databases, docs, args: bench_store(databases, docs),
    "burst": lambda work, databases, docs, args: run_pipeline(work, databases, docs, total=30000, rate=0),
    "workers3": lambda work, databases, docs, args: run_pipeline(work, databases, docs, total=30000, rate=0, workers=3),
    "workers2": lambda work, databases, docs, args: run_pipeline(work, databases, docs, total=30000, rate=0, workers=2),
    "pair": lambda work, databases, docs, args: run_pipeline(work, databases, docs, total=30000, rate=0, collectors=2),
    "sustained": lambda work, databases, docs, args: run_pipeline(
        work, databases, docs, total=int(args.duration * args.rate), rate=args.rate, sample_every=5.0
    ),
    "failover": lambda work, databases, docs, args: leader_failover(work, databases),
}
# a part's key in the JSON a full run writes, where it is not the part's name
RESULT_KEYS = {"workers3": "burst_three_workers", "workers2": "burst_two_workers", "pair": "burst_two_collectors"}


def run_parts(args: argparse.Namespace, docs: list[str], parts: list[str]) -> int:
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-collector-") as tmp:
        databases = Databases(Path(tmp), args.db)
        try:
            for part in parts:
                result = PARTS[part](Path(tmp), databases, docs, args)
                samples = result.pop("samples", None)
                if samples:  # the collector's RSS at ten points of the run: a plateau, or a trend?
                    result["rss_trace_mb"] = [round(samples[i * (len(samples) - 1) // 9][2], 1) for i in range(10)]
                print(databases.label, part, json.dumps(result), flush=True)
        finally:
            databases.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of the sustained run (600 for the 10-minute check)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="summaries per second during the sustained run")
    parser.add_argument(
        "--db", default="sqlite", help="sqlite, postgres (a throwaway local server), or a postgresql:// URL"
    )
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "bench_collector.json"))
    parser.add_argument(
        "--only",
        help=f"a quicker look: only these parts, comma-separated ({', '.join(PARTS)}); prints each part's figures "
        "and writes no JSON",
    )
    args = parser.parse_args()
    docs = templates()
    if args.only:
        return run_parts(args, docs, [part.strip() for part in args.only.split(",")])
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-collector-") as tmp:
        work = Path(tmp)
        databases = Databases(work, args.db)
        try:
            results = {"database": databases.label}
            for part, run in PARTS.items():
                results[RESULT_KEYS.get(part, part)] = run(work, databases, docs, args)
        finally:
            databases.stop()
    store, burst, sustained, pair = (
        results["store"],
        results["burst"],
        results["sustained"],
        results["burst_two_collectors"],
    )
    workers, two = results["burst_three_workers"], results["burst_two_workers"]
    rows = [
        (
            f"store ingest into {results['database']}, summaries/s (64 features, 1,000 devices)",
            store["store_per_second"],
            f"≥ {TARGETS['ingest_per_second_min']}",
            store["store_per_second"] >= TARGETS["ingest_per_second_min"],
        ),
        (
            "end to end via Mosquitto QoS 1, `fleet collect --workers 3`, summaries/s",
            workers["per_second"],
            f"≥ {TARGETS['ingest_per_second_min']}",
            workers["per_second"] >= TARGETS["ingest_per_second_min"],
        ),
        (
            "--workers 3: stored / sent",
            workers["stored"] / workers["sent"],
            "= 1",
            workers["stored"] == workers["sent"],
        ),
        ("end to end, --workers 2, summaries/s", two["per_second"], "–", True),
        ("--workers 2: stored / sent", two["stored"] / two["sent"], "= 1", two["stored"] == two["sent"]),
        ("end to end, one process (--workers 1), summaries/s", burst["per_second"], "–", True),
        ("one process: stored / sent", burst["stored"] / burst["sent"], "= 1", burst["stored"] == burst["sent"]),
        ("one process: summaries per CPU-second of the collector", burst["per_collector_cpu_second"], "–", True),
        ("end to end, two collector commands sharing the subscription, summaries/s", pair["per_second"], "–", True),
        ("two collectors: stored / sent", pair["stored"] / pair["sent"], "= 1", pair["stored"] == pair["sent"]),
        (
            f"sustained {sustained['seconds']:.0f} s at {args.rate:.0f}/s: stored / sent",
            sustained["stored"] / sustained["sent"],
            "= 1",
            sustained["stored"] == sustained["sent"],
        ),
        (
            "leader failover: the leader SIGKILLed, the other leads after (s, worst of 3)",
            results["failover"]["failover_max_seconds"],
            "≤ 15",
            results["failover"]["failover_max_seconds"] <= 15,
        ),
        (
            "collector RSS growth, first to last quarter (MB)",
            sustained["rss_growth_mb"],
            "flat",
            abs(sustained["rss_growth_mb"]) < 20,
        ),
    ]
    print_checks(rows)
    for label, run in (("one process", burst), ("--workers 2", two), ("--workers 3", workers)):
        shares = ", ".join(f"{k} {v:.1f} s" for k, v in run["cpu_seconds"].items())
        print(
            f"\nCPU used during the {run['seconds']:.1f} s burst ({label}) on {os.cpu_count()} cores: {shares}", end=""
        )
    print()
    print(
        f"summary payload {store['payload_bytes']:,} bytes; "
        f"collector RSS {sustained['rss_first_quarter_mb']:.1f} → {sustained['rss_last_quarter_mb']:.1f} MB"
    )
    write_json(args.out, rows, targets=TARGETS, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
