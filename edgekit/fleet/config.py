"""The collector's settings, and the broker URL rule: apart from the collector so that ingest workers,
the web routes and flashing can name them without importing the collector."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import ParseResult

from device_agent import protocol
from device_agent.errors import ProtocolError
from edgekit.errors import EdgekitError
from edgekit.fleet.retention import RetentionPolicy

# MQTT 5's session expiry is a four-byte interval; 0xFFFFFFFF means "never", which is what must not happen.
MAX_SESSION_EXPIRY = 0xFFFFFFFE


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
        if not self.gap_retry_seconds > 0:
            raise EdgekitError(f"gap_retry_seconds {self.gap_retry_seconds!r} must be positive", "e.g. 30")
        if self.retention is not None:
            RetentionPolicy.from_text(self.retention)  # a bad setting fails at start, not at the first pass


def parse_broker_url(url: str) -> ParseResult:
    """The wire contract's rule (``device_agent.protocol.parse_broker_url``), as an ``EdgekitError``."""
    try:
        return protocol.parse_broker_url(url)
    except ProtocolError as exc:
        problem, _, fix = str(exc).partition("; ")
        raise EdgekitError(problem, fix) from None
