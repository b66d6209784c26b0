"""Publishing summaries over MQTT with paho-mqtt 2.x, without ever losing a closed window.

Every summary is already in the spool when ``publish`` is called; it leaves the spool only when
the broker's PUBACK arrives. On every (re)connect the birth message and baseline are published
(retained), the command topic is subscribed, and the whole spool is drained in ``seq`` order.
paho's network loop runs in its own thread and reconnects with backoff; nothing here blocks the
caller on the network.

Every state this reporter publishes carries ``last_seq``, the spool's newest seq, and a small thread
publishes it again every ``state_seconds`` when windows closed since: a window that reached a
collector which then died shows as a gap only once a later one arrives, and for the last windows
before a quiet spell nothing later comes. The retained state reaches every collector.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from . import mqtt_fallback
from .config import MqttConfig
from .errors import ProtocolError, RuntimeUnavailableError
from .protocol import Topics, command, encode, with_last_seq
from .spool import Spool

log = logging.getLogger("device_agent.reporter")


def _paho():
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "paho-mqtt is not installed; pip install 'paho-mqtt>=2' (or 'edgekit-ml[agent]')"
        ) from exc
    return mqtt


class MqttReporter:
    def __init__(
        self,
        config: MqttConfig,
        topics: Topics,
        spool: Spool,
        *,
        client_id: str,
        birth: Callable[[], dict[str, Any]],
        offline: dict[str, Any],
        retained: Callable[[], list[tuple[str, dict[str, Any]]]] = lambda: [],
        on_input: Callable[[bytes], None] | None = None,
        on_desired: Callable[[bytes], None] | None = None,
        on_upload: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config, self.topics, self.spool = config, topics, spool
        self._on_upload = on_upload  # ``cmd: upload`` (field samples, capture.py); None: ignored
        self.client_id = client_id
        self._birth, self._offline, self._retained, self._on_input, self._on_desired = (
            birth,
            offline,
            retained,
            on_input,
            on_desired,
        )
        # ``_lock`` serialises sends and guards ``_inflight``; paho is called while it is held. paho
        # calls ``on_publish`` while holding its own outgoing-message lock, so that callback must never
        # wait for ``_lock`` (the two would deadlock, freezing the device's MQTT). It only queues the
        # PUBACK in ``_acks``; whoever holds or next takes ``_lock`` matches it (see ``_locked``).
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid -> seq
        self._acks: deque = deque()  # (mid, failed) from on_publish, not yet matched
        self.connected = threading.Event()
        self.rejected_commands = 0
        self.protocol = "5"  # falls back to "3.1.1" when the broker does not speak MQTT 5
        self._client = None
        self._announced_seq = -1  # the last_seq of the newest state published
        # Held while a state is built and handed to paho, so a periodic one built just before a model
        # swap cannot go out after the swap's own. paho never waits for it (only this class's callers do).
        self._state_lock = threading.Lock()
        self._stopped = threading.Event()
        self._announcer: threading.Thread | None = None

    def start(self) -> None:
        mqtt = _paho()
        protocol = mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol
        )
        client.will_set(self.topics.state, encode(self._offline), qos=1, retain=True)
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls:
            client.tls_set()
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(0)
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_publish, client.on_message = self._on_publish, self._on_message
        self._notes = mqtt_fallback.ConnectionNotes(log, self.config.url, self.client_id)
        client.on_connect_fail = self._notes.connect_failed
        self._client = client
        client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        client.loop_start()
        if self._announcer is None:  # one for the reporter's life, through fallbacks and restarts
            self._stopped.clear()
            self._announcer = threading.Thread(target=self._announce_seq, name="edgekit-state", daemon=True)
            self._announcer.start()
        if self.protocol == "5":
            mqtt_fallback.watch(
                self.connected,
                self.config.host,
                self.config.port,
                lambda: self._fall_back("the broker did not answer an MQTT 5 connect"),
                still_relevant=lambda: self._client is client and self.protocol == "5",
            )

    def _fall_back(self, why: str) -> None:
        log.info("%s; reconnecting with MQTT 3.1.1", why)
        self.protocol = "3.1.1"
        threading.Thread(target=self._restart, name="edgekit-mqtt-fallback", daemon=True).start()

    def publish(self, seq: int, payload: bytes) -> None:
        """Send a spooled summary now if connected; otherwise it goes out with the next drain."""
        with self._locked():
            if self.connected.is_set():
                self._send(seq, payload)

    def publish_raw(self, topic: str, payload: dict[str, Any], *, qos: int = 1, retain: bool = False) -> None:
        if self._client is not None and self.connected.is_set():
            self._client.publish(topic, encode(payload), qos=qos, retain=retain)

    def announce(self) -> None:
        """Publish the birth message and the retained messages again (after a model swap)."""
        client = self._client
        if client is not None and self.connected.is_set():
            self._publish_state(client, self._birth)
            for topic, payload in self._retained():
                client.publish(topic, encode(payload), qos=1, retain=True)

    def _publish_state(self, client, state: Callable[[], dict[str, Any]]):
        """Publish the state ``state()`` builds (retained), with the spool's newest seq as ``last_seq``."""
        with self._state_lock:
            last_seq = self.spool.last_seq()
            announced = with_last_seq(state(), last_seq, self.spool.seq_base())
            info = client.publish(self.topics.state, encode(announced), qos=1, retain=True)
            self._announced_seq = last_seq
        return info

    def _announce_seq(self) -> None:
        """Every ``state_seconds``, the state again if windows closed since the last one said so."""
        while not self._stopped.wait(self.config.state_seconds):
            client = self._client
            try:
                if client is not None and self.connected.is_set() and self.spool.last_seq() != self._announced_seq:
                    self._publish_state(client, self._birth)
            except Exception:  # a bad moment (a swap, a full disk) must not end the announcements
                log.exception("could not republish the state")

    def stop(self, timeout: float = 2.0) -> None:
        self._stopped.set()
        if self._announcer is not None:
            self._announcer.join(timeout=2)
            self._announcer = None
        client, self._client = self._client, None
        if client is None:
            return
        if self.connected.is_set():
            info = self._publish_state(client, lambda: self._offline)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        client.disconnect()
        client.loop_stop()
        self.connected.clear()

    # -- paho callbacks (network thread) -----------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if mqtt_fallback.refused_for_version(reason_code) and self.protocol == "5":
                self._fall_back("the broker does not speak MQTT 5")
                return
            log.warning("broker refused the connection: %s", reason_code)
            return
        self._publish_state(client, self._birth)
        for topic, payload in self._retained():
            client.publish(topic, encode(payload), qos=1, retain=True)
        client.subscribe(self.topics.cmd, qos=1)
        if self._on_desired is not None:
            client.subscribe(self.topics.desired, qos=1)
        if self._on_input is not None:
            client.subscribe(self.topics.input, qos=1)
        with self._locked():
            self._inflight.clear()
            self.connected.set()
            for seq in self.spool.pending():
                payload = self.spool.get(seq)
                if payload is not None:
                    self._send(seq, payload)

    def _restart(self) -> None:
        old, self._client = self._client, None
        if old is not None:
            old.disconnect()
            old.loop_stop()
        self.start()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._notes.disconnected(reason_code)
        with self._locked():
            self.connected.clear()
            self._inflight.clear()  # still pending in the spool: drained again on reconnect

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.append((mid, reason_code.is_failure))
        self._match_acks()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            yield
        self._match_acks()  # PUBACKs queued while the lock was held

    def _match_acks(self) -> None:
        """Match queued PUBACKs to summaries, never waiting for ``_lock``: if another thread holds it,
        that thread matches them when it lets go (an ack is queued before the try, so none is missed)."""
        while self._acks:
            if not self._lock.acquire(blocking=False):
                return
            try:
                matched = []
                while self._acks:
                    mid, failed = self._acks.popleft()
                    seq = self._inflight.pop(mid, None)  # other publishes (state, reports) have no seq
                    if seq is not None and not failed:
                        matched.append(seq)
            finally:
                self._lock.release()
            for seq in matched:
                self.spool.ack(seq)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topics.input and self._on_input is not None:
            self._on_input(message.payload)
            return
        if message.topic == self.topics.desired and self._on_desired is not None:
            self._on_desired(message.payload)
            return
        try:
            doc = command(message.payload)
        except ProtocolError as exc:
            self.rejected_commands += 1
            log.warning("ignored a command on %s: %s", message.topic, exc)
            return
        if doc["cmd"] == "upload":  # not on paho's network thread: the handler starts its own
            if self._on_upload is not None:
                self._on_upload(doc)
            return
        with self._locked():
            for seq in doc["seqs"]:
                payload = self.spool.get(seq)
                if payload is not None and self.connected.is_set():
                    self._send(seq, payload)

    def _send(self, seq: int, payload: bytes) -> None:
        info = self._client.publish(self.topics.summary, payload, qos=1)
        self._inflight[info.mid] = seq
