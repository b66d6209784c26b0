"""The collector's settings, and the broker URL rule: apart from the collector so that ingest workers,
the web routes and flashing can name them without importing the collector."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import ParseResult

from device_agent import protocol
from device_agent.errors import ProtocolError
from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class CollectorConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    db: str = "fleet.db"
    http: str | None = "127.0.0.1:8480"
    group: str = "edgekit"
    client_id: str = "edgekit-collector"
    username: str | None = None
    password: str | None = None
    gap_retry_seconds: float = 30.0
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


def parse_broker_url(url: str) -> ParseResult:
    """The wire contract's rule (``device_agent.protocol.parse_broker_url``), as an ``EdgekitError``."""
    try:
        return protocol.parse_broker_url(url)
    except ProtocolError as exc:
        problem, _, fix = str(exc).partition("; ")
        raise EdgekitError(problem, fix) from None
