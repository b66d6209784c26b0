"""Alerts: conditions over the stored windows, opened once, refreshed while they hold, closed when they clear.

Rules (defaults; ``alerts.toml`` changes them)::

    [rules]
    drift_windows = 3          # a feature drifted in this many consecutive windows
    prediction_windows = 2     # the prediction distribution drifted in this many consecutive windows
    null_rate_max = 0.05       # share of missing input values in the latest window
    unseen_rate_max = 0.05     # share of rows with a category the baseline never saw, per column, latest window
    p99_ms_max = 500.0         # latest window's p99 latency
    error_rate_max = 0.05      # refused or failed requests / all requests, latest window
    offline_seconds = 300      # offline (its last will, or a clean stop) for longer than this
    accuracy_drop_max = 0.05   # delayed-label accuracy below the device's earlier windows by more than this
    accuracy_min_labels = 20   # labels a window needs before its accuracy counts
    estimated_accuracy_drop_max = 0.05  # label-free estimate below the bundle's eval accuracy by more than this
    estimated_accuracy_min_rows = 100   # rows a window needs before its estimate counts
    [sinks]
    log = true
    webhook = "http://127.0.0.1:9000/hook"     # POST of the alert as JSON
    command = "python notify.py"               # run with the alert as JSON on stdin
    [sinks.retrain]                            # retrain, promote and roll out on an opened alert (retrain.py)
    command = "python scripts/retrain_digits.py"

Sinks hear about an alert when it opens and when it closes; the retrain sink only when one of its
rules opens, and off the evaluation, in its own worker thread.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgekit.errors import EdgekitError
from edgekit.fleet.retrain import RetrainSink, parse_retrain
from edgekit.fleet.store import SqlStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("edgekit.alerts")
EVALUATE_CHUNK = 1000  # devices whose windows and alerts are read, and whose alerts are written, together


@dataclass(frozen=True)
class AlertRules:
    drift_windows: int = 3
    prediction_windows: int = 2
    null_rate_max: float = 0.05
    unseen_rate_max: float = 0.05
    p99_ms_max: float = 500.0
    error_rate_max: float = 0.05
    offline_seconds: float = 300.0
    accuracy_drop_max: float = 0.05
    accuracy_min_labels: int = 20
    estimated_accuracy_drop_max: float = 0.05
    estimated_accuracy_min_rows: int = 100


@dataclass(frozen=True)
class AlertSinks:
    log: bool = True
    webhook: str | None = None
    command: tuple[str, ...] | None = None
    retrain: RetrainSink | None = None  # [sinks.retrain]: run by the service's ``retrain.Retrainer``


# What each rule takes: (least, most) for a share or a count; the defaults live in AlertRules. A share above
# 1 never fires (the way to turn a rule off is a value of 1), so 5 meaning 5 % is refused, not run as "never".
_RULE_BOUNDS: dict[str, tuple[float, float | None, str]] = {
    "drift_windows": (1, None, "a whole number of consecutive windows, 1 or more"),
    "prediction_windows": (1, None, "a whole number of consecutive windows, 1 or more"),
    "null_rate_max": (0, 1, "a share from 0 to 1 (0.05 is 5 %; 1 turns the rule off)"),
    "unseen_rate_max": (0, 1, "a share from 0 to 1 (0.05 is 5 %; 1 turns the rule off)"),
    "p99_ms_max": (0, None, "a number of milliseconds above 0"),
    "error_rate_max": (0, 1, "a share from 0 to 1 (0.05 is 5 %; 1 turns the rule off)"),
    "offline_seconds": (0, None, "a number of seconds, 0 or more"),
    "accuracy_drop_max": (0, 1, "a share from 0 to 1 (0.05 is 5 points)"),
    "accuracy_min_labels": (0, None, "a whole number of labels, 0 or more"),
    "estimated_accuracy_drop_max": (0, 1, "a share from 0 to 1 (0.05 is 5 points)"),
    "estimated_accuracy_min_rows": (0, None, "a whole number of rows, 0 or more"),
}
_SINK_KEYS = ("log", "webhook", "command", "retrain")
_TABLES = {"rules": tuple(_RULE_BOUNDS), "sinks": _SINK_KEYS}


def load_alert_config(path: str | Path | None) -> tuple[AlertRules, AlertSinks]:
    """``alerts.toml``, read strictly: an unknown table, rule or sink is refused with the closest known name
    (a webhook under a typo would never fire), and every value must be of its kind (``log = "false"`` is
    not false). One ``EdgekitError`` naming the key and the fix."""
    if path is None:
        return AlertRules(), AlertSinks()
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgekitError(f"cannot read the alerts file ({exc.strerror})", "check --alerts", path=path) from exc
    except UnicodeDecodeError as exc:
        raise EdgekitError(f"is not UTF-8 text ({exc.reason})", "save it as UTF-8", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise EdgekitError(f"is not valid TOML ({exc})", "fix the syntax", path=path) from exc
    _check_alert_layout(doc, path)
    return _alert_rules(doc.get("rules", {}), path), _alert_sinks(doc.get("sinks", {}), path)


def _check_alert_layout(doc: dict[str, Any], path: str | Path) -> None:
    """Only [rules] and [sinks], each holding only its own keys; a key in the wrong one is told where it goes."""
    for name, value in doc.items():
        if name not in _TABLES:
            home = next((table for table, keys in _TABLES.items() if name in keys), None)
            if home:
                raise EdgekitError(f"{name} is outside any table", f"put it under [{home}]", path=path)
            close = difflib.get_close_matches(name, list(_TABLES), n=1)
            fix = f"did you mean [{close[0]}]?" if close else "the tables are [rules] and [sinks]"
            raise EdgekitError(f"has no table [{name}]", fix, path=path)
        if not isinstance(value, dict):
            raise EdgekitError(
                f"{name} is not a table", f"write a [{name}] header with its settings below it", path=path
            )
    rules, sinks = doc.get("rules", {}), doc.get("sinks", {})
    unknown = sorted(set(rules) - set(_RULE_BOUNDS))
    if unknown:
        raise EdgekitError(
            f"[rules] has unknown alert rules {unknown}", _fix_for(unknown[0], "rules", "sinks"), path=path
        )
    unknown = sorted(set(sinks) - set(_SINK_KEYS))
    if unknown:
        fix = _fix_for(unknown[0], "sinks", "rules")
        setting = difflib.get_close_matches(unknown[0], ("log", "webhook", "command"), n=1)
        if isinstance(sinks[unknown[0]], dict) and setting and unknown[0] not in _RULE_BOUNDS:  # [sinks.webhok]
            fix = f"did you mean {setting[0]}? It is a setting, not a table: write {setting[0]} = ... under [sinks]"
        raise EdgekitError(f"[sinks] has no sink {unknown[0]!r}", fix, path=path)


def _fix_for(key: str, table: str, other: str) -> str:
    if key in _TABLES[other]:
        return f"{key} belongs in [{other}]: move it under that header"
    close = difflib.get_close_matches(key, _TABLES[table], n=1)
    if close:
        shape = f"[sinks.{close[0]}]" if close[0] == "retrain" else close[0]
        return f"did you mean {shape}?"
    return f"remove it; [{table}] takes {', '.join(_TABLES[table])}"


def _alert_rules(doc: dict[str, Any], path: str | Path) -> AlertRules:
    """[rules]: each a number of its kind (a whole one for counts) within its bounds; never ``int("3")``."""
    defaults, values = AlertRules(), {}
    for name, value in doc.items():
        least, most, what = _RULE_BOUNDS[name]
        whole = isinstance(getattr(defaults, name), int)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        fits = numeric and (not whole or float(value).is_integer())
        above = name == "p99_ms_max"  # a latency limit of 0 would fire on every window
        if not fits or value < least or (above and value <= least) or (most is not None and value > most):
            shown = json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
            raise EdgekitError(
                f"[rules] {name} = {shown} is not {what}",
                f"e.g. {name} = {getattr(defaults, name)} (the default)",
                path=path,
            )
        values[name] = int(value) if whole else float(value)
    return AlertRules(**values)


def _alert_sinks(doc: dict[str, Any], path: str | Path) -> AlertSinks:
    """[sinks]: ``log`` a real true or false, ``webhook`` an http(s) URL, ``command`` a string or a list of them."""
    log_sink = doc.get("log", True)
    if not isinstance(log_sink, bool):
        raise EdgekitError(
            f"[sinks] log = {json.dumps(log_sink)} is not true or false",
            "write log = true or log = false, no quotes",
            path=path,
        )
    webhook = doc.get("webhook")
    if webhook is not None and (not isinstance(webhook, str) or webhook and not _is_http(webhook)):
        raise EdgekitError(
            f"[sinks] webhook = {webhook!r} is not an http(s) URL",
            'write webhook = "http://host:port/path" under [sinks]',
            path=path,
        )
    return AlertSinks(
        log=log_sink,
        webhook=webhook or None,
        command=_command(doc.get("command"), path),
        retrain=parse_retrain(doc["retrain"], path=path) if "retrain" in doc else None,
    )


def _is_http(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _command(command: Any, path: str | Path) -> tuple[str, ...] | None:
    """``[sinks] command`` as argv: a string split as a shell would, or a list of strings; "" is no command."""
    example = 'e.g. command = "python notify.py" or command = ["python", "notify.py"]'
    if isinstance(command, str):
        try:
            return tuple(shlex.split(command)) or None
        except ValueError as exc:  # an unclosed quote
            raise EdgekitError(f"[sinks] command {command!r} cannot be split ({exc})", example, path=path) from None
    if isinstance(command, list) and command and all(isinstance(word, str) for word in command):
        return tuple(command)
    if command is None:
        return None
    raise EdgekitError(f"[sinks] command = {command!r} is not a string or a list of strings", example, path=path)


class AlertEngine:
    def __init__(
        self,
        store: SqlStore,
        rules: AlertRules = AlertRules(),
        sinks: AlertSinks = AlertSinks(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.rules, self.sinks, self.clock = store, rules, sinks, clock
        self._lock = threading.Lock()
        self.retrain: Callable[[dict[str, Any]], None] | None = None  # the retrain sink's queue (service.py)

    def evaluate(self, now: float | None = None, devices: set[str] | None = None) -> list[dict[str, Any]]:
        """Check every device (or only ``devices``); return the alerts that opened or closed.

        ``EVALUATE_CHUNK`` devices at a time: their windows, labels and open alerts read in a few statements
        and the chunk's openings, refreshes and closings written in one transaction (``alert_records.py``),
        so a pass over a large fleet costs a few round trips a thousand devices and bounded memory."""
        now = self.clock() if now is None else now
        changes = []
        with self._lock:
            rows = self.store.devices_for_alerts(None if devices is None else sorted(devices))
            for start in range(0, len(rows), EVALUATE_CHUNK):
                changes += self._evaluate_chunk(rows[start : start + EVALUATE_CHUNK], now)
        return changes

    def _evaluate_chunk(self, devices: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        names = [device["device"] for device in devices]
        depth = max(self.rules.drift_windows, self.rules.prediction_windows, 1)
        recent = self.store.recent_facts_of(names, depth + 5)
        latest_models = {
            name: (facts[0]["model"]["name"], facts[0]["model"]["version"]) for name, facts in recent.items() if facts
        }
        labelled = self.store.labelled_accuracy_of([(name, *model) for name, model in latest_models.items()])
        open_now = self.store.open_alerts_by_device(names)
        opens, closes, order = [], [], []  # ``order``: each device's openings, then its closings, device by device
        for device in devices:
            name = device["device"]
            history = labelled.get((name, *latest_models[name]), []) if name in latest_models else []
            try:
                holding = self._holding(device, recent[name], history, now)
            except Exception:  # a bug, or a stored row no rule expected: this device waits, its alerts stand
                log.exception("alert rules failed on %s; its alerts are left as they are", name)
                continue
            for (rule, subject), (message, evidence) in holding.items():
                evidence = {
                    "device": name,
                    "fleet": device["fleet"],
                    "model": device["model"],
                    "model_version": device["model_version"],
                    **evidence,
                }
                opens.append((rule, name, subject, message, evidence))
                order.append(("open", opens[-1]))
            for rule, subject in sorted(open_now.get(name, set()) - set(holding)):
                closes.append((rule, name, subject))
                order.append(("closed", closes[-1]))
        opened, closed = self.store.apply_alerts(opens, closes, now)
        changes = []
        for state, alert in order:
            rule, name, subject = alert[:3]
            if state == "open" and alert[:3] in opened:
                changes.append(self._notify("open", rule, name, subject, alert[3], alert[4], now))
            elif state == "closed" and alert in closed:
                message = f"{rule} on {subject} cleared"
                changes.append(self._notify("closed", rule, name, subject, message, {"device": name}, now))
        return changes

    def _holding(
        self, device: dict[str, Any], recent: list[dict[str, Any]], labelled: list[tuple[int, float, int]], now: float
    ) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        """The rules that hold for one device: (rule, subject) -> (message, evidence)."""
        name = device["device"]
        depth = max(self.rules.drift_windows, self.rules.prediction_windows, 1)
        # Drift rules look at tested windows only: a window too small for a verdict (an agent's last,
        # flushed on stop) says nothing either way and must not close an alert.
        tested = [f for f in recent if f.get("tested", True)][:depth]
        holding: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        if recent:
            latest = recent[0]
            holding.update(self._drift(tested))
            holding.update(self._latest_window(latest))
            holding.update(self._unseen(latest))
            holding.update(self._accuracy(labelled))
            holding.update(self._estimated_accuracy(recent))
        offline_for = now - (device["last_seen"] or now)
        # Offline is what the device's last will says; silence alone is not (no traffic, no windows).
        if device["online"] is False and offline_for > self.rules.offline_seconds:
            holding[("offline", "device")] = (
                f"{name} has been offline for {offline_for:.0f} s",
                {"last_seen": device["last_seen"], "online": False},
            )
        return holding

    def _drift(self, recent: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        found = {}
        windows = recent[: self.rules.drift_windows]
        if len(windows) == self.rules.drift_windows:
            for feature in windows[0]["drifted"]:
                if all(feature in w["drifted"] for w in windows):
                    psi = [w["drifted"][feature] for w in windows]
                    found[("drift", feature)] = (
                        f"{feature} drifted in {len(windows)} consecutive windows (PSI {psi[0]:.3f})",
                        {
                            "feature": feature,
                            "psi": psi,
                            "seqs": [w["seq"] for w in windows],
                            **_version_of(windows[0]),
                        },
                    )
        windows = recent[: self.rules.prediction_windows]
        if len(windows) == self.rules.prediction_windows and all(w["prediction_drifted"] for w in windows):
            found[("prediction_shift", "prediction")] = (
                f"the prediction distribution shifted in {len(windows)} consecutive windows",
                {"prediction": [w["predictions"] for w in windows], "seqs": [w["seq"] for w in windows]},
            )
        return found

    def _latest_window(self, latest: dict[str, Any]) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        found = {}
        evidence = {"seq": latest["seq"], "window": latest["window"], **_version_of(latest)}
        null_rate = latest["null_rate"]
        if null_rate > self.rules.null_rate_max:
            found[("null_rate", "inputs")] = (
                f"{null_rate:.1%} of input values are missing (limit {self.rules.null_rate_max:.1%})",
                {**evidence, "null_rate": null_rate},
            )
        p99 = latest["p99_ms"]
        if p99 is not None and p99 > self.rules.p99_ms_max:
            found[("latency_p99", "latency")] = (
                f"p99 latency {p99:.1f} ms is over {self.rules.p99_ms_max:.0f} ms",
                {**evidence, "p99_ms": p99},
            )
        errors = sum(latest["errors"].values())
        requests = latest["rows"] + errors
        if requests and errors / requests > self.rules.error_rate_max:
            found[("error_rate", "requests")] = (
                f"{errors / requests:.1%} of requests failed or were refused",
                {**evidence, "errors": latest["errors"], "rows": latest["rows"]},
            )
        return found

    def _unseen(self, latest: dict[str, Any]) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        """One alert per categorical column whose share of never-seen values passed the limit: a new
        country code in production is news for that column, and a second column going bad later
        opens its own alert (and reaches the sinks) rather than refreshing the first one's."""
        limit = self.rules.unseen_rate_max
        evidence = {"seq": latest["seq"], "window": latest["window"], **_version_of(latest)}
        found = {}
        for column, rate in sorted(latest["unseen_columns"].items()):
            if rate > limit:
                found[("unseen_rate", column)] = (
                    f"{rate:.1%} of rows hold a {column} value the baseline never saw (limit {limit:.1%})",
                    {**evidence, "column": column, "unseen_rate": rate, "columns": latest["unseen_columns"]},
                )
        if not found and latest["unseen_rate"] > limit:  # a summary naming no column: still worth saying
            found[("unseen_rate", "inputs")] = (
                f"{latest['unseen_rate']:.1%} of rows hold a category the baseline never saw (limit {limit:.1%})",
                {**evidence, "unseen_rate": latest["unseen_rate"]},
            )
        return found

    def _accuracy(self, windows: list[tuple[int, float, int]]) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        """The latest labelled window's accuracy against the earlier ones' (of the latest window's model
        version; ``windows`` is ``store.labelled_accuracy``, oldest first)."""
        history = [h for h in windows if h[2] >= self.rules.accuracy_min_labels]
        if len(history) < 2:
            return {}
        *earlier, (seq, accuracy, labelled) = history
        reference = sum(a * n for _, a, n in earlier) / sum(n for *_, n in earlier)
        if reference - accuracy > self.rules.accuracy_drop_max:
            return {
                ("accuracy", "labels"): (
                    f"accuracy on delayed labels fell to {accuracy:.3f} from {reference:.3f}",
                    {"seq": seq, "accuracy": accuracy, "reference": reference, "labelled": labelled},
                )
            }
        return {}

    def _estimated_accuracy(self, recent: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        """The newest window large enough for its label-free estimate (``estimate.py``), against the accuracy
        the bundle's calibration expects on its eval data: an early warning before any label arrives. A window
        too small for its estimate to mean much neither opens nor closes it; with no estimate in the recent
        windows (a bundle packaged without ``--eval``) there is nothing to hold, and it closes."""
        window = next(
            (
                f
                for f in recent
                if f.get("estimated_accuracy") is not None and f["rows"] >= self.rules.estimated_accuracy_min_rows
            ),
            None,
        )
        if window is None:
            return {}
        estimated, expected = window["estimated_accuracy"], window["expected_accuracy"]
        if expected - estimated <= self.rules.estimated_accuracy_drop_max:
            return {}
        evidence = {"seq": window["seq"], "window": window["window"], "rows": window["rows"], **_version_of(window)}
        return {
            ("estimated_accuracy_drop", "confidence"): (
                f"estimated accuracy {estimated:.3f} is {100 * (expected - estimated):.1f} points below the "
                f"{expected:.3f} the bundle's eval data showed (from confidence, no labels)",
                {**evidence, "estimated_accuracy": estimated, "expected_accuracy": expected},
            )
        }

    def _notify(
        self, state: str, rule: str, device: str, subject: str, message: str, evidence: dict[str, Any], now: float
    ) -> dict[str, Any]:
        alert = {
            "state": state,
            "rule": rule,
            "device": device,
            "subject": subject,
            "message": message,
            "evidence": evidence,
            "at": now,
        }
        if self.sinks.log:
            (log.warning if state == "open" else log.info)(
                "alert %s: %s %s/%s: %s", state, rule, device, subject, message
            )
        if self.sinks.webhook or self.sinks.command:
            threading.Thread(target=self._deliver, args=(alert,), name="edgekit-alert-sink", daemon=True).start()
        if self.retrain is not None:
            self.retrain(alert)  # only queues it: the pipeline runs in the sink's worker
        return alert

    def _deliver(self, alert: dict[str, Any]) -> None:
        body = json.dumps(alert, default=str).encode()
        if self.sinks.webhook:
            try:
                request = urllib.request.Request(
                    self.sinks.webhook, data=body, headers={"Content-Type": "application/json"}, method="POST"
                )
                urllib.request.urlopen(request, timeout=10).close()
            except OSError as exc:
                log.warning("alert webhook %s failed: %s", self.sinks.webhook, exc)
        if self.sinks.command:
            try:
                done = subprocess.run(list(self.sinks.command), input=body, capture_output=True, timeout=300)
                if done.returncode:
                    log.warning(
                        "alert command %s exited %d: %s",
                        self.sinks.command[0],
                        done.returncode,
                        done.stderr[-300:].decode(errors="replace"),
                    )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("alert command %s failed: %s", self.sinks.command[0], exc)

    def list(self, *, open_only: bool = False, limit: int = 200) -> list[dict[str, Any]]:
        return self.store.alerts(open_only=open_only, limit=limit)

    def open_counts(self) -> dict[str, int]:
        return dict(Counter(a["rule"] for a in self.store.alerts(open_only=True, limit=100000)))


def _version_of(window: dict[str, Any]) -> dict[str, Any]:
    """The model version the window was sketched under, for the evidence: the device may already run a newer
    one when the alert is refreshed on its older windows (the loop's retrained model, just swapped in)."""
    model = window.get("model")
    version = model.get("version") if isinstance(model, dict) else None
    return {} if version is None else {"model_version": version}
