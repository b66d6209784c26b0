"""Over-the-air model updates on the device: fetch, verify, try, swap, watch, and undo on failure.

The fleet states what it wants on the retained ``desired`` topic (``protocol.check_desired``); the
updater works towards it on its own thread and reports every step on ``reported`` (retained), with
a reason and a short ``code`` when something fails::

    downloading -> verifying -> selftest -> [shadow] -> watching -> succeeded
                                                               \\-> rolled_back  (health watch failed)
    any step -> failed (download, hash, signature, downgrade, name, load, selftest, shadow)

- Download resumes where it stopped (``download``), with the collector's token when it wants one
  (``[update] token``); size and sha256 are checked before the file is opened, then the bundle's
  Ed25519 signature against the trusted key, then the version: only a rollback instruction signed by
  the fleet key may go down (a replayed old desired state cannot).
- The candidate is written into the inactive slot and loaded beside the serving model; the
  bundle's self-test vectors must reproduce; in the shadow phase it scores copies of live requests
  and its agreement with the serving model, latency and errors are measured.
- The swap is one pointer replacement on disk (``StateDir.activate``, with a pending health
  watch) and one assignment in memory (``Agent.swap``): requests never stop.
- During the health watch the new model's errors, NaN answers and latency are watched; a failure
  swaps straight back. A crash during the watch is undone at the next start (``StateDir.recover``).
- An aborted rollout's ``revert`` goes back to the previous slot only with the fleet key's signed
  instruction for that rollout, while the device runs what that rollout installed (``instructions``).

Every attempt is written to the ledger (``updates.json``) before it starts, so a retained desired
state that keeps failing is tried at most ``MAX_ATTEMPTS`` times, and a finished one never again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .bundle import BUNDLE_SUFFIX, Bundle, read_bundle
from .download import Downloaded, download
from .errors import AgentError, BundleError, InstallError, ModelError, ProtocolError, SignatureError, UpdateError
from .instructions import ACTIVE_BY, LAST_ROLLBACK, applied_revert, check_revert, check_rollback, moved_by, replayed
from .protocol import READABLE_DESIRED_SCHEMAS, check_desired, decode, reported_payload
from .runtimes import open_runtime
from .serving import Serving
from .state import BUNDLE_FILE

if TYPE_CHECKING:
    from .config import AgentConfig
    from .protocol import Topics
    from .runtimes import Runtime


class UpdaterHost(Protocol):
    """What the updater needs of the agent it updates: its settings and key, the model it serves
    and how to swap it, the request taps (shadow, health watch), and the reporter and topics."""

    config: AgentConfig
    public_key: Any
    reporter: Any
    topics: Topics
    taps: list[Any]

    @property
    def serving(self) -> Serving | None: ...

    def serving_for(self, bundle: Bundle, runtime: Runtime) -> Serving: ...

    def swap(self, serving: Serving) -> Serving: ...


log = logging.getLogger("device_agent.updater")
MAX_ATTEMPTS = 3
RETRY_SECONDS = 5.0
RETRYABLE = frozenset({"download", "restart"})
DEFAULT_HEALTH = {"seconds": 10.0, "max_error_rate": 0.02, "max_p99_ms": None, "min_requests": 20}
SELFTEST_SCORE_TOLERANCE = 0.05  # int8 kernels differ a little between CPUs; a broken model differs a lot
SELFTEST_MIN_LABEL_AGREEMENT = 0.95


class Updater:
    def __init__(self, agent: UpdaterHost, *, recovered: dict[str, Any] | None = None) -> None:
        self.agent, self.state = agent, agent.state
        self.last_report: dict[str, Any] | None = None
        self.rejected = 0
        self._desired: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake, self._stop, self._cancel = threading.Event(), threading.Event(), threading.Event()
        self._job: str | None = None
        self._retry_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="edgekit-updater", daemon=True)
        if recovered and recovered.get("rollout"):
            self._note_restart(recovered)

    def start(self) -> Updater:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._cancel.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # -- input (the MQTT thread) ---------------------------------------------------------------------
    def on_desired(self, payload: bytes) -> None:
        """A new desired state; an empty payload clears it. Malformed ones are logged and ignored."""
        doc = None
        if payload:
            try:
                doc = check_desired(decode(payload, READABLE_DESIRED_SCHEMAS))
            except ProtocolError as exc:
                self.rejected += 1
                log.warning("ignored a desired state: %s", exc)
                return
        with self._lock:
            self._desired = doc
            self._retry_at = None
            if self._job is not None and (doc is None or _job_key(doc) != self._job):
                self._cancel.set()  # superseded: the running job stops at its next step
        self._wake.set()

    # -- the worker thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = None if self._retry_at is None else max(0.0, self._retry_at - time.time())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                doc, self._retry_at = self._desired, None
                if doc is None:
                    continue
                self._job = _job_key(doc)
                self._cancel.clear()
            try:
                self._handle(doc)
            except Exception:  # the updater must never take serving down with it
                log.exception("update %s failed unexpectedly", doc.get("rollout"))
                self._report(doc, "failed", "internal error in the updater; see the agent log", code="internal")
            finally:
                with self._lock:
                    self._job = None

    def _handle(self, doc: dict[str, Any]) -> None:
        key = _job_key(doc)
        ledger = self.state.ledger()
        entry = ledger.get(key, {})
        if entry.get("final") and not replayed(doc, entry, ledger):
            if self.last_report is None or self.last_report.get("rollout") != doc["rollout"]:
                self._report(doc, entry["state"], entry.get("reason", ""), code=entry.get("code"))
            return
        if doc["action"] == "revert":
            return self._revert(doc, key)
        if self._already_running(doc):
            return self._finish(doc, key, "succeeded", f"already running {doc['name']} v{doc['version']}")
        attempts = entry.get("attempts", 0) + 1
        if attempts > MAX_ATTEMPTS:
            return self._finish(
                doc,
                key,
                "failed",
                f"gave up after {MAX_ATTEMPTS} attempts: {entry.get('reason', '')}",
                code=entry.get("code"),
            )
        ledger[key] = {**entry, "attempts": attempts, "state": "running"}
        self.state.write_ledger(ledger)
        try:
            facts = self._install(doc)
        except UpdateError as exc:
            self._failed(doc, key, exc, attempts)
            return
        remember = {ACTIVE_BY: doc["rollout"]}  # what a signed revert of this rollout may undo
        if doc["action"] == "rollback":
            remember[LAST_ROLLBACK] = doc["instruction"]["issued_at"]
        self._finish(doc, key, "succeeded", f"running {doc['name']} v{doc['version']}", remember=remember, **facts)

    def _failed(self, doc: dict[str, Any], key: str, exc: UpdateError, attempts: int) -> None:
        state = "rolled_back" if exc.code == "health" else "aborted" if exc.code == "aborted" else "failed"
        if exc.code in RETRYABLE and attempts < MAX_ATTEMPTS:
            entry = {**self.state.ledger().get(key, {}), "reason": exc.problem, "code": exc.code}
            self.state.write_ledger({**self.state.ledger(), key: entry})
            self._report(
                doc,
                "retrying",
                f"{exc.problem}; trying again (attempt {attempts + 1} of {MAX_ATTEMPTS})",
                code=exc.code,
            )
            self._retry_at = time.time() + RETRY_SECONDS * attempts
            return
        if exc.code == "aborted":
            # superseded (the worker takes the newer desired state up next) or stopping (resumed at the next start)
            return
        self._finish(doc, key, state, exc.problem, code=exc.code, **exc.facts)

    def _finish(
        self,
        doc: dict[str, Any],
        key: str,
        state: str,
        reason: str,
        *,
        code: str | None = None,
        remember: dict[str, Any] | None = None,
        **facts: Any,
    ) -> None:
        """The job's outcome, written to the ledger with ``remember`` (top-level keys) in one write, then reported."""
        ledger = self.state.ledger()
        ledger[key] = {
            **ledger.get(key, {}),
            "final": True,
            "state": state,
            "reason": reason,
            "code": code,
            "at": time.time(),
        }
        ledger.update(remember or {})
        self.state.write_ledger(ledger)
        self._report(doc, state, reason, code=code, **facts)

    # -- install / rollback ----------------------------------------------------------------------------
    def _already_running(self, doc: dict[str, Any]) -> bool:
        meta = self.state.slot_meta(self.state.active_slot()) or {}
        return meta.get("bundle_sha256") == doc["sha256"] and self.state.state().get("pending") is None

    def _install(self, doc: dict[str, Any]) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        downgrade = doc["action"] == "rollback"
        if downgrade:
            config = self.agent.config
            check_rollback(doc, public_key=self.agent.public_key, fleet=config.fleet, ledger=self.state.ledger())
        else:
            self._check_version(doc)
        self._report(doc, "downloading")
        fetched = self._download(doc)
        facts["download"] = {"bytes": fetched.fetched, "resumed_from": fetched.resumed_from, "size": doc["size"]}
        self._report(doc, "verifying", download=facts["download"])
        bundle = self._verify(doc, fetched.path)
        slot = self._stage(bundle, downgrade)
        self._step(doc, "selftest")
        candidate = self._load(bundle)
        facts["selftest"] = run_selftest(bundle, candidate.runtime)
        shadow = {**{"rows": 0, "min_agreement": 0.0, "timeout_seconds": 300.0}, **(doc.get("shadow") or {})}
        if shadow["rows"] > 0 and not downgrade:
            self._step(doc, "shadow")
            facts["shadow"] = self._shadow(candidate, shadow)
            if facts["shadow"]["agreement"] is None or facts["shadow"]["agreement"] < shadow["min_agreement"]:
                raise UpdateError(
                    "shadow",
                    f"shadow agreement {_fmt(facts['shadow']['agreement'])} with the serving model on "
                    f"{facts['shadow']['rows']} live rows is below {shadow['min_agreement']}",
                    facts=facts,
                )
            if facts["shadow"]["errors"]:
                raise UpdateError(
                    "shadow", f"the candidate failed on {facts['shadow']['errors']} shadow requests", facts=facts
                )
        self._step(doc, "swapping")
        previous = self.state.active_slot()
        self.state.activate(
            slot,
            pending={
                "slot": slot,
                "previous": previous,
                "rollout": doc["rollout"],
                "version": doc["version"],
                "key": _job_key(doc),
            },
        )
        old = self.agent.swap(candidate)
        self._report(doc, "watching", **facts)
        health = {**DEFAULT_HEALTH, **(doc.get("health") or {})}
        failure, facts["health"] = self._watch(candidate, health)
        if failure is not None:
            self.state.activate(previous)
            self.agent.swap(old)
            raise UpdateError(
                "aborted" if self._cancel.is_set() else "health",
                f"{failure}; rolled back to v{old.model_info['version']}",
                facts=facts,
            )
        self.state.commit()
        return facts

    def _check_version(self, doc: dict[str, Any]) -> None:
        try:
            self.state.check_upgrade(doc["name"], doc["version"], source=f"rollout {doc['rollout']}")
        except InstallError as exc:
            raise UpdateError("downgrade", str(exc)) from exc

    def _download(self, doc: dict[str, Any]) -> Downloaded:
        """The bundle, with the collector's token if it is going to the collector (``UpdateConfig.token_for``);
        a refusal for want of the token fails at once, naming the setting that fixes it."""
        config, url = self.agent.config, doc["url"]
        token = config.update.token_for(url, config.mqtt.host if config.mqtt.url else None)
        target = self.state.downloads / f"{doc['sha256']}{BUNDLE_SUFFIX}"
        try:
            return download(
                url, target, sha256=doc["sha256"], size=doc["size"], token=token, cancelled=self._cancel.is_set
            )
        except UpdateError as exc:
            if exc.code != "auth":
                raise
            fix = config.update.refusal_fix(url, sent=token is not None)
            raise UpdateError("auth", f"{exc.problem}; {fix}") from exc

    def _verify(self, doc: dict[str, Any], path: Path) -> Bundle:
        try:
            bundle = read_bundle(path, self.agent.public_key)
        except SignatureError as exc:
            path.unlink(missing_ok=True)
            raise UpdateError("signature", str(exc)) from exc
        except BundleError as exc:
            path.unlink(missing_ok=True)
            raise UpdateError("hash", str(exc)) from exc
        if (bundle.name, bundle.version) != (doc["name"], doc["version"]):
            raise UpdateError(
                "name",
                f"the bundle is {bundle.name} v{bundle.version}, the rollout says {doc['name']} v{doc['version']}",
            )
        return bundle

    def _stage(self, bundle: Bundle, downgrade: bool) -> str:
        try:
            return self.state.stage_verified(bundle, allow_downgrade=downgrade)  # verified once, by _verify
        except InstallError as exc:
            raise UpdateError("downgrade", str(exc)) from exc

    def _load(self, bundle: Bundle) -> Serving:
        try:
            runtime = open_runtime(
                bundle.model_format, bundle.model_bytes, threads=self.agent.config.threads, source=bundle.path
            )
        except AgentError as exc:
            raise UpdateError("load", f"the candidate does not load: {exc}") from exc
        return self.agent.serving_for(bundle, runtime)

    # -- shadow and health -------------------------------------------------------------------------------
    def _shadow(self, candidate: Serving, settings: dict[str, Any]) -> dict[str, Any]:
        """Score copies of live requests with the candidate; compare with what the serving model answered."""
        want, deadline = int(settings["rows"]), time.monotonic() + float(settings["timeout_seconds"])
        queue: deque = deque()
        offered = [0]

        def tap(serving, X, prediction, latency_ms, error) -> None:
            if error is None and serving is not candidate and offered[0] < want:
                offered[0] += len(X)  # two threads at once may offer a request more: the loop takes what it needs
                queue.append((X, prediction.primary, latency_ms))

        rows = agree = errors = error_rows = 0
        candidate_ms: list[float] = []
        active_ms: list[float] = []
        self.agent.taps.append(tap)
        try:
            while rows < want and time.monotonic() < deadline:
                self._check_cancel()
                if not queue:
                    time.sleep(0.01)
                    continue
                X, answered, latency_ms = queue.popleft()
                start = time.perf_counter()
                try:
                    # the live model's checked rows, checked again for the candidate (its dtype may differ)
                    prediction = candidate.spec.interpret(candidate.run(candidate.schema.check(X, source="shadow")))
                    scores = prediction.scores
                    if scores is not None and scores.dtype.kind == "f" and not np.isfinite(scores).all():
                        raise ModelError(candidate.bundle.path, candidate.runtime.name, "answered NaN")
                except AgentError:
                    errors, error_rows, rows = errors + 1, error_rows + len(X), rows + len(X)
                    continue
                candidate_ms.append((time.perf_counter() - start) * 1e3)
                active_ms.append(latency_ms)
                agree += int(_agreeing(candidate.spec.task, answered, prediction.primary))
                rows += len(X)
        finally:
            self.agent.taps.remove(tap)
        scored = rows - error_rows
        return {
            "rows": rows,
            "agreement": agree / scored if scored else None,
            "errors": errors,
            "p50_ms": _pct(candidate_ms, 50),
            "p99_ms": _pct(candidate_ms, 99),
            "serving_p99_ms": _pct(active_ms, 99),
        }

    def _watch(self, candidate: Serving, health: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Watch the new model for ``seconds``: NaN answers, error rate and p99 latency."""
        seen = {"requests": 0, "rows": 0, "errors": 0, "nan": 0}
        latencies: deque = deque(maxlen=5000)
        counting = threading.Lock()  # taps run on the request threads: a ``+=`` from two at once loses one

        def tap(serving, X, prediction, latency_ms, error) -> None:
            if serving is candidate:
                with counting:
                    seen["requests"] += 1
                    seen["rows"] += len(X)
                    if error is not None:
                        seen["nan" if error == "nan_output" else "errors"] += 1
                if error is None:
                    latencies.append(latency_ms)

        self.agent.taps.append(tap)
        deadline, failure = time.monotonic() + float(health["seconds"]), None
        try:
            while time.monotonic() < deadline and failure is None:
                if self._cancel.is_set():
                    failure = "the rollout was aborted or superseded during the health watch"
                    break
                time.sleep(0.05)
                with counting:
                    counts = dict(seen)
                failure = _health_failure(counts, list(latencies), health)
        finally:
            self.agent.taps.remove(tap)
        return failure, {**seen, "p99_ms": _pct(list(latencies), 99), "seconds": health["seconds"]}

    # -- revert (undo an aborted rollout) -------------------------------------------------------------
    def _revert(self, doc: dict[str, Any], key: str) -> None:
        """Back to the previous slot, but only on the fleet key's signed word and only to undo this very
        rollout: the active slot is what the rollout installed, the previous one holds the version it started
        from, which this device verified and ran before. A refusal is reported but not final, so a correctly
        signed revert of the same rollout arriving later is still applied."""
        state, ledger, config = self.state.state(), self.state.ledger(), self.agent.config
        try:
            instruction = check_revert(doc, public_key=self.agent.public_key, fleet=config.fleet, ledger=ledger)
        except UpdateError as exc:
            return self._report(doc, "failed", f"{exc.problem}; staying on v{state.get('version')}", code=exc.code)
        previous = state.get("previous")
        slots = (self.state.slot_meta(self.state.active_slot()), self.state.slot_meta(previous))
        if not moved_by(doc, instruction, slots=slots, ledger=ledger):
            return self._finish(
                doc,
                key,
                "aborted",
                f"rollout {doc['rollout']} was aborted; this device stays on v{state.get('version')}",
            )
        try:
            bundle = read_bundle(self.state.slot(previous) / BUNDLE_FILE, self.agent.public_key)
            serving = self._load(bundle)
        except (AgentError, UpdateError) as exc:
            return self._finish(doc, key, "failed", f"cannot go back to v{doc['from_version']}: {exc}", code="load")
        self.state.activate(previous)
        self.agent.swap(serving)
        self._finish(
            doc,
            key,
            "rolled_back",
            f"rollout {doc['rollout']} was aborted; back on v{bundle.version}",
            code="aborted",
            remember=applied_revert(self.state.ledger(), doc["rollout"]),
        )

    # -- reporting -------------------------------------------------------------------------------------
    def _step(self, doc: dict[str, Any], state: str) -> None:
        self._check_cancel()
        self._report(doc, state)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise UpdateError("aborted", "the update was superseded or the agent is stopping")

    def _report(
        self, doc: dict[str, Any], state: str, reason: str = "", *, code: str | None = None, **facts: Any
    ) -> None:
        serving = self.agent.serving
        payload = reported_payload(
            device=self.agent.config.device_id,
            fleet=self.agent.config.fleet,
            rollout=doc["rollout"],
            version=doc["version"],
            state=state,
            reason=reason,
            code=code,
            active=serving.model_info if serving else None,
            action=doc.get("action"),  # a revert's refusal is not the rollout's install failing
            **facts,
        )
        self.last_report = payload
        (log.warning if state in ("failed", "rolled_back") else log.info)(
            "update %s to v%s: %s%s", doc["rollout"], doc["version"], state, f" ({reason})" if reason else ""
        )
        reporter = self.agent.reporter
        if reporter is not None:
            reporter.publish_raw(self.agent.topics.reported, payload, retain=True)

    def _note_restart(self, recovered: dict[str, Any]) -> None:
        """The agent came back after dying during a health watch: the swap was undone by ``recover``."""
        key = recovered.get("key") or recovered["rollout"]
        ledger = self.state.ledger()
        entry = {**ledger.get(key, {}), "reason": recovered["reason"], "code": "restart"}
        if entry.get("attempts", 0) >= MAX_ATTEMPTS:
            entry.update(final=True, state="rolled_back")
        self.state.write_ledger({**ledger, key: entry})
        doc = {"rollout": recovered["rollout"], "version": recovered["version"]}
        self.last_report = reported_payload(
            device=self.agent.config.device_id,
            fleet=self.agent.config.fleet,
            rollout=doc["rollout"],
            version=doc["version"],
            state="rolled_back" if entry.get("final") else "retrying",
            reason=recovered["reason"],
            code="restart",
        )


def run_selftest(bundle: Bundle, runtime: Any) -> dict[str, Any]:
    """Run the bundle's own test vectors; raise ``UpdateError("selftest")`` when the answers differ."""
    vectors = bundle.selftest()
    if vectors is None:
        return {"rows": 0, "note": "the bundle has no selftest.npz"}
    # one matrix, or (typed columns) one "input:<column>" array per fed column
    inputs = vectors["inputs"] if "inputs" in vectors else {k[6:]: v for k, v in vectors.items() if k[:6] == "input:"}
    try:
        raw = runtime.predict(inputs)
    except AgentError as exc:
        raise UpdateError("selftest", f"the candidate fails on its own test vectors: {exc}") from exc
    worst = 0.0
    for key, expected in vectors.items():
        if not key.startswith("output:"):
            continue
        name = key.split(":", 1)[1]
        got = raw.get(name)
        if got is None or np.shape(got) != np.shape(expected):
            raise UpdateError(
                "selftest",
                f"output {name!r} is missing or has shape {np.shape(got)}, the test vectors have {np.shape(expected)}",
            )
        if expected.dtype.kind in "fc":
            if not np.isfinite(got).all():
                raise UpdateError("selftest", f"output {name!r} has NaN or infinity on the test vectors")
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - expected))) if expected.size else 0.0)
            if worst > SELFTEST_SCORE_TOLERANCE:
                raise UpdateError(
                    "selftest",
                    f"output {name!r} differs from the test vectors by up to {worst:.4g} "
                    f"(tolerance {SELFTEST_SCORE_TOLERANCE})",
                )
        else:
            agreement = (
                float(np.mean(np.asarray(got).astype(str) == np.asarray(expected).astype(str)))
                if expected.size
                else 1.0
            )
            if agreement < SELFTEST_MIN_LABEL_AGREEMENT:
                raise UpdateError(
                    "selftest", f"output {name!r} matches the test vectors on only {agreement:.1%} of rows"
                )
    return {"rows": int(len(inputs)), "max_abs_diff": worst}


def _health_failure(seen: dict[str, int], latencies: list[float], health: dict[str, Any]) -> str | None:
    if seen["nan"]:
        return f"the new model answered NaN on {seen['nan']} of {seen['requests']} requests"
    if (
        seen["requests"] >= health["min_requests"]
        and (seen["errors"] + seen["nan"]) / seen["requests"] > health["max_error_rate"]
    ):
        return (
            f"{seen['errors']} of {seen['requests']} requests failed on the new model "
            f"(limit {health['max_error_rate']:.0%})"
        )
    if health.get("max_p99_ms") and len(latencies) >= health["min_requests"]:
        p99 = _pct(latencies, 99)
        if p99 is not None and p99 > health["max_p99_ms"]:
            return f"p99 latency {p99:.2f} ms is over {health['max_p99_ms']} ms"
    return None


def _agreeing(task: str, answered: np.ndarray, candidate: np.ndarray) -> int:
    if task == "classification":
        return int(np.sum(np.asarray(answered).astype(str) == np.asarray(candidate).astype(str)))
    a, b = (
        np.asarray(answered, dtype=np.float64).reshape(len(answered), -1),
        np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1),
    )
    return int(np.sum(np.all(np.isclose(a, b, rtol=0.01, atol=1e-3), axis=1)))


def _pct(values: list[float], q: float) -> float | None:
    return float(f"{np.percentile(values, q):.4g}") if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _job_key(doc: dict[str, Any]) -> str:
    return f"{doc['rollout']}:{doc['action']}"
