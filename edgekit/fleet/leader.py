"""One leader among the collectors that share a fleet database: the duties only one of them may run.

Every collector ingests. Alert evaluation, gap requests, the rollout controller's ticks and retention
run in the one collector that holds the ``leader`` lease in the database (``store/lease_records.py``):
a row with the holder, a fencing token and an expiry by the database's clock. ``Leadership`` takes
the lease at start, renews it every ``RENEW_SECONDS`` (``LEASE_SECONDS`` long), and the others try as
often, so when a leader dies another takes over within ``LEASE_SECONDS + RENEW_SECONDS``.

A leader that cannot renew (paused, cut off from the database) stops its duties at once: ``leading()``
is true only until the lease it last renewed would expire, measured on this machine's monotonic clock
from before the renewal was sent, so it is never later than the database's expiry. A duty that was
already running when that happened is caught by the fencing token: its writes that must not come
from a deposed leader (a device marked sent, a wave advanced) run in ``fenced()``, which commits only
while the token is still the lease's. A clean stop releases the lease, so a successor need not wait.

The duties themselves are listed by the fleet service (``service.FleetService.leader_duties``); each
runs in its own thread, right away when this collector becomes leader and then every ``every`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edgekit.errors import StoreError
from edgekit.fleet.store import Lease, LeaseLost

log = logging.getLogger("edgekit.fleet.leader")
LEADER_LEASE = "leader"
LEASE_SECONDS = 10.0
RENEW_SECONDS = 2.5  # a leader renews, and a follower tries, this often
DUTY_POLL_SECONDS = 0.25  # how soon a duty notices that this collector leads, or no longer does


@dataclass(frozen=True)
class Duty:
    """Something only the leader does: ``run`` every ``every`` seconds (and at once on taking the lead)."""

    name: str
    run: Callable[[], Any]
    every: float


class Leadership:
    def __init__(
        self,
        store: Any,
        holder: str,
        *,
        name: str = LEADER_LEASE,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``holder`` names this collector (its MQTT client id): a collector restarted under the same id
        takes its own unexpired lease back at once, as it takes its MQTT session back."""
        self.store, self.holder, self.name = store, holder, name
        self.lease_seconds, self.renew_seconds, self.clock = lease_seconds, renew_seconds, clock
        self.duties: list[Duty] = []
        self.token: int | None = None
        self.since: float | None = None  # when this collector took the lead, by the database's clock
        self._valid_until = 0.0  # the clock's time past which the lease may be another's
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- the lease -------------------------------------------------------------------------------------
    def leading(self) -> bool:
        return self.token is not None and self.clock() < self._valid_until

    def attempt(self) -> bool:
        """Take or renew the lease once; whether this collector leads now."""
        sent_at = self.clock()
        try:
            lease = self.store.acquire_lease(self.name, self.holder, self.lease_seconds)
        except StoreError as exc:  # unreachable: lead on only while the last renewal lasts
            log.warning("cannot renew the %s lease (%s)", self.name, exc)
            return self.leading()
        if lease.holder != self.holder:
            if self.token is not None:
                log.warning("%s lost the %s lease to %s", self.holder, self.name, lease.holder)
            self.token, self.since, self._valid_until = None, None, 0.0
            return False
        if lease.token != self.token:
            log.info("%s leads (lease token %d): alerts, gap requests, rollouts", self.holder, lease.token)
        self.token, self.since = lease.token, lease.acquired_at
        self._valid_until = sent_at + self.lease_seconds
        return True

    @contextlib.contextmanager
    def fenced(self) -> Iterator[Any]:
        """A write transaction that commits only while this collector's token is the lease's (``LeaseLost``
        otherwise): for the leader's writes a deposed leader must not make."""
        token = self.token
        if token is None or not self.leading():
            raise LeaseLost(f"{self.holder} does not hold the {self.name} lease", "the leader does this")
        with self.store.fenced(self.name, token) as db:
            yield db

    def current(self) -> Lease | None:
        """The lease as the database has it (who leads, since when), for status pages."""
        return self.store.lease(self.name)

    # -- threads ---------------------------------------------------------------------------------------
    def start(self, duties: list[Duty]) -> Leadership:
        """Try for the lease now (a lone collector leads from its first moment), then keep at it and run
        ``duties`` while leading."""
        self.duties = list(duties)
        self.attempt()
        self._spawn(self._keep_lease, "edgekit-leader-lease")
        for duty in self.duties:
            self._spawn(lambda duty=duty: self._run_duty(duty), f"edgekit-leader-{duty.name.replace(' ', '-')}")
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        token, self.token = self.token, None
        if token is not None:
            with contextlib.suppress(StoreError):
                self.store.release_lease(self.name, self.holder, token)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _keep_lease(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            self.attempt()

    def _run_duty(self, duty: Duty) -> None:
        """Run ``duty`` every ``duty.every`` seconds while leading, and at once under a new token (so a new
        leader's first full alert pass does not wait for its period)."""
        ran_under, ran_at = None, 0.0
        while not self._stop.wait(min(duty.every, DUTY_POLL_SECONDS)):
            token = self.token if self.leading() else None
            if token is None or (token == ran_under and self.clock() - ran_at < duty.every):
                continue
            ran_under, ran_at = token, self.clock()
            try:
                duty.run()
            except LeaseLost as exc:
                log.info("leader duty %s stopped: %s", duty.name, exc)
            except Exception:
                log.exception("leader duty %s failed", duty.name)


def describe_lease(lease: Lease | None, name: str = LEADER_LEASE) -> dict[str, Any]:
    """The lease for people and scripts (``/api/leader``, ``edgekit fleet leader --json``): who leads, since
    when, the fencing token, and whether the lease is current by the database's clock."""
    if lease is None:
        return {"name": name, "holder": None, "held": False, "token": 0, "since": None, "expires_in": None}
    return {
        "name": lease.name,
        "holder": lease.holder,
        "held": lease.held,
        "token": lease.token,
        "since": lease.acquired_at,
        "expires_in": round(lease.expires_at - lease.now, 3),
    }
