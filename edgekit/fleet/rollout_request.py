"""``POST /api/rollouts``: the JSON body ``edgekit rollout start`` sends, checked field by field into a
``RolloutSpec`` and handed to the controller (``rollouts.RolloutController.start``).

Imports: edgekit.errors, edgekit.fleet.rollout_spec.
"""

from __future__ import annotations

import re
from typing import Any

from edgekit.errors import RolloutError
from edgekit.fleet.rollout_spec import (
    DEFAULT_ABORT_ON,
    RolloutSpec,
    ab_settings,
    parse_abort_rules,
    parse_duration,
    parse_waves,
)


def start_from_request(controller: Any, doc: dict[str, Any]) -> str:
    """``POST /api/rollouts``: the JSON body the CLI sends, checked field by field."""
    sha256 = doc.get("sha256")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise RolloutError(
            "sha256 must name an uploaded bundle (64 hex digits)", "POST the bundle to /api/bundles first"
        )
    fleet = doc.get("fleet") or "default"
    try:
        spec = RolloutSpec(
            waves=parse_waves(str(doc.get("waves") or "100%")),
            wave_wait=parse_duration(doc.get("wave_wait") or 0),
            abort_on=parse_abort_rules(doc.get("abort_on", DEFAULT_ABORT_ON)),
            shadow_rows=int(doc.get("shadow_rows") or 0),
            shadow_timeout=parse_duration(doc.get("shadow_timeout") or 300),
            health_seconds=parse_duration(doc.get("health_seconds") or 10),
            device_timeout=parse_duration(doc.get("device_timeout") or 900),
            devices=str(doc.get("devices") or "*"),
            **ab_settings(doc),
        )
    except (TypeError, ValueError) as exc:
        raise RolloutError(
            f"the rollout request has a bad value ({exc})", "see 'edgekit rollout start --help'"
        ) from exc
    if spec.shadow_rows < 0:
        raise RolloutError("shadow_rows must be 0 or more")
    return controller.start(sha256, str(fleet), spec, revert=doc.get("revert"))
