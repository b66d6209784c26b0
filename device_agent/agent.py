"""The agent: serve a bundle's model, sketch what it sees, report windows, take feedback.

``Agent(config).start()`` loads the active bundle from the state dir, starts the background thread
(windowing, prediction log, spool pruning), the MQTT reporter and the HTTP server; ``predict`` is
the Python API apps embed. The predict path does the schema check, one runtime call and two list
appends; everything else happens on the background thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

import numpy as np

from .bundle import Bundle
from .capture import Capture
from .config import AgentConfig
from .drift import DEFAULT_DRIFT_THRESHOLDS
from .errors import AgentError, InputError, ModelError
from .fsutil import write_atomic
from .monitor import GATHER_ROWS, ClosedWindow, Monitor
from .predlog import PredictionLog
from .protocol import Topics, baseline_payload, build_summary, encode, state_payload
from .runtimes import Runtime, open_runtime
from .schema import InputSchema, all_finite, request_rows
from .serving import LATENCY_BUCKETS_MS, PredictResult, Serving
from .signing import load_public_key
from .spool import Spool
from .state import StateDir
from .version import __version__

log = logging.getLogger("device_agent")
BACKGROUND_INTERVAL = 0.1
BACKGROUND_CHUNK_ROWS = 10_000  # rows sketched between prediction-log flushes and stop checks
STOP_JOIN_SECONDS = 10.0


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.device_id)
        self.state = StateDir(config.state_dir)
        self.boot = os.urandom(4).hex()
        self._counter = 0
        self._counter_lock = threading.Lock()
        self._serving: Serving | None = None
        self._retired: list[tuple[float, Serving]] = []  # swapped out; their last window is closed after a grace period
        self.taps: list[
            Any
        ] = []  # shadow runs and health watches: ``tap(serving, rows, prediction, latency_ms, error_kind)`` per request
        self.updater = None
        self.reporter = None
        self.server = None
        self.last_summary: dict[str, Any] | None = None
        self.stats = {
            "predictions": 0,
            "windows": 0,
            "errors": {},
            "latency_buckets": [0] * (len(LATENCY_BUCKETS_MS) + 1),
            "latency_sum_ms": 0.0,
            "unmonitored_rows": 0,
            "sampled_out_rows": 0,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # answered requests on their way to the prediction log, handed over in runs (``_drain_log``)
        self._to_log: deque = deque()
        self._drain_lock = threading.Lock()
        self._reported = (0, 0)  # the unmonitored and sampled-out totals ``status`` said last (``_never_lower``)
        self._reported_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, http: bool = True, mqtt: bool = True) -> Agent:
        self._claim = self.state.hold()  # before anything is read or written: one agent per state dir
        try:
            return self._start(http=http, mqtt=mqtt)
        except BaseException:
            self.state.release(self._claim)
            raise

    def _start(self, *, http: bool, mqtt: bool) -> Agent:
        map_large_allocations()
        self.public_key = load_public_key(self.config.public_key)
        recovered = self.state.recover()
        bundle, note = self.state.load_usable(self.public_key)
        if note:
            log.warning("%s", note)
        self.spool = Spool(self.state.spool, keep_seconds=self.config.monitor.keep_acked_seconds)
        self.log = _JoiningLog(
            self.config.state_dir / "predictions.db", capacity=self.config.monitor.log_rows, before=self._drain_log
        )
        self.capture = Capture.for_agent(self)  # field samples ([capture]; off by default)
        self._serving = self.serving_for(
            bundle,
            open_runtime(bundle.model_format, bundle.model_bytes, threads=self.config.threads, source=bundle.path),
        )
        from .updater import Updater

        self.updater = Updater(self, recovered=recovered)
        self._thread = threading.Thread(target=self._background, name="edgekit-monitor", daemon=True)
        self._thread.start()
        if http and self.config.server.listen:
            from .server import serve

            self.server = serve(self, self.config.server)
            write_atomic(
                self.config.state_dir / "http.json",
                json.dumps({"host": self.server.server_address[0], "port": self.server.server_address[1]}).encode(),
            )
        if mqtt and self.config.mqtt.url:  # last: its birth message says the agent is serving
            from .reporter import MqttReporter

            self.reporter = MqttReporter(
                self.config.mqtt,
                self.topics,
                self.spool,
                client_id=f"edgekit-{self.config.fleet}-{self.config.device_id}",
                birth=lambda: self._state(True),
                offline=self._state(False),
                retained=self._retained,
                on_input=self._on_stream_input if self.config.mqtt.streaming else None,
                on_desired=self.updater.on_desired,
                on_upload=self.capture.uploader.on_command,
            )
            self.reporter.start()
        self.updater.start()
        if self.config.emulate is not None:
            from .emulation import Feeder

            self.feeder = Feeder(self, self.config.emulate).start()
        return self

    def serving_for(self, bundle: Bundle, runtime: Runtime) -> Serving:
        """A ``Serving`` for a loaded model, with its own monitor (windows are per model version)."""
        serving = Serving(bundle, runtime)
        self._warn_untested_windows(bundle)
        serving.monitor = Monitor(
            serving.baseline,
            self.config.monitor.window_rows,
            self.config.monitor.window_seconds,
            lambda window: self._on_window(window, serving),
            backlog_rows=_backlog_rows(self.config.monitor.backlog_rows, serving.schema),
            drift_thresholds=bundle.manifest.get("drift"),
            signals=serving.schema.tensor_signals().rows if serving.schema.tensor is not None else None,
            max_cpu_fraction=self.config.monitor.max_cpu_fraction,
        )
        return serving

    def _warn_untested_windows(self, bundle: Bundle) -> None:
        """Say it once when no window can ever get a drift verdict: each would report "tested": false
        with large PSIs and nothing else would tell why."""
        min_rows = {**DEFAULT_DRIFT_THRESHOLDS, **(bundle.manifest.get("drift") or {})}["min_rows"]
        window_rows = self.config.monitor.window_rows
        if window_rows < min_rows:
            log.warning(
                "%s: [monitor] window_rows = %d is below the drift test's min_rows = %g of %s v%s, "
                "so no window will be tested for drift; set window_rows = %d or more "
                "(or package the model with --drift min_rows=%d)",
                self.config.source,
                window_rows,
                min_rows,
                bundle.name,
                bundle.version,
                math.ceil(min_rows),
                window_rows,
            )

    def swap(self, serving: Serving) -> Serving:
        """Serve ``serving`` from the next request on; return the one it replaced.

        Requests already running finish on the old model. The old monitor's last window is closed
        by the background thread a moment later, so the rows it scored are summarised against the
        old model's baseline; the new model's windows start empty. The retained state and baseline
        are published again so the fleet sees the new version at once."""
        old, self._serving = self._serving, serving
        self._retired.append((time.monotonic(), old))
        if self.reporter is not None:
            self.reporter.announce()
        return old

    serving = property(lambda self: self._serving, doc="The loaded model requests go to now (None before start).")
    rows_served = property(lambda self: self._counter, doc="Rows answered since start (ids are numbered by it).")
    # The serving model's parts, for callers that predate hot swapping (and for brevity).
    bundle = property(lambda self: self._serving.bundle if self._serving else None)
    runtime = property(lambda self: self._serving.runtime if self._serving else None)
    schema = property(lambda self: self._serving.schema)
    spec = property(lambda self: self._serving.spec)
    baseline = property(lambda self: self._serving.baseline)
    model_info = property(lambda self: self._serving.model_info)
    model_format = property(lambda self: self._serving.bundle.model_format)  # the v2 metadata's platform
    monitor = property(lambda self: self._serving.monitor)

    def _retained(self) -> list[tuple[str, dict[str, Any]]]:
        serving = self._serving
        messages = [
            (
                self.topics.baseline,
                baseline_payload(device=self.config.device_id, model=serving.model_info, baseline=serving.baseline),
            )
        ]
        if self.updater is not None and self.updater.last_report is not None:
            messages.append((self.topics.reported, self.updater.last_report))
        return messages

    def stop(self) -> None:
        """Close the open window (it is spooled), flush the log, say offline, stop serving.

        The background thread is told to stop and joined before anything it uses is closed. Rows
        still waiting to be sketched are not sketched (that could take minutes): the closing window
        counts them in ``unmonitored_rows``."""
        if getattr(self, "feeder", None) is not None:
            self.feeder.stop()
        if self.updater is not None:
            self.updater.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self._stop.set()
        monitors = [retired.monitor for _, retired in list(self._retired)] + (
            [self._serving.monitor] if self._serving is not None else []
        )
        for monitor in monitors:
            monitor.stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_JOIN_SECONDS)
            if self._thread.is_alive():  # not expected: it stops at the next window boundary
                log.warning(
                    "the background thread did not stop within %.0f s; the prediction log is left open",
                    STOP_JOIN_SECONDS,
                )
                return
            self._thread = None
        if self._serving is not None and hasattr(self, "log"):
            for _, retired in self._retired:
                retired.monitor.flush()
            self._retired = []
            self._serving.monitor.flush()
            self.log.close()
        if self.reporter is not None:
            deadline = time.time() + 2.0
            while self.spool.depth() and self.reporter.connected.is_set() and time.time() < deadline:
                time.sleep(0.05)
            self.reporter.stop()
        if self.runtime is not None:
            self.runtime.close()
        self.state.release(getattr(self, "_claim", None))
        self._claim = None

    def __enter__(self) -> Agent:
        # ``with Agent(config).start() as agent`` is common: starting twice would run two background threads.
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the request path --------------------------------------------------------------------------
    def predict(self, rows: Any) -> PredictResult:
        """Score rows (a list of lists, or an array). Raises ``InputError`` for rows the model cannot take,
        ``ModelError`` when the model fails or answers NaN.

        What it does and what each part costs on a one-row digits prediction (thread CPU time, on the
        machine measured, where a bare ``session.run`` takes 7.3 µs and the whole call 12.3 µs): the schema
        check (one ``x . x`` tells "all finite", 1.1 µs), the runtime's bound call (``matrix_runner``: the
        binding with names, options and error translation resolved at load, 6.4 µs of which onnxruntime's
        own 5.9), the outputs read (0.9 µs), the NaN check of the scores (0.8 µs), the id block (a lock,
        0.2 µs), the hand-off to the monitor (0.8 µs) and to the prediction log (an append) and the result
        (0.3 µs together), and since measured the request's mark on its model for a hot swap (a deque append
        and pop, and a call: 0.05 µs with ``timeit``). The sketch, the log and the window are the background
        thread's: per one-row request about 1-2 µs and 0.5-0.8 µs of its time (``scripts/bench_agent.py``).

        At batch 1,000 (64 features; a loaded 2-core host, each part timed right after the model ran, where
        ``session.run`` took 240-350 µs) the parts cost 15-20 µs together, 5-7 %: the schema check 5-9 µs
        (the ``x . x`` over 64,000 values), the outputs read 2-5, the NaN check of the scores 2.5-4, the id
        block 0.6-1, the monitor hand-off 2-3 (the CPU budget's sample is taken on the background thread),
        the log hand-off and the result 1. The background thread's share is bounded by the CPU budget. ``rows``
        is read on other threads after this returns, not copied (90 µs of page faults at 1,000): never refill it."""
        serving = self._serving  # one read: a swap mid-request cannot mix two models
        serving.running.append(None)  # its monitor's last window waits for this request (``_close_retired``)
        try:
            return self._predict(serving, rows)
        finally:
            serving.running.pop()

    def _predict(self, serving: Serving, rows: Any) -> PredictResult:
        try:
            X = serving.schema.check(rows, source="request")
        except InputError:
            serving.monitor.record_error("bad_input")
            raise
        start = time.perf_counter()
        try:
            prediction = serving.spec.interpret(serving.run(X))
        except AgentError as exc:
            self._failed(serving, X, "runtime", exc)
            raise
        scores = prediction.scores
        if scores is not None and not all_finite(scores):
            exc = ModelError(
                serving.bundle.path,
                serving.runtime.name,
                "answered NaN or infinity",
                "the model is unfit for these rows; roll it back",
            )
            self._failed(serving, X, "nan_output", exc)
            raise exc
        elapsed_ms = (time.perf_counter() - start) * 1e3
        n = len(X)
        with self._counter_lock:
            first = self._counter
            self._counter += n
        serving.monitor.record(X, prediction, elapsed_ms / n, first)
        primary = prediction.primary
        self._to_log.append((first, X, primary, serving))
        self.capture.offer(serving, first, X, primary)
        for tap in self.taps:
            tap(serving, X, prediction, elapsed_ms, None)
        return PredictResult(self.boot, first, prediction, serving.model_info["version"], serving.spec.labels)

    def _failed(self, serving: Serving, X: np.ndarray, kind: str, exc: AgentError) -> None:
        serving.monitor.record_error(kind)
        for tap in self.taps:
            tap(serving, X, None, 0.0, kind)

    def feedback(self, prediction_id: str, label: Any) -> str:
        """A delayed label for an earlier prediction, counted once in the window's accuracy.
        Returns "accepted", "duplicate" (labelled before) or "unknown" (not from this run, or too old)."""
        boot, _, n = str(prediction_id).rpartition("-")
        if not boot or not n.isdigit():
            raise InputError(f"prediction id {prediction_id!r} is malformed", "use an id returned by :predict")
        self._check_label(label)
        self._drain_log()  # an id answered a moment ago is in the log before it is looked up
        status, logged = self.log.label(boot, self.boot, int(n), label)
        serving = self._answered_by(int(n)) if status == "accepted" else None
        if serving is not None:
            serving.monitor.record_feedback(str(logged) == str(label))
        return status

    def _answered_by(self, n: int) -> Serving | None:
        """The model that answered prediction ``n`` while its windows are open, else None: in the new model's
        windows its label would pass for the new model's accuracy (and an A/B split compare the old with itself)."""
        answered_by = self.log.answered_by(n)
        if answered_by is None:  # not said (a log filled by other means): the model serving now
            return self._serving
        serving = answered_by()
        if serving is self._serving or any(serving is retired for _, retired in list(self._retired)):
            return serving
        return None

    def _check_label(self, label: Any) -> None:
        if self.spec.task == "classification":
            if str(label) not in {str(c) for c in self.spec.labels}:
                raise InputError(
                    f"label {label!r} is not one of the model's classes", f"send one of {list(self.spec.labels)[:10]}"
                )
        elif (
            isinstance(label, bool)
            or not isinstance(label, (int, float))
            or label != label
            or label in (float("inf"), float("-inf"))
        ):
            raise InputError(f"label {label!r} is not a finite number", "send the observed value")

    def _drain_log(self) -> None:
        """Hand the answered requests to the prediction log, consecutive ones joined into one batch.

        The log's own cost is per batch (a slice copy into its ring, the sampled rows' JSON, a transaction),
        so a thousand one-row requests cost it what one thousand-row request does. Requests join while their
        ids follow on, one model answered them, and their rows and answers have the same shape and type (a hot
        swap can change both): per one-row request that check is most of what the log costs, so it is one tuple
        comparison."""
        with self._drain_lock:
            queue = self._to_log
            items = [queue.popleft() for _ in range(len(queue))]  # appended meanwhile: the next drain's
            run: list[tuple[int, np.ndarray, np.ndarray, Serving]] = []
            expected, kind = None, None
            for item in items:
                first, rows, answers, serving = item
                item_kind = (rows.dtype, rows.shape[1:], answers.dtype, answers.shape[1:], id(serving))
                if run and (first != expected or item_kind != kind):
                    self._log_run(run)
                    run = []
                run.append(item)
                expected, kind = first + len(rows), item_kind
            if run:
                self._log_run(run)

    def _log_run(self, run: list[tuple[int, np.ndarray, np.ndarray, Serving]]) -> None:
        answered_by = weakref.ref(run[0][3])  # not the model: the log's ring would keep swapped-out models alive
        if len(run) == 1:
            self.log.add(self.boot, *run[0][:3], answered_by)
            return
        answers = np.concatenate([a for _, _, a, _ in run])
        rows = [r for _, r, _, _ in run]  # not copied: a few are read
        self.log.add(self.boot, run[0][0], rows, answers, answered_by)

    # -- background ----------------------------------------------------------------------------------
    def _background(self) -> None:
        last_prune = 0.0
        trimmed_at = 0  # rows served when memory was last handed back
        while not self._stop.wait(BACKGROUND_INTERVAL):
            try:
                monitor = self._serving.monitor
                monitor.process(max_rows=BACKGROUND_CHUNK_ROWS, gather=True)
                # a large backlog in chunks: stop is checked between them;
                # retired monitors and pruning still get a turn
                for _ in range(100):
                    if monitor.backlog < GATHER_ROWS or self._stop.is_set():  # fewer: a later pass takes them
                        break
                    self.log.flush()
                    monitor.process(max_rows=BACKGROUND_CHUNK_ROWS, gather=True)
                if self._stop.is_set():
                    break
                self._close_retired()
                self.log.flush()
                if self._counter - trimmed_at >= TRIM_AFTER_ROWS:
                    trimmed_at = self._counter
                    release_memory()
                if time.time() - last_prune > 60:
                    self.spool.prune()
                    last_prune = time.time()
            except Exception:  # the monitor must outlive a bad window; the error is logged, serving goes on
                log.exception("background processing failed")

    def _close_retired(self, grace: float = 1.0) -> None:
        """Close the last window of each model swapped out ``grace`` seconds ago once no request answers on it
        (a slower one's rows would be in no window); one swapped back in (a failed health watch) goes on."""
        while self._retired and time.monotonic() - self._retired[0][0] >= grace:
            retired = self._retired[0][1]
            if retired is not self._serving and retired.running:
                return  # a later pass closes it
            self._retired.pop(0)
            if retired is not self._serving:
                retired.monitor.flush()

    def _on_window(self, window: ClosedWindow, serving: Serving) -> None:
        seq = self.spool.next_seq()
        summary = build_summary(
            window,
            device=self.config.device_id,
            fleet=self.config.fleet,
            model=serving.model_info,
            seq=seq,
            seq_base=self.spool.seq_base(),
        )
        summary["unmonitored_rows"] = window.unmonitored
        self.capture.window_closed(seq, window, serving, summary)
        payload = encode(summary)
        self.spool.put(seq, payload)
        self._account(window)
        self.last_summary = summary
        if self.reporter is not None:
            self.reporter.publish(seq, payload)

    def _account(self, window: ClosedWindow) -> None:
        stats = self.stats
        stats["windows"] += 1
        stats["predictions"] += window.rows + window.sampled_out
        stats["unmonitored_rows"] += window.unmonitored
        stats["sampled_out_rows"] += window.sampled_out
        for kind, count in window.errors.items():
            stats["errors"][kind] = stats["errors"].get(kind, 0) + count
        buckets = np.searchsorted(np.asarray(LATENCY_BUCKETS_MS), window.latencies_ms, side="left")
        for index, count in zip(*np.unique(buckets, return_counts=True), strict=True):
            stats["latency_buckets"][int(index)] += int(count)
        stats["latency_sum_ms"] += float(window.latencies_ms.sum())

    def _state(self, online: bool) -> dict[str, Any]:
        # The offline message (also the last will, fixed at connect time) names no model: the model
        # may have been swapped since, and the fleet should keep the last one the device announced.
        return state_payload(
            online=online,
            device=self.config.device_id,
            fleet=self.config.fleet,
            model=self.model_info if self.bundle and online else None,
            runtime=self.runtime.name if self.runtime else None,
            agent_version=__version__,
        )

    def _on_stream_input(self, payload: bytes) -> None:
        import json

        try:
            doc = json.loads(payload)
            result = self.predict(request_rows(doc)).to_json()
            result["request_id"] = doc.get("request_id")
        except (ValueError, KeyError, TypeError, AgentError) as exc:
            result = {"error": str(exc)}
        result["schema"] = "edgekit.output/1"
        self.reporter.publish_raw(self.topics.output, result)

    def status(self) -> dict[str, Any]:
        update = self.updater.last_report if self.updater is not None else None
        window = self.monitor.current()
        unmonitored, sampled_out = self._never_lower(
            self.stats["unmonitored_rows"] + window["unmonitored_rows"],
            self.stats["sampled_out_rows"] + window["sampled_out_rows"],
        )
        return {
            "name": self.model_info["name"],
            "version": self.model_info["version"],
            "state": "AVAILABLE",
            "runtime": self.runtime.name,
            "update": None if update is None else {k: update.get(k) for k in ("rollout", "version", "state", "reason")},
            "device": self.config.device_id,
            "fleet": self.config.fleet,
            "window": window,
            "spool_depth": self.spool.depth(),
            "unmonitored_rows": unmonitored,
            "sampled_out_rows": sampled_out,
            "sample_rate": self.monitor.budget.rate,
            "mqtt_connected": bool(self.reporter and self.reporter.connected.is_set()),
        }

    def _never_lower(self, unmonitored: int, sampled_out: int) -> tuple[int, int]:
        """The totals ``status`` (and /metrics' counters) report, never below the last ones: the background
        thread moves rows from the open window to ``stats`` in steps (the window is emptied before ``_account``),
        and a read between two counted fewer rows (millions, past a full backlog), which Prometheus takes for a
        restart. Such a read only counts fewer, never more: the truth catches up with the highest reported."""
        with self._reported_lock:  # two scrapes at once: the later answer must not undo the earlier one's
            last_unmonitored, last_sampled_out = self._reported
            self._reported = (max(last_unmonitored, unmonitored), max(last_sampled_out, sampled_out))
            return self._reported


class _JoiningLog(PredictionLog):
    """The prediction log, taking the agent's answered requests (``Agent._drain_log``) first whenever it
    is flushed, so whoever flushes it (the background thread, a bench, a test) sees every answer."""

    def __init__(self, path: Any, *, capacity: int, before: Any) -> None:
        super().__init__(path, capacity=capacity)
        self._before = before

    def flush(self) -> int:
        self._before()
        return super().flush()

    def close(self) -> None:
        self._before()  # requests answered since the background thread's last pass (it is stopped by now)
        super().close()


BACKLOG_BYTES = 64 << 20
TRIM_AFTER_ROWS = 20_000  # rows served between two hand-backs of freed memory (a large request's parse)


def release_memory() -> None:
    """Hand freed heap memory back to the system where the allocator allows (glibc's ``malloc_trim``).

    A large request's arrays are freed when it is answered, but glibc keeps freed heap pages for reuse, so
    the agent would sit hundreds of MB above its idle size after one big request; on a Pi that memory
    belongs to the model. Elsewhere (musl, macOS) this does nothing."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations() -> None:
    """Have glibc give every allocation of ``MMAP_BYTES`` or more its own mapping, returned to the system
    the moment it is freed. glibc's default threshold rises to the largest block ever freed (up to 32 MB),
    after which a large request's arrays land on the heap and stay there once freed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)


M_MMAP_THRESHOLD, MMAP_BYTES = -3, 1 << 20


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


_libc: Any = None


def _backlog_rows(configured: int, schema: InputSchema) -> int:
    """The monitor's backlog in rows, capped so that waiting tensors hold at most ``BACKLOG_BYTES``:
    100,000 rows of a table are a few megabytes, 100,000 camera frames would be gigabytes."""
    if schema.tensor is None:
        return configured
    return max(1, min(configured, BACKLOG_BYTES // schema.tensor.example_bytes))
