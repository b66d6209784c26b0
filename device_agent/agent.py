"""The agent: serve a bundle's model, sketch what it sees, report windows, take feedback.

``Agent(config).start()`` loads the active bundle from the state dir, starts the background thread
(windowing, prediction log, spool pruning), the MQTT reporter and the HTTP server; ``predict`` is
the Python API apps embed. The predict path does the schema check, one runtime call and two list
appends; everything else happens on the background thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .bundle import Bundle
from .config import AgentConfig
from .errors import AgentError, InputError
from .fsutil import write_atomic
from .monitor import ClosedWindow, Monitor
from .outputs import Prediction
from .predlog import PredictionLog
from .protocol import Topics, baseline_payload, build_summary, encode, state_payload
from .runtimes import Runtime, open_runtime
from .signing import load_public_key
from .spool import Spool
from .state import StateDir

log = logging.getLogger("device_agent")
BACKGROUND_INTERVAL = 0.1
LATENCY_BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)


@dataclass
class PredictResult:
    boot: str
    first: int
    prediction: Prediction
    model_version: int
    labels: tuple[Any, ...]

    @property
    def ids(self) -> list[str]:
        return [f"{self.boot}-{self.first + i}" for i in range(len(self.prediction.primary))]

    def answers(self) -> list[Any]:
        p = self.prediction
        if p.labels is not None:
            return p.labels.tolist()
        return [v[0] if len(v) == 1 else v for v in p.values.tolist()]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"predictions": self.answers(), "ids": self.ids, "model_version": self.model_version}
        if self.prediction.probabilities is not None:
            doc["probabilities"] = np.round(self.prediction.probabilities, 6).tolist()
            doc["labels"] = list(self.labels)
        return doc


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.device_id)
        self.state = StateDir(config.state_dir)
        self.boot = os.urandom(4).hex()
        self._counter = 0
        self._counter_lock = threading.Lock()
        self.bundle: Bundle | None = None
        self.runtime: Runtime | None = None
        self.reporter = None
        self.server = None
        self.last_summary: dict[str, Any] | None = None
        self.stats = {"predictions": 0, "windows": 0, "errors": {}, "latency_buckets": [0] * (len(LATENCY_BUCKETS_MS) + 1), "latency_sum_ms": 0.0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, http: bool = True, mqtt: bool = True) -> Agent:
        public_key = load_public_key(self.config.public_key)
        self._load(self.state.active_bundle(public_key))
        self.spool = Spool(self.state.spool, keep_seconds=self.config.monitor.keep_acked_seconds)
        self.log = PredictionLog(self.config.state_dir / "predictions.db", capacity=self.config.monitor.log_rows)
        self.monitor = Monitor(self.baseline, self.config.monitor.window_rows, self.config.monitor.window_seconds, self._on_window)
        self._thread = threading.Thread(target=self._background, name="edgekit-monitor", daemon=True)
        self._thread.start()
        if http and self.config.server.listen:
            from .server import serve

            self.server = serve(self, self.config.server)
            write_atomic(self.config.state_dir / "http.json", json.dumps({"host": self.server.server_address[0], "port": self.server.server_address[1]}).encode())
        if mqtt and self.config.mqtt.url:  # last: its birth message says the agent is serving
            from .reporter import MqttReporter

            self.reporter = MqttReporter(
                self.config.mqtt, self.topics, self.spool, client_id=f"edgekit-{self.config.fleet}-{self.config.device_id}",
                birth=lambda: self._state(True), offline=self._state(False),
                retained=lambda: [(self.topics.baseline, baseline_payload(device=self.config.device_id, model=self.model_info, baseline=self.baseline))],
                on_input=self._on_stream_input if self.config.mqtt.streaming else None,
            )
            self.reporter.start()
        if self.config.emulate is not None:
            from .emulation import Feeder

            self.feeder = Feeder(self, self.config.emulate).start()
        return self

    def _load(self, bundle: Bundle) -> None:
        self.runtime = open_runtime(bundle.model_format, bundle.model_bytes, threads=self.config.threads, source=bundle.path)
        self.bundle = bundle
        self.schema, self.spec, self.baseline = bundle.input_schema, bundle.output_spec, bundle.baseline()
        self.model_info = {"name": bundle.name, "version": bundle.version}

    def stop(self) -> None:
        """Close the open window (it is spooled), flush the log, say offline, stop serving."""
        if getattr(self, "feeder", None) is not None:
            self.feeder.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if hasattr(self, "monitor"):
            self.monitor.flush()
            self.log.close()
        if self.reporter is not None:
            deadline = time.time() + 2.0
            while self.spool.depth() and self.reporter.connected.is_set() and time.time() < deadline:
                time.sleep(0.05)
            self.reporter.stop()
        if self.runtime is not None:
            self.runtime.close()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the request path --------------------------------------------------------------------------
    def predict(self, rows: Any) -> PredictResult:
        """Score rows (a list of lists, or an array). Raises ``InputError`` for rows the model cannot take."""
        try:
            X = self.schema.check(rows, source="request")
        except InputError:
            self.monitor.record_error("bad_input")
            raise
        start = time.perf_counter()
        try:
            raw = self.runtime.predict(X)
        except AgentError:
            self.monitor.record_error("runtime")
            raise
        elapsed_ms = (time.perf_counter() - start) * 1e3
        prediction = self.spec.interpret(raw)
        with self._counter_lock:
            first = self._counter
            self._counter += len(X)
        self.monitor.record(X, prediction, elapsed_ms / len(X))
        self.log.add(self.boot, first, X, prediction.primary)
        return PredictResult(self.boot, first, prediction, self.model_info["version"], self.spec.labels)

    def feedback(self, prediction_id: str, label: Any) -> str:
        """A delayed label for an earlier prediction, counted once in the window's accuracy.
        Returns "accepted", "duplicate" (labelled before) or "unknown" (not from this run, or too old)."""
        boot, _, n = str(prediction_id).rpartition("-")
        if not boot or not n.isdigit():
            raise InputError(f"prediction id {prediction_id!r} is malformed", "use an id returned by :predict")
        self._check_label(label)
        status, logged = self.log.label(boot, self.boot, int(n), label)
        if status == "accepted":
            self.monitor.record_feedback(str(logged) == str(label))
        return status

    def _check_label(self, label: Any) -> None:
        if self.spec.task == "classification":
            if str(label) not in {str(c) for c in self.spec.labels}:
                raise InputError(f"label {label!r} is not one of the model's classes", f"send one of {list(self.spec.labels)[:10]}")
        elif isinstance(label, bool) or not isinstance(label, (int, float)) or label != label or label in (float("inf"), float("-inf")):
            raise InputError(f"label {label!r} is not a finite number", "send the observed value")

    # -- background ----------------------------------------------------------------------------------
    def _background(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(BACKGROUND_INTERVAL):
            try:
                self.monitor.process()
                self.log.flush()
                if time.time() - last_prune > 60:
                    self.spool.prune()
                    last_prune = time.time()
            except Exception:  # the monitor must outlive a bad window; the error is logged, serving goes on
                log.exception("background processing failed")

    def _on_window(self, window: ClosedWindow) -> None:
        seq = self.spool.next_seq()
        summary = build_summary(window, device=self.config.device_id, fleet=self.config.fleet, model=self.model_info, seq=seq,
                                baseline=self.baseline, thresholds=self.bundle.manifest.get("drift"))
        payload = encode(summary)
        self.spool.put(seq, payload)
        self._account(window)
        self.last_summary = summary
        if self.reporter is not None:
            self.reporter.publish(seq, payload)

    def _account(self, window: ClosedWindow) -> None:
        stats = self.stats
        stats["windows"] += 1
        stats["predictions"] += window.rows
        for kind, count in window.errors.items():
            stats["errors"][kind] = stats["errors"].get(kind, 0) + count
        buckets = np.searchsorted(np.asarray(LATENCY_BUCKETS_MS), window.latencies_ms, side="left")
        for index, count in zip(*np.unique(buckets, return_counts=True)):
            stats["latency_buckets"][int(index)] += int(count)
        stats["latency_sum_ms"] += float(window.latencies_ms.sum())

    def _state(self, online: bool) -> dict[str, Any]:
        return state_payload(online=online, device=self.config.device_id, fleet=self.config.fleet, model=self.model_info if self.bundle else None,
                             runtime=self.runtime.name if self.runtime else None, agent_version=__version__)

    def _on_stream_input(self, payload: bytes) -> None:
        import json

        try:
            doc = json.loads(payload)
            result = self.predict(doc["instances"]).to_json()
            result["request_id"] = doc.get("request_id")
        except (ValueError, KeyError, TypeError, AgentError) as exc:
            result = {"error": str(exc)}
        result["schema"] = "edgekit.output/1"
        self.reporter.publish_raw(self.topics.output, result)

    def status(self) -> dict[str, Any]:
        return {"name": self.model_info["name"], "version": self.model_info["version"], "state": "AVAILABLE", "runtime": self.runtime.name,
                "device": self.config.device_id, "fleet": self.config.fleet, "window": self.monitor.current(),
                "spool_depth": self.spool.depth(), "mqtt_connected": bool(self.reporter and self.reporter.connected.is_set())}
