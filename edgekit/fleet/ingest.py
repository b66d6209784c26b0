"""Turning raw MQTT messages into stored facts, refusing everything that is not well-formed.

Each message is checked in order: topic shape, size, JSON, schema, fields, that the payload's
device and fleet are the topic's (no device speaks for another), and, when an allow-list is given,
that the device is known. Rejections are counted per reason (in the store and in memory for
/metrics) and logged at most once per device and reason per minute. Nothing a device sends can
raise out of ``handle``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_agent.errors import ProtocolError
from device_agent.protocol import (
    BASELINE_SCHEMA,
    MAX_PAYLOAD_BYTES,
    READABLE_SUMMARY_SCHEMAS,
    REPORTED_SCHEMA,
    STATE_SCHEMA,
    UPLINK_TOPIC,
    check_baseline,
    check_reported,
    check_state,
    check_summary,
    decode,
)
from edgekit.errors import StoreDataError, StoreUnavailable
from edgekit.fleet.estimate import Estimates
from edgekit.fleet.store import FleetStore, SummaryRecord

log = logging.getLogger("edgekit.fleet")
LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    received_at: float


class Ingestor:
    def __init__(
        self,
        store: FleetStore,
        *,
        allowed_devices: set[str] | None = None,
        clock: Callable[[], float] = time.time,
        on_report: Callable[[dict[str, Any], float], None] | None = None,
    ) -> None:
        self.store, self.allowed, self.clock, self.on_report = store, allowed_devices, clock, on_report
        self.counters: Counter = Counter()
        self.touched: set[str] = set()  # devices with news since the alert engine last looked
        self._last_logged: dict[tuple[str, str], float] = {}
        self.estimates = Estimates(store.baseline, clock=clock)  # each window's label-free accuracy estimate

    def handle(self, messages: list[Message]) -> Counter:
        """Check and store a batch (one transaction for its summaries); return what happened to it."""
        outcome: Counter = Counter()
        summaries: list[SummaryRecord] = []
        for message in messages:
            try:
                kind, doc = self._check(message)
                if kind == "summary":  # reduced at once: the parsed document dies young
                    record = SummaryRecord.of(doc, message.payload.decode(), self.estimates.facts(doc))
            except ProtocolError as exc:
                self._reject(exc.reason, device_of(message.topic), str(exc), message.received_at)
                outcome[f"rejected_{exc.reason}"] += 1
                continue
            except Exception as exc:  # a collector must outlive any payload; this is a bug, so log it loudly
                log.exception("unexpected error on %s", message.topic)
                self._reject("internal", device_of(message.topic), repr(exc), message.received_at)
                outcome["rejected_internal"] += 1
                continue
            if kind in ("summary", "state"):
                self.touched.add(doc["device"])
            if kind == "summary":
                summaries.append(record)
            else:
                self._store_one(kind, doc, message, outcome)
        if summaries:
            self._store_summaries(summaries, outcome)
        self.counters.update(outcome)
        return outcome

    def _store_one(self, kind: str, doc: dict[str, Any], message: Message, outcome: Counter) -> None:
        """A state, report or baseline, each in its own transaction. One the store refuses (``StoreDataError``),
        or that a bug fails, is counted and dropped here: raised, it would leave the whole batch unacknowledged,
        redelivered forever (and a retained state would poison every restart). ``StoreUnavailable`` leaves:
        the batch is not acknowledged, and is tried again."""
        try:
            if kind == "state":
                if self.store.record_state(doc, message.received_at) is False:  # another fleet's stale claim
                    outcome["stale_states"] += 1
                    return
            elif kind == "reported":
                if self.on_report is not None:
                    self.on_report(doc, message.received_at)
            else:
                self.estimates.learn(doc)
                self.store.record_baseline(doc, message.received_at)
        except StoreUnavailable:
            raise
        except Exception as exc:  # StoreDataError, or a bug in the report's handler: this message alone
            if not isinstance(exc, StoreDataError):
                log.exception("unexpected error storing %s", message.topic)
            self._reject("internal", device_of(message.topic), repr(exc), message.received_at)
            outcome["rejected_internal"] += 1
            return
        outcome[{"state": "states", "reported": "reports", "baseline": "baselines"}[kind]] += 1

    def _store_summaries(self, summaries: list[SummaryRecord], outcome: Counter) -> None:
        """One transaction for the batch; if it fails, one per summary, so a single bad one cannot
        poison the batch (unacknowledged, it would be redelivered forever)."""
        try:
            stored, duplicates, reused = self.store.add_summaries(summaries, self.clock())
        except StoreDataError:  # StoreUnavailable leaves: the batch is not acknowledged, and tried again
            stored = duplicates = 0
            reused = []
            for item in summaries:
                try:
                    s, d, r = self.store.add_summaries([item], self.clock())
                except StoreDataError as exc:
                    self._reject("internal", item.device, repr(exc), self.clock())
                    outcome["rejected_internal"] += 1
                    continue
                stored, duplicates = stored + s, duplicates + d
                reused += r
        outcome["stored"] += stored
        outcome["duplicates"] += duplicates
        for record in reused:  # counted by the store already, in the batch's transaction
            outcome["rejected_seq-reused"] += 1
            self._warn(
                "seq-reused",
                record.device,
                f"seq {record.seq} (window end {record.window_end}) is stored with another window: state dir reset "
                "under an agent that sends no seq_base? Upgrade it (new installs then number past old ones)",
                self.clock(),
            )

    def _check(self, message: Message) -> tuple[str, dict[str, Any]]:
        match = UPLINK_TOPIC.match(message.topic)
        if match is None:
            raise ProtocolError(
                "topic",
                f"topic {message.topic[:100]!r} is not edgekit/v1/<fleet>/<device>/(state|summary|baseline|reported)",
            )
        if not message.payload and match["leaf"] in ("state", "reported"):
            raise ProtocolError("json", f"empty {match['leaf']} payload (a retained message was cleared)")
        if len(message.payload) > MAX_PAYLOAD_BYTES:
            raise ProtocolError(
                "size", f"payload of {len(message.payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
            )
        leaf = match["leaf"]
        schema, check = {
            "summary": (READABLE_SUMMARY_SCHEMAS, check_summary),
            "state": (STATE_SCHEMA, check_state),
            "baseline": (BASELINE_SCHEMA, check_baseline),
            "reported": (REPORTED_SCHEMA, check_reported),
        }[leaf]
        doc = check(decode(message.payload, schema))
        if leaf != "baseline" and (doc["device"] != match["device"] or doc["fleet"] != match["fleet"]):
            raise ProtocolError(
                "mismatch",
                f"payload says {doc['fleet']}/{doc['device']} but was published on {match['fleet']}/{match['device']}",
            )
        if self.allowed is not None and match["device"] not in self.allowed:
            raise ProtocolError("unknown-device", f"device {match['device']!r} is not in the fleet's device list")
        return leaf, doc

    def _reject(self, reason: str, device: str, why: str, now: float) -> None:
        self.store.count_reject(reason, device, now)
        self._warn(reason, device, why, now)

    def _warn(self, reason: str, device: str, why: str, now: float) -> None:
        """The log line of a rejection, at most one per device and reason every ``LOG_INTERVAL``."""
        key = (device, reason)
        if now - self._last_logged.get(key, 0.0) >= LOG_INTERVAL:
            self._last_logged[key] = now
            log.warning("rejected a payload from %s (%s): %s", device or "?", reason, why[:200])


def device_of(topic: str) -> str:
    """The device an uplink topic names ("" for a topic that is not edgekit's): for logs and reject counts."""
    parts = topic.split("/")
    return parts[3][:64] if len(parts) >= 5 and parts[0] == "edgekit" else ""
