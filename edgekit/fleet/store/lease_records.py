"""Leases: which one of the collectors sharing a database runs the duties only one may run.

A lease is a row (``leases``: name, holder, token, acquired_at, expires_at). A collector acquires it
when it has expired or is already its own, and renews it the same way; the fencing ``token`` goes up
at every change of holder, so a write that must not come from a deposed leader (a rollout's wave, a
device marked sent) takes the lease row in its own transaction and checks the token it was granted
(``fenced``). Every time is the database's clock (``NOW_SECONDS``, a dialect name of the store), so
collectors on machines whose clocks disagree still agree on when a lease expires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edgekit.errors import StoreError


class LeaseLost(StoreError):
    """This collector no longer holds the lease it was granted: a leader's write was refused."""


@dataclass(frozen=True)
class Lease:
    """A lease as the database has it; ``now`` is the database's clock when it was read."""

    name: str
    holder: str
    token: int
    acquired_at: float
    expires_at: float
    now: float

    @property
    def held(self) -> bool:
        return bool(self.holder) and self.expires_at > self.now


class LeaseRecords:
    """Mixed into a store that has ``atomic()``, ``reading()`` and the dialect name ``NOW_SECONDS`` (an SQL
    expression: seconds since the epoch by the database's clock)."""

    NOW_SECONDS: str

    def acquire_lease(self, name: str, holder: str, seconds: float) -> Lease:
        """Take or renew the lease ``name`` for ``seconds`` if it has expired or is ``holder``'s; the lease as
        it stands after the attempt either way (``holder`` is someone else's when it was refused)."""
        now = self.NOW_SECONDS
        with self.atomic() as db:
            db.execute(
                "INSERT INTO leases (name, holder, token, acquired_at, expires_at) VALUES (?, '', 0, 0, 0) "
                "ON CONFLICT DO NOTHING",
                (name,),
            )
            # One statement: on PostgreSQL a concurrent attempt waits on the row and re-checks the WHERE.
            row = db.execute(
                f"""UPDATE leases SET
                   token = CASE WHEN holder = :holder THEN token ELSE token + 1 END,
                   acquired_at = CASE WHEN holder = :holder THEN acquired_at ELSE {now} END,
                   expires_at = {now} + :seconds, holder = :holder
                   WHERE name = :name AND (holder = :holder OR expires_at <= {now})
                   RETURNING name, holder, token, acquired_at, expires_at, {now} AS now""",
                {"name": name, "holder": holder, "seconds": float(seconds)},
            ).fetchone()
            if row is None:
                row = db.execute(_SELECT_LEASE.format(now=now), (name,)).fetchone()
        return _lease(row)

    def release_lease(self, name: str, holder: str, token: int) -> bool:
        """Give the lease up (a clean stop), so another collector takes it at once rather than at expiry."""
        with self.atomic() as db:
            cursor = db.execute(
                f"UPDATE leases SET expires_at = {self.NOW_SECONDS} WHERE name = ? AND holder = ? AND token = ?",
                (name, holder, token),
            )
            return cursor.rowcount > 0

    def lease(self, name: str) -> Lease | None:
        """The lease ``name`` (None when no collector ever took it); ``held`` says whether it is current."""
        with self.reading() as db:
            row = db.execute(_SELECT_LEASE.format(now=self.NOW_SECONDS), (name,)).fetchone()
        return None if row is None or not row["holder"] else _lease(row)

    @contextlib.contextmanager
    def fenced(self, name: str, token: int) -> Iterator[Any]:
        """One write transaction that commits only while ``token`` is the lease's: it takes the lease row
        first (on PostgreSQL a row lock, so no one acquires the lease until it commits; SQLite's writers are
        serialized already), and raises ``LeaseLost`` when another holder has been granted it since."""
        with self.atomic() as db:
            cursor = db.execute("UPDATE leases SET token = token WHERE name = ? AND token = ?", (name, token))
            if cursor.rowcount != 1:
                raise LeaseLost(
                    f"the {name} lease has passed to another collector (this one held token {token})",
                    "this collector stopped its leader duties; the new leader carries on",
                )
            yield db


_SELECT_LEASE = "SELECT name, holder, token, acquired_at, expires_at, {now} AS now FROM leases WHERE name = ?"


def _lease(row: Any) -> Lease:
    return Lease(
        name=row["name"],
        holder=row["holder"],
        token=int(row["token"]),
        acquired_at=float(row["acquired_at"]),
        expires_at=float(row["expires_at"]),
        now=float(row["now"]),
    )
