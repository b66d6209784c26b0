"""``edgekit fleet collect`` composed in one place: the fleet service.

It builds the store, the alert engine, the rollout controller and the MQTT collector that feeds
them, then starts the ingest worker processes and the web server, and stops them in reverse. No
part starts another: the collector only ingests; the web routes and /metrics read this object
through small Protocols (``web.Fleet``, ``metrics.Observed``).

Several collectors may share one database (same ``--group``, different ``--client-id``): every one
ingests, and one, the holder of the database's lease (``leader.py``), runs the duties listed in
``leader_duties``: the gap requests, the alert passes, the rollout controller's ticks, retention.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Any

from device_agent.config import address_port
from device_agent.signing import load_public_key
from edgekit.errors import EdgekitError
from edgekit.fleet.alerts import AlertEngine, AlertRules, AlertSinks
from edgekit.fleet.collector import FULL_ALERT_PASS_SECONDS, GAP_CHECK_SECONDS, ROLLOUT_TICK, Collector
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.leader import Duty, Leadership
from edgekit.fleet.retention import DUTY_SECONDS as RETENTION_DUTY_SECONDS
from edgekit.fleet.retention import Retention
from edgekit.fleet.rollouts import RolloutController
from edgekit.fleet.store import SqlStore, is_postgres_url, open_store


class FleetService:
    def __init__(
        self,
        config: CollectorConfig,
        *,
        alert_rules: AlertRules | None = None,
        alert_sinks: AlertSinks | None = None,
        store: SqlStore | None = None,
    ) -> None:
        """Alerts run when ``alert_rules`` are given (``load_alert_config`` reads them from alerts.toml).
        Settings that cannot work fail first (``check_can_start``), before a database file is made."""
        check_can_start(config)
        self.config = config
        self.store = store or open_store(config.db)
        self.alerts = AlertEngine(self.store, alert_rules, alert_sinks or AlertSinks()) if alert_rules else None
        self.leader = Leadership(self.store, config.client_id)
        self.rollouts = RolloutController(
            self.store,
            self._publish,
            _bundle_dir(config),
            self.http_url,
            trusted_key=load_public_key(config.trust) if config.trust else None,
            leader=self.leader,
        )
        self.collector = Collector(
            config, store=self.store, alerts=self.alerts, rollouts=self.rollouts, leader=self.leader
        )
        self.retrainer: Any = None  # [sinks.retrain]: fed by the alert engine, which runs on the leader only
        if self.alerts is not None and self.alerts.sinks.retrain is not None:
            from edgekit.fleet.retrain import Retrainer

            self.retrainer = Retrainer(
                self.alerts.sinks.retrain,
                self.store,
                ask_samples=self._ask_samples,
                rollouts=self.rollouts,
                collector_url=self.http_url,
            )
            self.alerts.retrain = self.retrainer
        self.workers: Any = None
        self.server: Any = None

    ingestor = property(lambda self: self.collector.ingestor, doc="The collector's ingest counters (for /metrics).")

    def leader_duties(self) -> list[Duty]:
        """What only one of the collectors sharing the database does: the lease holder (``leader.py``).
        Every collector ingests; the alert rules on devices with news run in the leader's writer too
        (``Collector._evaluate_alerts``). A duty added here runs on the leader alone, and at once when a
        collector takes the lead."""
        duties = [
            Duty("gap requests", self.collector.request_gaps, min(GAP_CHECK_SECONDS, self.config.gap_retry_seconds)),
            Duty("rollouts", self.rollouts.tick, ROLLOUT_TICK),
            Duty("retention", Retention.of(self.store, self.config.retention).tick, RETENTION_DUTY_SECONDS),
        ]
        if self.alerts is not None:  # every device, for rules that fire on silence (offline)
            duties.append(Duty("alert pass", self.alerts.evaluate, FULL_ALERT_PASS_SECONDS))
        return duties

    def start(self) -> FleetService:
        """The HTTP port first: a collector that cannot have it must not reach the broker at all. Connecting
        with the same client id as a running collector closes that one's connection (MQTT's session takeover),
        so a second ``fleet collect`` started by mistake would cut the first off on its way to failing."""
        if self.config.http:
            from edgekit.fleet.web import COLLECTOR_LIMITS, serve

            self.server = serve(
                self,
                self.config.http,
                limits=COLLECTOR_LIMITS.with_values(self.config.http_limits),
                tls_cert=self.config.tls_cert,
                tls_key=self.config.tls_key,
            )
        try:
            self.collector.start()
        except BaseException:
            if self.server is not None:
                self.server.shutdown()
            raise
        if self.retrainer is not None:
            self.retrainer.start()
        self.leader.start(self.leader_duties())
        if self.config.workers > 1:
            from edgekit.fleet.workers import IngestWorkers

            self.workers = IngestWorkers(self.config).start()
        return self

    def stop(self) -> None:
        self.leader.stop()  # first: its duties end and the lease is released, so another collector leads at once
        if self.retrainer is not None:
            self.retrainer.stop()  # a retraining command still running is killed, and its timeline says so
        if self.workers is not None:
            self.workers.stop()
        if self.server is not None:
            self.server.shutdown()
        self.collector.stop()  # last: it closes the store

    def drain(self) -> int:
        """Store what the collector has received so far (the demo and tests read the store next)."""
        return self.collector.drain()

    def _ask_samples(self, device: str) -> str:
        """The retrain sink's request for a device's field samples: the upload id (``samples.request_upload``)."""
        from edgekit.fleet.samples import request_upload

        return request_upload(self, {"device": device})["upload"]

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        return self.collector.publish(topic, payload, retain)

    def http_url(self) -> str:
        """The base URL devices download bundles from: ``public_url``, else the web server's address."""
        if self.config.public_url:
            return self.config.public_url
        if self.server is None:
            raise EdgekitError(
                "the collector serves no HTTP, so devices cannot download bundles",
                "run it with --http host:port (and --public-url if devices see another address)",
            )
        host, port = self.server.server_address[:2]
        return f"{self.server.scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def check_can_start(config: CollectorConfig) -> None:
    """Refuse, with one clear error, what would fail only after the database was made or the broker reached: an
    HTTP port another process holds (another collector on it). The broker URL and the address's form are checked
    when the config is made (``CollectorConfig``). The port is tried and let go here, then bound for good by
    ``start``; one taken in between still fails there, before the broker is reached."""
    if not config.http:
        return
    host, port = (config.http.rpartition(":")[0] or "127.0.0.1").strip("[]"), address_port(config.http)
    if port == 0:  # any free port: nothing to collide with
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no clash
            probe.bind(address)
    except OSError as exc:
        raise EdgekitError(
            f"cannot serve HTTP on {config.http} ({exc.strerror or exc})",
            "is another 'edgekit fleet collect' running there? Stop it, or pass another --http host:port",
        ) from None


def _bundle_dir(config: CollectorConfig) -> Path:
    """Where uploaded bundles are kept: ``bundle_dir``, else beside the database, else a temporary directory."""
    if config.bundle_dir:
        return Path(config.bundle_dir)
    if config.db != ":memory:" and not is_postgres_url(config.db):
        return Path(str(Path(config.db).with_suffix("")) + "-bundles")
    return Path(tempfile.mkdtemp(prefix="edgekit-bundles-"))
