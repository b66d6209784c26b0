"""A throwaway PostgreSQL server on a free loopback port: for the tests, the collector bench and trying a
fleet on PostgreSQL on one machine, never for a fleet's real database.

It is Debian's ``postgresql`` package run by hand: ``initdb`` into a temporary directory (trust
authentication for one superuser, ``edgekit``, on 127.0.0.1 only; fsync off, since the data is thrown
away) and ``pg_ctl start``. PostgreSQL refuses to run as root, so as root the directory is handed to
``nobody`` and both run as that user (``setpriv``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.local.broker import free_port

INSTALL_HINT = "sudo apt-get install postgresql (Debian/Ubuntu), or give --db postgresql://... of a running server"
UNPRIVILEGED = (65534, 65534)  # nobody:nogroup


def postgres_binary(name: str) -> str:
    """``initdb``/``pg_ctl``: on PATH, else in Debian's versioned directory (not on PATH there)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise EdgekitError(f"PostgreSQL's {name} is not installed", INSTALL_HINT)
    return found


class LocalPostgres:
    """``with LocalPostgres() as server: server.url``; ``server.new_database()`` for one test's own database."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="edgekit-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            uid, gid = UNPRIVILEGED
            os.chown(self.root, uid, gid)
            self._as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://edgekit@127.0.0.1:{self.port}/{database}"

    def start(self) -> LocalPostgres:
        self._run(
            postgres_binary("initdb"), "-D", str(self.data), "-U", "edgekit", "-A", "trust", "-E", "UTF8", "--no-sync"
        )
        for attempt in range(3):  # a free port can be taken between choosing it and binding it
            self.port = free_port()
            options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
            try:
                self._run(
                    postgres_binary("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w",
                    "-t", "30", "start",
                )  # fmt: skip
                return self
            except EdgekitError:
                if attempt == 2:
                    raise
        return self

    def new_database(self) -> str:
        """A fresh, empty database's URL (tests in parallel each get their own)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url_of(name)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                [*self._as_user, postgres_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=30,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self._as_user, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = (self.root / "log").read_text(errors="replace")[-800:] if (self.root / "log").exists() else ""
            raise EdgekitError(
                f"{Path(command[0]).name} failed: {(result.stderr or result.stdout).strip()[-800:]} {log}".strip(),
                INSTALL_HINT,
            )

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
