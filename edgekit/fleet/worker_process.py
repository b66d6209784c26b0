"""``python -m edgekit.fleet.worker_process PARENT_PID``: one ingest worker, its config as JSON on stdin.

Started and supervised by ``workers.IngestWorkers``; runs an ingest-only ``Collector`` until told to
stop, until its parent is gone, or until the broker turns out to lack shared subscriptions.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from edgekit.fleet.collector import Collector
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.workers import NOT_APPLICABLE

log = logging.getLogger("edgekit.fleet")


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    document: dict[str, Any] = json.loads(sys.stdin.read())
    if document.get("allowed_devices") is not None:
        document["allowed_devices"] = frozenset(document["allowed_devices"])
    config = CollectorConfig(**document)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(name)s[{config.client_id}] %(levelname)s %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    collector = Collector(config).start()
    try:
        while not stop.wait(1.0):
            if collector.unusable.is_set():
                return NOT_APPLICABLE
            if os.getppid() != parent:  # the main process died (even by SIGKILL): do not linger as an orphan
                log.warning("the main collector process is gone; stopping")
                break
    finally:
        collector.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
