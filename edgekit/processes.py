"""Stopping the child processes edgekit starts (brokers, emulated devices, ingest workers)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def stop_processes(processes: Iterable[subprocess.Popen], *, timeout: float = 10.0) -> None:
    """SIGTERM every one still running first (they shut down side by side), then wait for each
    up to ``timeout`` seconds, and SIGKILL one that has not exited by then."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
