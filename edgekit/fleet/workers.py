"""Ingest workers: ``edgekit fleet collect --workers N`` stores summaries in N processes.

One collector process is bound by the GIL at about 270 µs of CPU a summary (MQTT receive, JSON
parse, SQLite), about 3,500 a second. Summaries come through an MQTT 5 shared subscription, so
more members of the collector's group split them: the main process starts N-1 ingest-only workers
(``role="ingest"``: the shared summary subscription and the writer, nothing else) and restarts any
that dies. Everything else stays in the main process: state, baselines and rollout reports
(plain subscriptions, which every member would get), gap requests, alerts (it finds what the
workers stored by the summaries' rowid), rollouts and HTTP.

A worker keeps the client id ``<client-id>-w<i>`` across restarts, so the broker's persistent
session holds what arrives while it is down, and acknowledges only after its commit, so a killed
worker loses nothing. It exits when the main process goes away.

Each worker is ``python -m edgekit.fleet.worker_process`` with its config as JSON on stdin.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time

from edgekit.fleet.config import CollectorConfig
from edgekit.processes import stop_processes

log = logging.getLogger("edgekit.fleet")
NOT_APPLICABLE = 3  # the broker has no shared subscriptions: the worker would store every summary twice
RESTART_DELAY_MAX = 30.0
STABLE_SECONDS = 60.0  # a worker that ran this long before exiting is restarted after the shortest delay


def worker_config(config: CollectorConfig, index: int) -> CollectorConfig:
    return dataclasses.replace(config, role="ingest", http=None, client_id=f"{config.client_id}-w{index}")


class IngestWorkers:
    """Starts ``config.workers - 1`` ingest workers and keeps them running until ``stop``."""

    def __init__(self, config: CollectorConfig) -> None:
        self.configs = [worker_config(config, i) for i in range(1, config.workers)]
        self.processes: dict[int, subprocess.Popen] = {}
        self.started_at: dict[int, float] = {}
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="edgekit-collector-workers", daemon=True)

    def start(self) -> IngestWorkers:
        for index in range(len(self.configs)):
            self._spawn(index)
        self._thread.start()
        return self

    def _spawn(self, index: int) -> None:
        document = {
            k: sorted(v) if isinstance(v, frozenset) else v for k, v in dataclasses.asdict(self.configs[index]).items()
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "edgekit.fleet.worker_process", str(os.getpid())], stdin=subprocess.PIPE
        )
        try:
            process.stdin.write(
                json.dumps(document).encode()
            )  # on stdin, not argv: the config may hold the broker password
            process.stdin.close()
        except BrokenPipeError:  # it died at once; the supervisor sees the exit and tries again
            pass
        self.processes[index] = process
        self.started_at[index] = time.monotonic()

    def _supervise(self) -> None:
        delays = {index: 1.0 for index in range(len(self.configs))}
        while not self._stop.wait(0.5):
            for index, process in list(self.processes.items()):
                code = process.poll()
                if code is None or self._stop.is_set():
                    continue
                if code == NOT_APPLICABLE:
                    log.warning(
                        "ingest worker %s stopped: the broker cannot split summaries between processes",
                        self.configs[index].client_id,
                    )
                    del self.processes[index]
                    continue
                if time.monotonic() - self.started_at[index] > STABLE_SECONDS:
                    delays[index] = 1.0  # it had been running fine: this is a new failure, not a crash loop
                log.warning(
                    "ingest worker %s exited with %s; restarting it in %.0f s",
                    self.configs[index].client_id,
                    code,
                    delays[index],
                )
                if self._stop.wait(delays[index]):
                    return
                delays[index] = min(delays[index] * 2, RESTART_DELAY_MAX)
                self.restarts += 1
                try:
                    self._spawn(index)
                except OSError as exc:
                    log.error("could not start ingest worker %s: %s", self.configs[index].client_id, exc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.poll() is None]

    def stop(self) -> None:
        self._stop.set()
        stop_processes(self.processes.values())
        self._thread.join(timeout=5)
