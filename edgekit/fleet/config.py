"""The collector's settings, and the broker URL rule: apart from the collector so that ingest workers,
the web routes and flashing can name them without importing the collector."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import ParseResult, urlsplit

from device_agent import protocol
from device_agent.config import HttpLimits, address_port
from device_agent.errors import ProtocolError
from edgekit.errors import EdgekitError
from edgekit.fleet.retention import RetentionPolicy

# MQTT 5's session expiry is a four-byte interval; 0xFFFFFFFF means "never", which is what must not happen.
MAX_SESSION_EXPIRY = 0xFFFFFFFE
MAX_WORKERS = 64  # ingest processes at most, as --workers allows


@dataclass(frozen=True)
class CollectorConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    db: str = "fleet.db"
    http: str | None = "127.0.0.1:8480"
    group: str = "edgekit"
    client_id: str = "edgekit-collector"
    username: str | None = None
    password: str | None = None
    gap_retry_seconds: float = 30.0  # a missing window is asked for again this often until it arrives
    # How long the broker keeps this collector's MQTT 5 session after it disconnects. Within it a
    # restarted collector gets what was queued for it; past it the broker drops the session and its
    # queue, stops giving it a share of the group's summaries, and the gap requests fetch what was lost
    # from the devices' spools (kept an hour by default: agent.toml's [monitor] keep_acked_seconds).
    session_expiry_seconds: int = 120
    allowed_devices: frozenset[str] | None = None
    trust: str | None = None  # the fleet's public key: bundles for rollouts must verify against it
    bundle_dir: str | None = None  # where uploaded bundles are kept (default: next to the database)
    public_url: str | None = None  # the base URL devices download bundles from (default: the --http address)
    api_token: str | None = None  # required as a bearer token on the HTTP API's POSTs when set
    # The devices' token: taken (besides api_token) only on bundle downloads and field-sample uploads, so a
    # device's copy opens nothing else (rollouts, rollbacks, bundle uploads, the rows). Needs api_token.
    device_token: str | None = field(default=None, repr=False)
    http_limits: dict[str, float] = field(
        default_factory=dict
    )  # overrides of web.COLLECTOR_LIMITS by name (HttpLimits)
    tls_cert: str | None = None  # with tls_key: the dashboard and API over HTTPS
    tls_key: str | None = None
    workers: int = 1  # ingest processes in all (this one included); see workers.py
    role: str = "all"  # "all": ingest, alerts, gaps, rollouts, HTTP; "ingest": summaries only (a worker)
    # Bounded history, applied by the leader (retention.py): "raw=7d,hourly=90d,daily=forever"; None: the
    # policy `edgekit fleet retention` stored in the database, if any (else every window is kept raw).
    retention: str | None = None

    def __post_init__(self) -> None:
        """Every setting checked when the collector is made, so a bad one is one line at start (the CLI's
        checks cover its options; demos, benchmarks and worker processes build this directly)."""
        self._check_numbers()
        self._check_addresses()
        if self.role not in ("all", "ingest"):
            raise EdgekitError(f"role {self.role!r} is not all or ingest", "all runs everything; ingest only stores")
        if self.retention is not None:
            RetentionPolicy.from_text(self.retention)  # a bad setting fails at start, not at the first pass
        if self.device_token and not self.api_token:
            raise EdgekitError(
                "a device token without an API token would leave the operator API open to anyone, devices too",
                "set EDGEKIT_COLLECTOR_TOKEN as well (the operators' token)",
            )
        if self.device_token and self.device_token == self.api_token:
            raise EdgekitError("the device token is the API token", "give the devices a token of their own")

    def _check_numbers(self) -> None:
        if isinstance(self.session_expiry_seconds, bool) or not isinstance(self.session_expiry_seconds, int):
            raise EdgekitError(
                f"session_expiry_seconds {self.session_expiry_seconds!r} is not a whole number of seconds",
                "give an integer, e.g. 120",
            )
        if not 0 <= self.session_expiry_seconds <= MAX_SESSION_EXPIRY:
            raise EdgekitError(
                f"session_expiry_seconds {self.session_expiry_seconds} is out of range",
                f"give 0-{MAX_SESSION_EXPIRY} seconds, e.g. 120: a restart within it keeps its queue",
            )
        gap = self.gap_retry_seconds
        if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 < gap < math.inf:
            raise EdgekitError(f"gap_retry_seconds {gap!r} must be a positive number of seconds", "e.g. 30")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= MAX_WORKERS:
            raise EdgekitError(
                f"workers {self.workers!r} is not a whole number from 1 to {MAX_WORKERS}",
                "e.g. --workers 3 (processes storing summaries, this one included)",
            )
        try:
            HttpLimits().with_values(self.http_limits)
        except ValueError as exc:
            raise EdgekitError(f"HTTP limit: {exc}", "e.g. --http-limit header_timeout=10") from None

    def _check_addresses(self) -> None:
        """The broker URL, the HTTP address, the shared-subscription group and the public URL: a port past
        65535 or a '/' in the group would otherwise fail later, or subscribe to something else."""
        parse_broker_url(self.broker)
        if self.http:
            if address_port(self.http) is None:
                raise EdgekitError(
                    f"HTTP address {self.http!r} is not host:port with a port from 0 to 65535",
                    "e.g. --http 127.0.0.1:8480 (port 0: any free port)",
                )
        if not self.group or any(c in self.group for c in "/+#"):
            raise EdgekitError(
                f"group {self.group!r} is not an MQTT shared-subscription group name",
                "give a non-empty name without '/', '+' or '#', e.g. --group edgekit",
            )
        if self.public_url is not None:
            parsed = urlsplit(self.public_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise EdgekitError(
                    f"public URL {self.public_url!r} is not an http(s) URL",
                    "e.g. --public-url http://10.0.0.5:8480 (the address devices reach the collector at)",
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise EdgekitError("tls_cert and tls_key go together", "give both PEM files to serve HTTPS, or neither")


def read_token_file(path: str, option: str) -> str:
    """A secret kept in a file (its first line, stripped), for ``option``; one clear error when it cannot be."""
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"cannot read {option} {path} ({exc})", "give a readable file holding the token") from exc
    if not token:
        raise EdgekitError(f"{option} {path} is empty", "put the token on its first line")
    return token


def parse_broker_url(url: str) -> ParseResult:
    """The wire contract's rule (``device_agent.protocol.parse_broker_url``), as an ``EdgekitError``."""
    try:
        return protocol.parse_broker_url(url)
    except ProtocolError as exc:
        problem, _, fix = str(exc).partition("; ")
        raise EdgekitError(problem, fix) from None
