"""The MQTT contract between devices and the fleet: topics, payloads, their codec and checks.

Topics live under ``edgekit/v1/<fleet>/<device>/``:

- ``state``    retained; ``online`` birth on connect, retained last will ``offline``
- ``baseline`` retained; the active model's baseline profile, so a collector can merge windows
- ``summary``  QoS 1; one closed window (see ``build_summary`` and docs/protocol.md)
- ``cmd``      commands to the device, e.g. ``{"schema": "edgekit.cmd/1", "cmd": "resend", "seqs": [4, 5]}``
  or ``"cmd": "upload"`` (field samples: ``upload`` id, ``url``, ``since``, ``drifted_only``)
- ``desired`` / ``reported``  rollout state (OTA)
- ``input`` / ``output``  optional streaming inference

Every payload is compact JSON with a ``schema`` field, at most ``MAX_PAYLOAD_BYTES``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import ParseResult, urlparse

import numpy as np

from .errors import ProtocolError
from .monitor import ClosedWindow
from .profile import Profile

TOPIC_ROOT = "edgekit/v1"
# 2: quality gains unseen_rate; a categorical column's compact sketch is [counts, nulls, unseen];
# a feature's drift entry carries "drifted" only when true
# (per-column shares: the collector's merge.column_quality). Collectors read version 1 too.
SUMMARY_SCHEMA = "edgekit.summary/2"
READABLE_SUMMARY_SCHEMAS = ("edgekit.summary/1", SUMMARY_SCHEMA)
STATE_SCHEMA = "edgekit.state/1"
BASELINE_SCHEMA = "edgekit.baseline/1"
COMMAND_SCHEMA = "edgekit.cmd/1"
# 2: a revert carries a signed edgekit.revert/1 instruction (docs/protocol.md, "Signed reverts"). Install and
# rollback did not change and are still written as /1, which agents older than /2 read; agents read both.
DESIRED_SCHEMA = "edgekit.desired/2"
LEGACY_DESIRED_SCHEMA = "edgekit.desired/1"
READABLE_DESIRED_SCHEMAS = (LEGACY_DESIRED_SCHEMA, DESIRED_SCHEMA)
REPORTED_SCHEMA = "edgekit.reported/1"
ROLLBACK_SCHEMA = "edgekit.rollback/1"
REVERT_SCHEMA = "edgekit.revert/1"
UPDATE_ACTIONS = ("install", "revert", "rollback")
TERMINAL_UPDATE_STATES = ("succeeded", "failed", "rolled_back", "aborted")
MAX_PAYLOAD_BYTES = 256 * 1024
_LEVEL_TEXT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a fleet or device id: one MQTT topic level
_LEVEL = re.compile(rf"^{_LEVEL_TEXT}$")
UPLINK = ("state", "summary", "baseline", "reported")  # what devices publish and the collector reads
# A device topic the collector takes in, parsed: fleet, device and leaf (one compiled pattern: ingest's hot path).
UPLINK_TOPIC = re.compile(
    rf"^{TOPIC_ROOT}/(?P<fleet>{_LEVEL_TEXT})/(?P<device>{_LEVEL_TEXT})/(?P<leaf>{'|'.join(UPLINK)})$"
)


def parse_broker_url(url: str) -> ParseResult:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` (devices and collectors alike), or
    ``ProtocolError("url", ...)`` saying what is wrong and how to write it."""
    parsed = urlparse(url)
    try:
        parsed.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ProtocolError(
            "url", f"broker URL {url!r} has an invalid port; ports are 1-65535, e.g. mqtt://127.0.0.1:1883"
        ) from None
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ProtocolError(
            "url", f"broker URL {url!r} is not mqtt://host[:port] or mqtts://host[:port]; e.g. mqtt://127.0.0.1:1883"
        )
    return parsed


def fleet_filter(leaf: str, *, share_group: str | None = None) -> str:
    """The subscription filter for ``leaf`` from every device of every fleet; with ``share_group``, an
    MQTT 5 shared subscription that splits the messages among the group's members."""
    topic = f"{TOPIC_ROOT}/+/+/{leaf}"
    return f"$share/{share_group}/{topic}" if share_group else topic


def command_payload(cmd: str, **fields: Any) -> dict[str, Any]:
    """A command to a device (``cmd`` topic), e.g. ``command_payload("resend", seqs=[4, 5])``."""
    return {"schema": COMMAND_SCHEMA, "cmd": cmd, **fields}


@dataclass(frozen=True)
class Topics:
    fleet: str
    device: str

    def __post_init__(self) -> None:
        for label, value in (("fleet", self.fleet), ("device", self.device)):
            if not _LEVEL.match(value):
                raise ProtocolError(
                    "topic", f"{label} {value!r} cannot be an MQTT topic level (letters, digits, '.', '_', '-')"
                )

    def __getattr__(self, leaf: str) -> str:
        if leaf in ("state", "baseline", "summary", "cmd", "desired", "reported", "input", "output"):
            return f"{TOPIC_ROOT}/{self.fleet}/{self.device}/{leaf}"
        raise AttributeError(leaf)


def encode(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("size", f"payload of {len(data)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    return data


try:  # a collector parses thousands of summaries a second; orjson is faster where it is installed
    from orjson import JSONDecodeError as _OrjsonError
    from orjson import loads as _loads

    _JSON_ERRORS: tuple[type[BaseException], ...] = (ValueError, UnicodeDecodeError, _OrjsonError)
except ImportError:  # the device and a plain install use the standard library
    _loads = json.loads
    _JSON_ERRORS = (ValueError, UnicodeDecodeError)


def decode(data: bytes, schema: str | tuple[str, ...]) -> dict[str, Any]:
    """Parse a payload and check its schema field (one, or any of several readable versions);
    raise ``ProtocolError`` with a reason otherwise."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("size", f"payload of {len(data)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        doc = _loads(data)
    except _JSON_ERRORS as exc:
        raise ProtocolError("json", f"payload is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ProtocolError("json", "payload is not a JSON object")
    if _may_hold_nul(data) and _holds_nul(doc):
        raise ProtocolError(
            "nul", "payload has a string with a NUL character (\\u0000), which no store keeps; send text without NULs"
        )
    if doc.get("schema") not in ((schema,) if isinstance(schema, str) else schema):
        raise ProtocolError("schema", f"payload schema is {doc.get('schema')!r}, expected {schema!r}")
    return doc


def _may_hold_nul(data: bytes | str) -> bool:
    """Whether the raw payload shows the escape of a NUL (JSON cannot carry a raw one): the backslash first,
    one ``memchr`` (0.2 µs over 11 KB where the escape's search alone took 6), as summaries rarely hold one."""
    slash, escape = (b"\\", b"\\u0000") if isinstance(data, bytes) else ("\\", "\\u0000")
    return slash in data and escape in data


def _holds_nul(value: Any) -> bool:
    """Whether any string of the parsed payload, key or value, holds NUL: PostgreSQL refuses it in text, so a
    device id or an error text with one would fail the collector's whole batch. Walked only when the raw bytes
    show the escape (``_may_hold_nul``), so a summary's hot path pays one byte search. A loop, not recursion:
    a payload nested a thousand deep must be refused, not raise ``RecursionError``."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def state_payload(
    *,
    online: bool,
    device: str,
    fleet: str,
    model: dict[str, Any] | None,
    runtime: str | None,
    agent_version: str,
    last_seq: int | None = None,
    issued_at: float | None = None,
) -> dict[str, Any]:
    """The retained ``state``; ``last_seq`` (optional, see ``with_last_seq``) is the newest summary's seq.

    ``issued_at`` (default: now) is when the device made this state, by its own clock. A broker keeps one
    retained state per topic, so a device that moved fleets leaves its old fleet's state behind, replayed to
    every collector that connects: the time is how a collector tells the old claim from the current one.
    Added within ``edgekit.state/1``, like ``last_seq``."""
    doc = {
        "schema": STATE_SCHEMA,
        "device": device,
        "fleet": fleet,
        "online": online,
        "model": model,
        "runtime": runtime,
        "agent_version": agent_version,
        "issued_at": round(time.time() if issued_at is None else issued_at, 3),
    }
    return with_last_seq(doc, last_seq)


def with_last_seq(state: dict[str, Any], last_seq: int | None, seq_base: int | None = None) -> dict[str, Any]:
    """``state`` announcing the seq of the newest summary the device has made, so a collector sees windows
    lost at the end (no later summary shows their gap), and where this install's numbering began (``seq_base``,
    as in its summaries): a new install's ``last_seq`` is far past anything the collector stored, and the base
    is what its losses are counted from. A copy; unchanged when there is no summary yet (0 or None).
    Added within ``edgekit.state/1``: collectors that predate them ignore the fields, newer ones accept their
    absence."""
    if not last_seq:
        return dict(state)
    return {**state, "last_seq": int(last_seq), **({"seq_base": int(seq_base)} if seq_base else {})}


def baseline_payload(*, device: str, model: dict[str, Any], baseline: Profile) -> dict[str, Any]:
    return {
        "schema": BASELINE_SCHEMA,
        "device": device,
        "model": model,
        "baseline_id": baseline.baseline_id,
        "profile": baseline.to_dict(),
    }


def build_summary(
    window: ClosedWindow,
    *,
    device: str,
    fleet: str,
    model: dict[str, Any],
    seq: int,
    seq_base: int | None = None,
) -> dict[str, Any]:
    """A closed window as the summary message: the monitor has already measured its drift. ``seq_base`` is
    where this install's numbering began (``Spool.seq_base``; None for a spool older than bases: not sent)."""
    profile = window.profile
    return {
        "schema": SUMMARY_SCHEMA,
        "device": device,
        "fleet": fleet,
        "model": model,
        "seq": seq,
        "rows": profile.rows,
        "window": {"start": iso(window.start), "end": iso(window.end)},
        "drift": _wire_drift(window.drift),
        "predictions": _predictions(profile),
        "quality": _quality(profile),
        "latency": _latency(window.latencies_ms),
        "errors": window.errors,
        "accuracy": {
            "labelled": window.labelled,
            "correct": window.correct,
            "accuracy": window.correct / window.labelled,
        }
        if window.labelled
        else None,
        "profile": profile.to_compact(),
        **_sampling(window),
        **({"seq_base": seq_base} if seq_base else {}),
    }


def _sampling(window: ClosedWindow) -> dict[str, Any]:
    """``sampling`` when the CPU budget sketched a sample of the window's rows: the share kept and the rows
    left out (``rows`` and the drift tests count the rows sketched). Absent when every row was sketched,
    so such a summary is byte for byte what it was; a collector that does not know it ignores it."""
    if not window.sampled_out:
        return {}
    return {"sampling": {"rate": round(window.sample_rate, 6), "skipped_rows": window.sampled_out}}


def _wire_drift(drift: dict[str, Any]) -> dict[str, Any]:
    """The window's drift report as sent: a feature's ``drifted`` only when true (summary/2), which
    keeps a 64-feature summary within 128 bytes a feature; readers take a missing flag as false."""
    features = drift.get("features")
    if not features:
        return drift
    slim = {
        name: v if v.get("drifted") else {k: x for k, x in v.items() if k != "drifted"} for name, v in features.items()
    }
    return {**drift, "features": slim}


def _predictions(profile: Profile) -> dict[str, Any]:
    sketch = profile.outputs.get("prediction")
    if sketch is None:
        return {}
    if sketch.kind == "categorical":
        classes = {str(c): int(n) for c, n in zip(sketch.categories, sketch.counts[:-1], strict=True) if n}
        if sketch.counts[-1]:
            classes["other"] = int(sketch.counts[-1])
        return {"classes": classes}
    return {
        "mean": sketch.mean,
        "std": sketch.std,
        "min": sketch.minimum if sketch.count else None,
        "max": sketch.maximum if sketch.count else None,
    }


def _quality(profile: Profile) -> dict[str, Any]:
    """Data quality of the window, in totals. ``unseen_rate`` is the highest share of rows, in any
    categorical column, holding a value the baseline never saw (an alert rule watches it). Per-column
    shares are not repeated here: the collector derives them from the compact profile, which carries
    every column's missing, unseen and out-of-range counts already (``edgekit.fleet.merge.column_quality``)."""
    numeric = [s for s in profile.features if s.kind == "numeric"]
    categorical = [s for s in profile.features if s.kind == "categorical"]
    nulls = sum(s.nulls for s in profile.features)
    cells = profile.rows * max(1, profile.width)  # a per-row sketch (a tensor's pixel values) counts per_row values
    return {
        "nulls": int(nulls),
        "infs": int(sum(s.infs for s in numeric)),
        "out_of_range": int(sum(s.counts[0] + s.counts[-1] for s in numeric)),
        "null_rate": nulls / cells if cells else 0.0,
        "unseen_rate": _short(max((s.unseen / profile.rows for s in categorical if profile.rows), default=0.0)),
    }


def _latency(latencies: np.ndarray) -> dict[str, Any]:
    if latencies.size == 0:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"p50_ms": _short(p50), "p99_ms": _short(p99), "max_ms": _short(latencies.max())}


def _short(value: float) -> float | None:
    return float(f"{value:.4g}") if math.isfinite(value) else None


def command(data: bytes) -> dict[str, Any]:
    doc = decode(data, COMMAND_SCHEMA)
    if doc.get("cmd") == "resend":
        seqs = doc.get("seqs")
        if not isinstance(seqs, list) or not all(isinstance(s, int) and s >= 0 for s in seqs) or len(seqs) > 10000:
            raise ProtocolError("field", "resend needs 'seqs': a list of at most 10000 non-negative integers")
        return doc
    if doc.get("cmd") == "upload":  # field samples (capture.py): where to send them, and which
        since = doc.get("since")
        if (
            not isinstance(doc.get("upload"), str)
            or not _LEVEL.match(doc["upload"])
            or not str(doc.get("url", "")).startswith(("http://", "https://"))
            or not isinstance(doc.get("drifted_only", False), bool)
            or not (since is None or (isinstance(since, (int, float)) and not isinstance(since, bool)))
        ):
            raise ProtocolError("field", "upload needs 'upload' (an id), 'url' (http), 'since' and 'drifted_only'")
        return doc
    raise ProtocolError("field", f"unknown command {doc.get('cmd')!r}")


def check_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """The fields a collector relies on, with their types; ``ProtocolError("field", ...)`` otherwise."""
    _require(
        doc,
        {
            "device": str,
            "fleet": str,
            "model": dict,
            "seq": int,
            "rows": int,
            "window": dict,
            "drift": dict,
            "profile": dict,
            "quality": dict,
            "latency": dict,
            "errors": dict,
        },
    )
    if not _LEVEL.match(doc["device"]) or not _LEVEL.match(doc["fleet"]):
        raise ProtocolError("field", "device and fleet must be valid topic levels")
    _require(doc["model"], {"name": str, "version": int}, "model.")
    _require(doc["window"], {"start": str, "end": str}, "window.")
    _require(
        doc["profile"],
        {"baseline_id": str, "rows": int, "features": list, "outputs": dict, "latency_ms": list},
        "profile.",
    )
    if doc["seq"] < 1 or doc["rows"] < 0:
        raise ProtocolError("field", "seq must be ≥ 1 and rows ≥ 0")
    _optional(doc, {"seq_base": int})  # added within summary/2: where the install's numbering began
    if doc.get("seq_base") is not None and not 1 <= doc["seq_base"] <= doc["seq"]:
        raise ProtocolError("field", "seq_base must be an integer from 1 to the summary's seq")
    features = doc["drift"].get("features")
    if not isinstance(features, dict) or not all(isinstance(v, dict) for v in features.values()):
        raise ProtocolError("field", "drift.features must map feature names to objects")
    if doc["drift"].get("drifted") not in (True, False, None):
        raise ProtocolError("field", "drift.drifted must be true, false or null")
    _optional(doc["drift"], {"worst_feature": str, "prediction": dict}, "drift.")
    _optional(doc["quality"], {"null_rate": (int, float), "unseen_rate": (int, float)}, "quality.")
    _optional(doc["latency"], {"p99_ms": (int, float)}, "latency.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in doc["errors"].values()):
        raise ProtocolError("field", "errors must map kinds to counts")
    if doc.get("accuracy") is not None:
        _require(doc["accuracy"], {"labelled": int, "correct": int}, "accuracy.")
        value = doc["accuracy"].get("accuracy")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
        ):
            raise ProtocolError("field", "accuracy.accuracy must be a number in [0, 1] or null")
    if doc.get("sampling") is not None:
        _require(doc["sampling"], {"skipped_rows": int}, "sampling.")
        rate = doc["sampling"].get("rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ProtocolError("field", "sampling.rate must be a number in (0, 1]")
        if doc["sampling"]["skipped_rows"] < 0:
            raise ProtocolError("field", "sampling.skipped_rows must be ≥ 0")
    return doc


def check_state(doc: dict[str, Any]) -> dict[str, Any]:
    """The fields a collector relies on. Fields it does not know are let through, never refused: that is
    how ``last_seq`` joined ``edgekit.state/1`` without a version bump."""
    _require(doc, {"device": str, "fleet": str, "online": bool})
    if doc.get("model") is not None:
        _require(doc["model"], {"name": str, "version": int}, "model.")
    _optional(doc, {"runtime": str, "agent_version": str, "last_seq": int, "seq_base": int, "issued_at": (int, float)})
    if doc.get("last_seq") is not None and not 0 <= doc["last_seq"] < MAX_INT:
        raise ProtocolError("field", "last_seq must be a seq: an integer ≥ 0")
    if doc.get("seq_base") is not None and not 1 <= doc["seq_base"] <= (doc.get("last_seq") or 0):
        raise ProtocolError("field", "seq_base must be a seq from 1 to last_seq (where this install's numbering began)")
    if doc.get("issued_at") is not None and not 0 <= doc["issued_at"] < MAX_INT:  # NaN fails this too
        raise ProtocolError("field", "issued_at must be a time: seconds since 1970, ≥ 0")
    return doc


def check_baseline(doc: dict[str, Any]) -> dict[str, Any]:
    _require(doc, {"device": str, "baseline_id": str, "model": dict, "profile": dict})
    _require(doc["model"], {"name": str, "version": int}, "model.")
    return doc


def _optional(doc: dict[str, Any], fields: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(doc, dict):
        raise ProtocolError("field", f"{prefix.rstrip('.') or 'payload'} must be an object")
    for name, kind in fields.items():
        value = doc.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ProtocolError("field", f"{prefix}{name} has the wrong type ({type(value).__name__})")


MAX_INT = 2**53  # what JSON numbers hold exactly, and SQLite's INTEGER with room to spare


def _require(doc: dict[str, Any], fields: dict[str, type], prefix: str = "") -> None:
    if not isinstance(doc, dict):
        raise ProtocolError("field", f"{prefix.rstrip('.') or 'payload'} must be an object")
    for name, kind in fields.items():
        value = doc.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError("field", f"{prefix}{name} must be {kind.__name__}, got {type(value).__name__}")
        if kind is int and not -MAX_INT < value < MAX_INT:
            raise ProtocolError("field", f"{prefix}{name} is out of range")


def desired_payload(*, rollout: str, action: str, name: str, version: int, **fields: Any) -> dict[str, Any]:
    """What the fleet wants a device to run (``desired``, retained); ``check_desired`` says what each action needs:
    ``url``, ``sha256``, ``size`` (and ``signature``, ``health``, ``shadow``) to install, ``from_version``,
    ``instruction`` and ``instruction_signature`` to revert or roll back.

    Each message is labelled with the oldest schema that describes it: only a (signed) revert is ``desired/2``,
    so agents that read only ``desired/1`` keep installing and rolling back under a newer collector."""
    schema = DESIRED_SCHEMA if action == "revert" else LEGACY_DESIRED_SCHEMA
    return {"schema": schema, "rollout": rollout, "action": action, "name": name, "version": version, **fields}


def rollback_instruction(*, fleet: str, name: str, version: int, sha256: str, issued_at: float) -> dict[str, Any]:
    """What the fleet's private key signs to let devices go *down* to ``version`` (devices check it themselves)."""
    return {
        "schema": ROLLBACK_SCHEMA,
        "fleet": fleet,
        "name": name,
        "version": version,
        "sha256": sha256,
        "issued_at": issued_at,
    }


def revert_instruction(
    *, rollout: str, fleet: str, name: str, version: int, sha256: str, issued_at: float
) -> dict[str, Any]:
    """What the fleet's private key signs, when a rollout starts, to let the devices it moves undo it if it is
    aborted: back from ``name`` ``version`` (the bundle ``sha256``) to the slot they came from. ``rollout`` is
    the rollout's id, chosen by the signer, so the instruction undoes that rollout and no other."""
    return {
        "schema": REVERT_SCHEMA,
        "rollout": rollout,
        "fleet": fleet,
        "name": name,
        "version": version,
        "sha256": sha256,
        "issued_at": issued_at,
    }


def check_desired(doc: dict[str, Any]) -> dict[str, Any]:
    """What the fleet wants this device to run (see docs/protocol.md, "Rollouts").

    ``install``: fetch ``url``, check ``size``/``sha256``/signature, go up to ``version``.
    ``revert``: undo rollout ``rollout`` by going back to the previous slot, if it holds ``from_version``;
    the updater applies it only with an ``instruction`` signed by the fleet key. An unsigned one passes this
    check so that the device can refuse it in a report (``reported``) rather than in its log alone.
    ``rollback``: go *down* to ``version``; allowed only with an ``instruction`` signed by the fleet key.
    """
    _require(doc, {"rollout": str, "action": str, "name": str, "version": int})
    if doc["action"] not in UPDATE_ACTIONS:
        raise ProtocolError("field", f"action must be one of {', '.join(UPDATE_ACTIONS)}")
    if doc["action"] == "revert":
        _require(doc, {"from_version": int})
        _optional(doc, {"instruction": dict, "instruction_signature": str})
        return doc
    _require(doc, {"url": str, "sha256": str, "size": int})
    if not re.fullmatch(r"[0-9a-f]{64}", doc["sha256"]) or doc["size"] <= 0:
        raise ProtocolError("field", "sha256 must be 64 hex digits and size positive")
    if not doc["url"].startswith(("http://", "https://")):
        raise ProtocolError("field", "url must be http:// or https://")
    _optional(doc, {"shadow": dict, "health": dict, "signature": str})
    if doc["action"] == "rollback":
        _require(doc, {"instruction": dict, "instruction_signature": str})
    return doc


def reported_payload(
    *,
    device: str,
    fleet: str,
    rollout: str,
    version: int,
    state: str,
    reason: str = "",
    code: str | None = None,
    active: dict[str, Any] | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """One step of an update, as the device saw it: ``state`` is a step name or a terminal state
    (succeeded, failed, rolled_back, aborted); ``code`` is the machine-readable cause of a failure."""
    return {
        "schema": REPORTED_SCHEMA,
        "device": device,
        "fleet": fleet,
        "rollout": rollout,
        "version": version,
        "state": state,
        "reason": reason,
        "code": code,
        "active": active,
        "at": iso(time.time()),
        **facts,
    }


def check_reported(doc: dict[str, Any]) -> dict[str, Any]:
    _require(doc, {"device": str, "fleet": str, "rollout": str, "version": int, "state": str})
    _optional(doc, {"reason": str, "code": str, "active": dict, "shadow": dict, "download": dict})
    if len(doc["state"]) > 32:
        raise ProtocolError("field", "state is too long")
    return doc
