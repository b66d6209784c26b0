"""Who may call the collector's HTTP routes: the operator's API token, and the device token.

Its own module because two route tables use it (``web.py`` and the field-sample routes in
``samples.py``), and neither should import the other to check a header.
"""

from __future__ import annotations

import hmac
from typing import Any

from device_agent.wsgi import Request


def bearer_ok(request: Request, *tokens: str | None) -> bool:
    """Whether the request bears one of ``tokens`` (those set); True when none is set (an open collector).
    Every token is compared, in constant time, so the answer's timing does not tell which one nearly matched."""
    offered = request.header("authorization").encode("utf-8", "replace")
    wanted = [f"Bearer {token}".encode() for token in tokens if token]
    return not wanted or any([hmac.compare_digest(offered, token) for token in wanted])


def device_route_ok(collector: Any, request: Request) -> bool:
    """The routes a device calls (bundle downloads, field-sample uploads) take the device token or the API
    token; every other authenticated route takes the API token only."""
    return bearer_ok(request, collector.config.api_token, getattr(collector.config, "device_token", None))
