"""The retrain sink: an alert starts a retraining, the champion/challenger gate, and a shadow-gated rollout.

Configured in ``alerts.toml`` beside the other sinks::

    [sinks.retrain]
    rules = ["drift"]                            # the alert rules it acts on (default: drift)
    models = ["digits"]                          # the models it retrains (default: every model)
    command = "python scripts/retrain_digits.py --train fixtures/digits_train.npz"
    champion = "bundles/digits-3.edgebundle"     # default: the bundle the device runs, as uploaded here
    data = ["fixtures/digits_test.csv"]          # the champion's gate data (files it was gated on, must come back)
    trained_on = ["fixtures/digits_train.npz"]   # what the command trains on besides the field rows
    baseline = "trained"                         # the new drift baseline: trained (the first trained_on) or field
    min_gain = 0.005                             # promote's --min-gain and --max-regression
    max_regression = 0.01
    key = "/etc/edgekit/fleet.key"               # the fleet's PRIVATE key; without it: awaiting an operator
    holdout = 0.25                               # labelled field rows kept out of training, for the gate
    timeout = "30m"                              # the command's; samples_timeout waits for the upload
    cooldown = "6h"                              # per device and model: a flapping alert retrains once
    [sinks.retrain.rollout]                      # absent: stop after the bundle is stored
    fleet = "default"                            # default: the alert's device's fleet
    devices = "*"                                # "{device}": only the alert's device
    waves = "10%,50%,100%"
    shadow_rows = 200                            # shadow gating: live rows scored beside the live model first
    abort_on = "failed>20%,p99_ms>50"            # default failed>20%: no agreement rule (see _rollout)

An opened alert of one of ``rules`` is queued; one worker thread runs one pipeline at a time, off the
alert evaluation: ask the device for its field samples and wait for the upload; export the labelled
rows (a ``holdout`` share, chosen by a hash of the row id, apart); run ``command`` with a JSON document
on stdin (``RETRAIN_SCHEMA``: the alert, its evidence, the samples file, the training files, a work
directory) and read the model file's path off the last line it prints; ``promote`` it against the
champion on ``data`` plus the holdout; store the winner as an uploaded bundle; start a rollout with
a revert signed by ``key``. Every step is a row of the alert's timeline (``store/timeline_records.py``),
shown at ``/alerts/<id>/timeline`` and ``/api/alerts/<id>/timeline``.

The key is a trade-off, and explicit: promote signs the new bundle and the rollout's revert with the
fleet's private key, which the collector otherwise never holds. Without ``key`` the sink stops after
the command, and its last step, ``awaiting an operator``, names the promote and rollout commands to run
on the machine that holds the key. Relative paths are read from the alerts file's folder, where the
command runs.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekit.errors import EdgekitError
from edgekit.fleet import retrain_steps as steps
from edgekit.fleet.retrain_steps import Run, Stop
from edgekit.fleet.rollout_spec import RolloutSpec, parse_abort_rules, parse_duration, parse_waves

log = logging.getLogger("edgekit.retrain")
_KEYS = {
    "rules", "models", "baseline", "command", "champion", "data", "trained_on", "min_gain", "max_regression",
    "quantize", "key", "holdout", "timeout", "samples_timeout", "cooldown", "workdir", "rollout",
}  # fmt: skip
_ROLLOUT_KEYS = {
    "fleet",
    "devices",
    "waves",
    "wave_wait",
    "shadow_rows",
    "shadow_timeout",
    "abort_on",
    "health_seconds",
}


@dataclass(frozen=True)
class RetrainRollout:
    """``[sinks.retrain.rollout]``: where a promoted bundle goes, and how (``fleet`` None: the alert's)."""

    spec: RolloutSpec
    fleet: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # as written, for the operator's command line


@dataclass(frozen=True)
class RetrainSink:
    command: tuple[str, ...]
    rules: tuple[str, ...] = ("drift",)
    models: tuple[str, ...] = ()  # empty: every model
    baseline: str = "trained"  # the new bundle's drift baseline: "trained" (the first trained_on) or "field"
    champion: str | None = None
    data: tuple[str, ...] = ()
    trained_on: tuple[str, ...] = ()
    min_gain: float = 0.0
    max_regression: float = 0.0
    quantize: str = "auto"
    key: str | None = None
    holdout: float = 0.25
    timeout: float = 1800.0
    samples_timeout: float = 300.0
    cooldown: float = 6 * 3600.0
    workdir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "edgekit-retrain"))
    cwd: str = "."
    rollout: RetrainRollout | None = None


def parse_retrain(doc: Any, *, path: str | Path) -> RetrainSink:
    """``[sinks.retrain]`` of the alerts file at ``path``; one ``EdgekitError`` naming the key and the fix."""

    def bad(problem: str, fix: str = "see docs/retrain.md") -> EdgekitError:
        return EdgekitError(f"[sinks.retrain] {problem}", fix, path=path)

    if not isinstance(doc, dict):
        raise bad("is not a table", "write it as [sinks.retrain] with command = ...")
    unknown = set(doc) - _KEYS
    if unknown:
        raise bad(f"has unknown keys {sorted(unknown)}", f"use {', '.join(sorted(_KEYS))}")
    base = Path(path).resolve().parent
    command = doc.get("command")
    if not command or not isinstance(command, (str, list)):
        raise bad("needs command", 'e.g. command = "python scripts/retrain_digits.py"')
    try:
        values = _values(doc, base)
    except (TypeError, ValueError, EdgekitError) as exc:
        raise bad(f"has a bad value ({getattr(exc, 'problem', exc)})") from exc
    if not 0 <= values["holdout"] < 1:
        raise bad(f"holdout {values['holdout']} is outside 0..1", "give a share of the labelled rows, e.g. 0.25")
    for name in ("min_gain", "max_regression"):
        if not 0 <= values[name] <= 1:
            raise bad(f"{name} {values[name]} is outside 0..1", "give a fraction, e.g. 0.005")
    if values["baseline"] not in ("trained", "field"):
        raise bad(
            f"baseline {values['baseline']!r} is not trained or field",
            "trained: the first trained_on file; field: the rows of the device's drifted windows",
        )
    if values["quantize"] not in ("auto", "int8", "none"):
        raise bad(f"quantize {values['quantize']!r} is not auto, int8 or none")
    if values["key"] and not Path(values["key"]).is_file():
        raise bad(
            f"key {values['key']} is not a file", "give the fleet's private key (edgekit keygen) or leave key out"
        )
    import shlex

    argv = tuple(shlex.split(command) if isinstance(command, str) else (str(a) for a in command))
    return RetrainSink(command=argv, cwd=str(base), rollout=_rollout(doc.get("rollout"), bad), **values)


def _values(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    def files(name: str) -> tuple[str, ...]:
        given = doc.get(name, [])
        return tuple(str(base / f) for f in ([given] if isinstance(given, str) else given))

    rules, models = doc.get("rules", ["drift"]), doc.get("models", [])
    values: dict[str, Any] = {
        "rules": (rules,) if isinstance(rules, str) else tuple(str(r) for r in rules),
        "models": (models,) if isinstance(models, str) else tuple(str(m) for m in models),
        "baseline": str(doc.get("baseline", "trained")),
        "data": files("data"),
        "trained_on": files("trained_on"),
        "min_gain": float(doc.get("min_gain", 0.0)),
        "max_regression": float(doc.get("max_regression", 0.0)),
        "quantize": str(doc.get("quantize", "auto")),
        "holdout": float(doc.get("holdout", 0.25)),
        "timeout": parse_duration(doc.get("timeout", 1800)),
        "samples_timeout": parse_duration(doc.get("samples_timeout", 300)),
        "cooldown": parse_duration(doc.get("cooldown", 6 * 3600)),
        "champion": str(base / doc["champion"]) if doc.get("champion") else None,
        "key": str(base / doc["key"]) if doc.get("key") else None,
    }
    if doc.get("workdir"):
        values["workdir"] = str(base / doc["workdir"])
    return values


def _rollout(doc: Any, bad: Callable[..., EdgekitError]) -> RetrainRollout | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise bad("rollout is not a table", "write it as [sinks.retrain.rollout]")
    unknown = set(doc) - _ROLLOUT_KEYS
    if unknown:
        raise bad(f"rollout has unknown keys {sorted(unknown)}", f"use {', '.join(sorted(_ROLLOUT_KEYS))}")
    # No agreement rule by default: a model retrained because the field moved is meant to disagree with the
    # one it replaces; the shadow phase still proves it loads, answers live rows without errors, and how fast.
    options = {"waves": "100%", "shadow_rows": 200, "abort_on": "failed>20%", **doc}
    try:
        spec = RolloutSpec(
            waves=parse_waves(str(options["waves"])),
            wave_wait=parse_duration(options.get("wave_wait", 0)),
            abort_on=parse_abort_rules(str(options["abort_on"])),
            shadow_rows=int(options["shadow_rows"]),
            shadow_timeout=parse_duration(options.get("shadow_timeout", 300)),
            health_seconds=parse_duration(options.get("health_seconds", 10)),
            devices=str(options.get("devices", "*")),
        )
    except (TypeError, ValueError, EdgekitError) as exc:
        raise bad(f"rollout has a bad value ({getattr(exc, 'problem', exc)})") from exc
    if spec.shadow_rows < 0:
        raise bad("rollout shadow_rows is below 0", "0 for no shadow phase, e.g. 200")
    return RetrainRollout(spec, str(doc["fleet"]) if doc.get("fleet") else None, options)


class TimelineStore(Protocol):
    """What the pipeline uses of the store (``store/timeline_records.py``, ``store/sample_records.py``)."""

    def alert_id(self, rule: str, device: str, subject: str, opened_at: float) -> int | None: ...

    def start_retrain(self, alert_id: int, rule: str, device: str, model: str, now: float) -> bool: ...

    def last_retrain(self, device: str, model: str, *, before: int) -> dict[str, Any] | None: ...

    def add_timeline_step(
        self, alert_id: int, step: str, status: str, message: str, detail: dict[str, Any], now: float
    ) -> None: ...

    def finish_retrain(self, alert_id: int, state: str, outcome: str, now: float) -> None: ...

    def sample_upload(self, upload_id: str) -> dict[str, Any] | None: ...

    def sample_rows(self, **selection: Any) -> list[dict[str, Any]]: ...


class Retrainer:
    """The sink: ``__call__`` queues an opened alert (from the alert evaluation, so it never blocks); the
    worker thread runs ``run`` on one at a time. ``ask_samples(device)`` asks the device for an upload and
    returns its id (``samples.request_upload`` in the collector); ``rollouts`` is the rollout controller;
    ``collector_url`` the address an operator's commands name."""

    def __init__(
        self,
        sink: RetrainSink,
        store: TimelineStore,
        *,
        ask_samples: Callable[[str], str],
        rollouts: Any = None,
        collector_url: Callable[[], str] = lambda: "http://COLLECTOR:8080",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink, self.store, self.ask_samples, self.rollouts = sink, store, ask_samples, rollouts
        self.collector_url, self.clock = collector_url, clock
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, alert: dict[str, Any]) -> None:
        if alert.get("state") != "open" or alert.get("rule") not in self.sink.rules:
            return
        model = (alert.get("evidence") or {}).get("model")
        if not self.sink.models or model in self.sink.models:  # one training command trains one kind of model
            self._queue.put(alert)

    def start(self) -> Retrainer:
        self._thread = threading.Thread(target=self._work, name="edgekit-retrain", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the worker; a command still running is killed (its step records why)."""
        self.stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """Nothing queued and nothing running (tests and the demo wait for it)."""
        return self._queue.unfinished_tasks == 0

    def _work(self) -> None:
        while not self.stopping.is_set():
            alert = self._queue.get()
            try:
                if alert is not None:
                    self.run(alert)
            except Exception:  # a bug in one run must not end the sink
                log.exception("the retrain sink failed on %s", alert)
            finally:
                self._queue.task_done()

    # -- one alert -------------------------------------------------------------------------------------
    def run(self, alert: dict[str, Any]) -> str | None:
        """The whole pipeline for one opened alert; the run's final state (None: not this sink's to run)."""
        evidence = alert.get("evidence") or {}
        device, model = str(alert["device"]), str(evidence.get("model") or "")
        alert_id = self.store.alert_id(alert["rule"], device, alert["subject"], alert["at"])
        if alert_id is None:
            log.warning("the retrain sink found no stored alert %s on %s/%s", alert["rule"], device, alert["subject"])
            return None
        if not self.store.start_retrain(alert_id, alert["rule"], device, model, self.clock()):
            return None  # this alert was handled already (by this collector or a leader before it)
        run = Run(alert_id, alert, Path(self.sink.workdir) / f"alert-{alert_id}")
        self.step(run, "triggered", "ok", f"{alert['rule']} on {device}/{alert['subject']}: {alert['message']}")
        try:
            self._cooldown(run, device, model)
            state, outcome = self._pipeline(run)
        except Stop as stop:
            state, outcome = stop.state, stop.outcome
        except Exception as exc:  # EdgekitError, AgentError, a dependency's: the timeline says which
            if not isinstance(exc, EdgekitError):
                log.exception("retrain of alert %d failed", alert_id)
            state, outcome = "failed", str(exc)
            self.step(run, "failed", "bad", outcome, {"error": type(exc).__name__})
        self.store.finish_retrain(alert_id, state, outcome, self.clock())
        return state

    def step(self, run: Run, step: str, status: str, message: str, detail: dict[str, Any] | None = None) -> None:
        log.info("retrain alert %d: %s: %s", run.alert_id, step, message)
        self.store.add_timeline_step(run.alert_id, step, status, message, detail or {}, self.clock())

    def _cooldown(self, run: Run, device: str, model: str) -> None:
        last = self.store.last_retrain(device, model, before=run.alert_id)
        if last is None or self.clock() - last["started_at"] >= self.sink.cooldown:
            return
        until = last["started_at"] + self.sink.cooldown
        message = (
            f"{device}/{model} was retrained for alert {last['alert']} {self.clock() - last['started_at']:.0f} s ago; "
            f"the cooldown holds until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}"
        )
        self.step(run, "skipped", "muted", message, {"alert": last["alert"], "until": until})
        raise Stop("skipped", message)

    def _pipeline(self, run: Run) -> tuple[str, str]:
        run.workdir.mkdir(parents=True, exist_ok=True)
        champion = steps.champion(self, run)
        samples = steps.samples(self, run)
        model = steps.command(self, run, champion, samples)
        if not self.sink.key:
            return steps.awaiting(self, run, steps.operator_commands(self, run, champion, model, samples))
        promoted = steps.promote(self, run, champion, model, samples)
        uploaded = steps.upload(self, run, promoted)
        if self.sink.rollout is None:
            return steps.awaiting(self, run, [steps.rollout_command(self, run, promoted)])
        rollout_id = steps.rollout(self, run, promoted, uploaded)
        return "succeeded", f"rollout {rollout_id} started: {uploaded['name']} v{uploaded['version']}"
