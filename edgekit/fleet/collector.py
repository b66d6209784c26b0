"""``edgekit fleet collect``: the long-running collector.

MQTT: a persistent MQTT 5 session (clean_start off), so what devices send while the collector is
down waits on the broker; summaries through a shared subscription
(``$share/<group>/edgekit/v1/+/+/summary``) so several collectors split one fleet; state and baselines
through plain subscriptions (shared ones get no retained messages). Acknowledgements are manual and
sent only after the SQLite transaction holding the message has committed, so a collector killed at
any moment loses nothing: the broker redelivers, and the store ignores what it already has.
Brokers without MQTT 5 get MQTT 3.1.1 with a persistent session and no shared subscription.

The session expires ``session_expiry_seconds`` (default 120) after a disconnect, not a day later:
a broker keeps handing a share of the group's summaries, and of the resends they cause, to a member
that is down but whose session lives. A restart within the expiry takes that queue over; a collector
that never comes back strands its share only until the expiry, after which the broker drops the
session and routes everything to the live members, and the gap requests (repeated every
``gap_retry_seconds`` until the window arrives) fetch the stranded windows from the devices' spools.
Windows lost last (nothing after them shows the gap) are seen through ``last_seq`` in the devices'
retained ``state``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any

from device_agent import mqtt_fallback
from device_agent.protocol import Topics, command_payload, encode, fleet_filter
from edgekit.errors import StoreError, StoreUnavailable, require
from edgekit.fleet.config import CollectorConfig, parse_broker_url
from edgekit.fleet.ingest import Ingestor, Message, device_of
from edgekit.fleet.store import CollectorStore, open_store

log = logging.getLogger("edgekit.fleet")
BATCH_MAX = 1000
BATCH_WAIT = 0.05
RECEIVE_MAXIMUM = BATCH_MAX * 5  # one drain's worth (about 50 MB of 10 KB summaries)
STORE_BACKOFF_MAX = 30.0  # seconds between attempts while the database is unreachable
GAP_CHECK_SECONDS = 5.0
# Alert rules run on the devices with news at most this often, not after every batch: under a burst
# a batch touches most of the fleet, and evaluating each device per batch cost more than storing.
ALERT_SECONDS = 1.0
# ... and, under a burst, no more than this share of the writer thread's time: the pause after a pass is at
# least its own duration times (1 / share - 1). The leader's writer evaluated ~1,000 devices a second in the
# two-collector bench (four statements a device) and stored half what the other collector did.
ALERT_SHARE = 0.25
# Every device (for rules that fire on silence, such as offline) is checked this often.
FULL_ALERT_PASS_SECONDS = 30.0
ROLLOUT_TICK = 0.25


class Collector:
    """MQTT in, the store out: ingest, gap requests, and the alert and rollout ticks it drives.

    What it works with (the store, the alert engine, the rollout controller) is handed to it; the
    fleet service (``service.py``) composes them with the ingest workers and the web server."""

    def __init__(
        self,
        config: CollectorConfig,
        *,
        store: CollectorStore | None = None,
        alerts: Any = None,
        rollouts: Any = None,
        leader: Any = None,
    ) -> None:
        """With a ``leader`` (``leader.Leadership``), the gap requests, the alert passes and the rollout ticks
        are its duties, listed in ``service.FleetService.leader_duties``, and the alert rules on devices with
        news run only while this collector leads; without one, this collector runs them all itself."""
        self.config = config
        self.leader = leader
        self.store = store or open_store(config.db)
        self.ingest_only = config.role == "ingest"
        self.rollouts = rollouts
        self.alerts = alerts
        self.ingestor = Ingestor(
            self.store,
            allowed_devices=set(config.allowed_devices) if config.allowed_devices else None,
            on_report=None if self.rollouts is None else self.rollouts.record_report,
        )
        self.protocol = "5"
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker confirmed the subscriptions: what is published now arrives
        self.received = 0
        self._queue: deque = deque()
        self._store_backoff, self._store_retry_at = 0.0, 0.0  # while the database is unreachable (drain)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._client = None
        self._threads: list[threading.Thread] = []
        self._alerts_at, self._alerts_pause = 0.0, 0.0
        self.unusable = threading.Event()  # an ingest worker on a broker without shared subscriptions has nothing to do
        self._summary_watermark = self.store.summary_watermark() if config.workers > 1 or leader else 0

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> Collector:
        self._connect()
        roles = [(self._writer, "edgekit-collector-writer")]
        if not self.ingest_only and self.leader is None:  # else the leader's duties
            roles.append((self._housekeeping, "edgekit-collector-gaps"))
        if self.rollouts is not None and self.leader is None:
            roles.append((self._rollout_loop, "edgekit-collector-rollouts"))
        for target, name in roles:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self.store.close()

    def _connect(self) -> None:
        mqtt = require("paho.mqtt.client", "host")
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        parsed = parse_broker_url(self.config.broker)
        v5 = self.protocol == "5"
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if parsed.scheme == "mqtts":
            client.tls_set()
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect, client.on_message, client.on_disconnect = (
            self._on_connect,
            self._on_message,
            self._on_disconnect,
        )
        client.on_subscribe = lambda *_: self.subscribed.set()
        self._notes = mqtt_fallback.ConnectionNotes(log, self.config.broker, self.config.client_id)
        client.on_connect_fail = self._notes.connect_failed
        kwargs: dict[str, Any] = {}
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.config.session_expiry_seconds
            # Backpressure: a broker that honours it sends no more unacknowledged messages than this, and
            # messages are acknowledged only once stored, so a collector that falls behind (a slow database)
            # holds at most this many and the broker queues the rest. Mosquitto 2.0.11 was measured to honour
            # it while messages come one at a time and to go past it in a fast burst: behind it, a collector's
            # memory grows with its lag (docs/scaling.md).
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            kwargs = {"clean_start": False, "properties": properties}
        self._client = client
        port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)  # checked by parse_broker_url
        client.connect_async(parsed.hostname, port, keepalive=30, **kwargs)
        client.loop_start()
        if v5:
            mqtt_fallback.watch(
                self.connected,
                parsed.hostname,
                port,
                self._fall_back,
                still_relevant=lambda: self._client is client and self.protocol == "5",
            )

    def _fall_back(self) -> None:
        log.info("the broker does not speak MQTT 5; using MQTT 3.1.1 (no shared subscription)")
        self.protocol = "3.1.1"
        threading.Thread(target=self._reconnect_older, daemon=True).start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if mqtt_fallback.refused_for_version(reason_code) and self.protocol == "5":
                self._fall_back()
            else:
                log.warning("the broker refused the collector: %s", reason_code)
            return
        summary = fleet_filter("summary", share_group=self.config.group if self.protocol == "5" else None)
        if self.ingest_only:
            if self.protocol != "5":  # a plain subscription would make this worker store every summary a second time
                log.error(
                    "ingest worker %s: the broker has no MQTT 5 shared subscriptions, "
                    "so workers cannot split the summaries; run one process",
                    self.config.client_id,
                )
                self.unusable.set()
                return
            client.subscribe([(summary, 1)])  # state, baselines and reports are the main process's
        else:
            client.subscribe(
                [
                    (fleet_filter("state"), 1),
                    (fleet_filter("baseline"), 1),
                    (fleet_filter("reported"), 1),
                    (summary, 1),
                ]
            )
        self.connected.set()
        log.info("collector connected to %s (MQTT %s)", self.config.broker, self.protocol)

    def _reconnect_older(self) -> None:
        old, self._client = self._client, None
        old.disconnect()
        old.loop_stop()
        self._connect()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self._notes.disconnected(reason_code)

    def _on_message(self, client, userdata, message) -> None:
        self._queue.append((Message(message.topic, message.payload, time.time()), message.mid, message.qos))
        self.received += 1
        if len(self._queue) >= BATCH_MAX:
            self._wake.set()

    # -- threads ---------------------------------------------------------------------------------------
    def _writer(self) -> None:
        """Never ends while the collector runs: a writer gone silent would leave this collector connected, so the
        broker would keep handing it a share of the group's summaries that nothing stores or acknowledges."""
        while not self._stop.is_set():
            self._wake.wait(BATCH_WAIT)
            self._wake.clear()
            try:
                self.drain()
            except Exception:  # a bug: logged loudly; what was not stored stays unacknowledged
                log.exception("the collector's writer failed; it goes on")
                self._stop.wait(1.0)

    def drain(self) -> int:
        """Store what has arrived, then acknowledge it (never before the commit); return how many were stored.

        When the database is unreachable the batch goes back to the front of the queue, unacknowledged,
        and is tried again after a backoff that doubles up to STORE_BACKOFF_MAX: nothing is lost, and
        nothing is acknowledged that was not committed. A batch that raises anything else is stored in
        parts (``_store_in_parts``), so one message the code cannot handle costs only itself."""
        if time.monotonic() < self._store_retry_at:
            return 0
        batch = []
        while self._queue and len(batch) < BATCH_MAX * 5:
            batch.append(self._queue.popleft())
        if not batch:
            self._evaluate_alerts()  # devices whose news came in under ALERT_SECONDS ago
            return 0
        try:
            self.ingestor.handle([m for m, _, _ in batch])
        except StoreUnavailable as exc:
            self._hold(batch, f"the fleet database is unavailable ({exc})")
            return 0
        except Exception as exc:  # a bug, not the database: find the message(s) at fault
            log.warning("a batch of %d messages failed (%r); storing it in parts", len(batch), exc)
            stored, held = self._store_in_parts(batch)
            if held:
                return stored
        else:
            stored = len(batch)
            self._acknowledge(batch)
        self._store_backoff = 0.0
        self._evaluate_alerts()
        return stored

    def _store_in_parts(self, batch: list) -> tuple[int, bool]:
        """Store a batch that raised an unexpected exception by halves, acknowledging each part once stored,
        down to the single messages that raise on their own; return (stored, whether some were held back).

        Unacknowledged, a message holds one of the broker's inflight slots (our ReceiveMaximum) until the
        connection drops, and comes back after a reconnect only to fail the same way with its batch: a few
        bad batches would stall this collector's share of the fleet, and lose the good messages in them
        until a restart. So a message that raises on its own is logged once (topic, device, size and
        traceback), counted (``edgekit_collector_messages_total{outcome="failed"}`` and the store's rejects)
        and acknowledged: a redelivery would fail the same way, and the log keeps what is needed to find the
        bug. It is given up only when some other part of the batch went through, proof that the code works
        and this message is what breaks it; when nothing went through (a bug that fails every message) the
        batch is held, unacknowledged, and tried again with what arrives next, after the store backoff.
        ``StoreUnavailable`` at any point puts everything not yet stored back, unacknowledged, and backs off."""
        parts, failed, stored = deque([batch]), [], 0
        while parts:
            part = parts.popleft()
            try:
                self.ingestor.handle([m for m, _, _ in part])
            except StoreUnavailable as exc:
                self._hold(
                    [item for item, _ in failed] + part + [item for p in parts for item in p],
                    f"the fleet database is unavailable ({exc})",
                )
                return stored, True
            except Exception as exc:
                if len(part) == 1:
                    failed.append((part[0], exc))
                else:  # the halves go first, in order, so messages are stored in the order they came
                    parts.extendleft((part[len(part) // 2 :], part[: len(part) // 2]))
                continue
            self._acknowledge(part)
            stored += len(part)
        if failed and not stored:
            self._hold(
                [item for item, _ in failed],
                f"every message of a batch of {len(batch)} failed ({failed[0][1]!r}), "
                "a bug rather than one bad message; they stay unacknowledged",
            )
            return 0, True
        for item, exc in failed:
            self._give_up(item, exc)
        return stored, False

    def _give_up(self, item: tuple[Message, int, int], exc: Exception) -> None:
        """Log, count and acknowledge one message that the collector cannot store (``_store_in_parts`` says why)."""
        message = item[0]
        device = device_of(message.topic)
        log.error(
            "dropped a message the collector cannot store: %s (device %s, %d bytes): %r",
            message.topic[:200],
            device or "?",
            len(message.payload),
            exc,
            exc_info=exc,
        )
        self.ingestor.counters["failed"] += 1
        try:  # seen by every collector sharing the store (ingest workers included), if the store takes it
            self.store.count_reject("failed", device, time.time())
        except Exception as count_error:
            log.warning("could not count the dropped message in the store (%r)", count_error)
        self._acknowledge([item])

    def _acknowledge(self, items: list) -> None:
        client = self._client
        for _, mid, qos in items:
            if qos and client is not None:
                client.ack(mid, qos)

    def _hold(self, items: list, why: str) -> None:
        """Put unstored messages back at the front of the queue, unacknowledged, and back off."""
        self._queue.extendleft(reversed(items))
        self._store_backoff = min(max(2 * self._store_backoff, 0.5), STORE_BACKOFF_MAX)
        self._store_retry_at = time.monotonic() + self._store_backoff
        log.warning("%s; retrying in %.1f s", why, self._store_backoff)

    def _evaluate_alerts(self) -> None:
        """Run the alert rules on the devices that sent something since the last run (at most every
        ALERT_SECONDS, and at most ALERT_SHARE of this thread's time; after a restart, the housekeeping's full
        pass covers what was left)."""
        now = time.monotonic()
        if self.alerts is None or now - self._alerts_at < max(ALERT_SECONDS, self._alerts_pause):
            return
        if self.leader is not None and not self.leader.leading():  # the leader evaluates what anyone stored
            self._alerts_at, self.ingestor.touched = now, set()
            with contextlib.suppress(StoreError):  # a new leader starts from here, after its full pass
                self._summary_watermark = self.store.summary_watermark()
            return
        if self.config.workers > 1 or self.leader is not None:  # devices with summaries past the watermark,
            # stored by the ingest workers or other collectors
            self._alerts_at = now  # this query, too, at most every ALERT_SECONDS
            try:
                devices, self._summary_watermark = self.store.devices_with_summaries_after(self._summary_watermark)
            except StoreError as exc:  # the watermark stays: the next look finds these devices
                log.warning("alert rules wait for the fleet database (%s)", exc)
                return
            self.ingestor.touched |= devices
        if not self.ingestor.touched:
            return
        self._alerts_at = now
        touched, self.ingestor.touched = self.ingestor.touched, set()
        try:
            self.alerts.evaluate(devices=touched)
        except StoreError as exc:  # evaluated again next time (twice is harmless: an open alert is refreshed)
            self.ingestor.touched |= touched
            log.warning("alert rules wait for the fleet database (%s)", exc)
            return
        self._alerts_pause = (time.monotonic() - now) * (1 / ALERT_SHARE - 1)

    def _housekeeping(self) -> None:
        full_pass_at = time.monotonic()
        while not self._stop.wait(min(GAP_CHECK_SECONDS, self.config.gap_retry_seconds)):
            try:
                self.request_gaps()
                if self.alerts is not None and time.monotonic() - full_pass_at >= FULL_ALERT_PASS_SECONDS:
                    full_pass_at = time.monotonic()
                    self.alerts.evaluate()
            except Exception:
                log.exception("housekeeping failed")

    def _rollout_loop(self) -> None:
        while not self._stop.wait(ROLLOUT_TICK):
            try:
                self.rollouts.tick()
            except Exception:
                log.exception("rollout controller tick failed")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Publish with QoS 1; False when not connected (the caller tries again later)."""
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        return client.publish(topic, payload, qos=1, retain=retain).rc == 0

    def request_gaps(self) -> int:
        """Ask devices for the windows the store is missing, each again every ``gap_retry_seconds`` for as long
        as it is missing: a resend can itself be routed into a dead member's session until that expires,
        so a request is never taken as answered."""
        client = self._client
        if client is None or not self.connected.is_set():
            return 0
        fleets = {d["device"]: d["fleet"] for d in self.store.status()}
        wanted = self.store.gaps_to_request(time.time(), retry_after=self.config.gap_retry_seconds)
        for device, seqs in wanted.items():
            topic = Topics(fleets.get(device, "default"), device).cmd
            client.publish(topic, encode(command_payload("resend", seqs=seqs)), qos=1)
        return sum(len(s) for s in wanted.values())
