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
        if self.device_token and not self.api_token:
            raise EdgekitError(
                "a device token without an API token would leave the operator API open to anyone, devices too",
                "set EDGEKIT_COLLECTOR_TOKEN as well (the operators' token)",
            )
        if self.device_token and self.device_token == self.api_token:
            raise EdgekitError("the device token is the API token", "give the devices a token of their own")


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
