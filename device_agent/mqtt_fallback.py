"""Falling back to MQTT 3.1.1 when a broker does not speak MQTT 5, for the agent and the collector alike.

Some 3.1.1 brokers answer an MQTT 5 CONNECT with "unsupported protocol version"; others (amqtt,
when the CONNECT carries a will or session properties) drop it without a CONNACK. The first case is
seen in ``on_connect``; the second by a watchdog: if the broker's port accepts TCP but MQTT 5 has
not connected after a few seconds, it is an older broker, not a dead one.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

UNSUPPORTED_PROTOCOL_VERSION = 132  # MQTT 5 CONNACK reason; paho maps MQTT 3's return code 1 to it too
FALLBACK_AFTER_SECONDS = 3.0


def refused_for_version(reason_code) -> bool:
    return reason_code.is_failure and reason_code.value == UNSUPPORTED_PROTOCOL_VERSION


def watch(
    connected: threading.Event,
    host: str,
    port: int,
    fall_back: Callable[[], None],
    *,
    still_relevant: Callable[[], bool],
) -> None:
    """Call ``fall_back`` if ``connected`` is not set in time while the broker's port answers."""

    def run() -> None:
        if connected.wait(FALLBACK_AFTER_SECONDS) or not still_relevant():
            return
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError:
            return  # the broker is down, not old: paho keeps retrying MQTT 5
        fall_back()

    threading.Thread(target=run, name="edgekit-mqtt-watchdog", daemon=True).start()


SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: another client connected with the same client id


class ConnectionNotes:
    """Log connection trouble without flooding: at most once a minute per kind."""

    def __init__(self, log, broker: str, client_id: str, interval: float = 60.0) -> None:
        import time

        self.log, self.broker, self.client_id, self.interval, self._time = (
            log,
            broker,
            client_id,
            interval,
            time.monotonic,
        )
        self._last: dict[str, float] = {}

    def _once(self, kind: str, message: str, *args) -> None:
        now = self._time()
        if now - self._last.get(kind, -self.interval) >= self.interval:
            self._last[kind] = now
            self.log.warning(message, *args)

    def connect_failed(self, client, userdata) -> None:
        self._once(
            "unreachable",
            "cannot reach the MQTT broker at %s; retrying (check the URL, the network and that the broker runs)",
            self.broker,
        )

    def disconnected(self, reason_code) -> None:
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            self._once(
                "takeover",
                "another client connected as %r and took over this session: "
                "give every agent and collector its own client id",
                self.client_id,
            )
        elif getattr(reason_code, "is_failure", False):
            self._once("lost", "lost the MQTT connection to %s (%s); reconnecting", self.broker, reason_code)
