"""Field samples on their way to the collector: ``cmd: upload`` in, a resumable HTTP upload out.

The collector's ``upload`` command names an upload id it issued to this device, the URL to send to and
a selection (``since``, ``drifted_only``). The uploader (one thread, started on the first command)
writes the selected rows, with the delayed labels the prediction log holds for them (``predictions.db``:
labels join by row id), into one gzip'd file of JSON lines (``SAMPLES_SCHEMA``: a header line with the
models' feature names, then one row a line) and POSTs it in chunks of ``CHUNK_BYTES``, each with
``Content-Range: bytes <first>-<last>/<size>`` and the whole file's sha256 (``X-Edgekit-Sha256``), with
the device's token when it is going to the collector (``[update] token``: the collector's device token, or
its API token on older setups; ``UpdateConfig.token_for``).

A chunk that does not get its answer is sent again (backoff, ``ATTEMPTS`` times); a 409 names the offset
the collector holds, and sending goes on from there, so a cut upload resumes instead of starting over.
The file and its progress stay on disk (``capture/uploads/<id>.*``) until the collector confirms the
whole or refuses it: an upload the network cut is tried again later (``RETRY_SECONDS``, doubling), and an
agent restarted mid-upload resumes it too. An upload id is served once: a repeated command (an MQTT
redelivery) is ignored.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import queue
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import AgentError
from .fsutil import write_atomic

log = logging.getLogger("device_agent.capture")
SAMPLES_SCHEMA = "edgekit.samples/1"
CHUNK_BYTES = 256 << 10
ATTEMPTS = 5
DONE_KEPT = 200  # upload ids remembered as served (a redelivered command is ignored)
RETRY_SECONDS, RETRY_ROUNDS = 30.0, 6  # an upload the network cut: again after 30 s, 60 s, … (~30 min in all)
KEPT_SECONDS = 86400.0  # a cut upload's file is dropped at a start this long after its last progress
SERVED_FILE = "served.list"  # the uploads served already; not a .json, so no upload id can name it
OLD_SERVED_FILE = "done.json"  # where agents before ``SERVED_FILE`` kept that list: read once, then moved


class UploadError(AgentError):
    """An upload of field samples the collector refused (``code``: auth, refused) or that never got through."""

    def __init__(self, url: str, code: str, problem: str, fix: str = "") -> None:
        self.url, self.code = url, code
        self._say(problem, fix, url)


class Uploader:
    """The agent's uploads: commands queued from the MQTT thread, served one at a time by its own thread.

    An upload the network cut (``UploadError`` "network": no answer, or a 5xx, 408 or 429 from a collector
    whose database is down or that is busy) keeps its file and progress and is tried again
    after ``retry_seconds``, doubling each time, ``retry_rounds`` times; past them it waits on disk for the
    agent's next start (or a redelivered command). One the collector refused is dropped; one cut by the
    agent stopping waits for its next start. Files older than ``KEPT_SECONDS`` are dropped at start."""

    attempts = ATTEMPTS  # per chunk, within one round (send_file's backoff)
    backoff = 0.5
    chunk_bytes = CHUNK_BYTES
    retry_seconds = RETRY_SECONDS
    retry_rounds = RETRY_ROUNDS

    def __init__(self, capture: Any, agent: Any) -> None:
        self.capture, self.config = capture, agent.config
        self.directory = capture.directory / "uploads"
        self.log_path = agent.config.state_dir / "predictions.db"
        self.stopped: threading.Event = agent._stop
        self._queue: queue.Queue = queue.Queue()
        self._later: list[tuple[float, dict[str, Any]]] = []  # (when, command): cut uploads, tried again
        self._rounds: dict[str, int] = {}  # an upload's network failures in a row
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        for state in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            doc = _read_json(state)
            if state.name == OLD_SERVED_FILE and isinstance(doc, list):
                self._move_old_served(state, doc)
                continue
            if time.time() - state.stat().st_mtime > KEPT_SECONDS:  # the collector gave up on it long ago
                self._forget(state.stem, done=False)
                continue
            self.on_command(doc or {})  # an upload cut by a restart: on from where it stopped

    def _move_old_served(self, old: Path, served: list[str]) -> None:
        """An older agent's served list into ``SERVED_FILE``: as an upload's state it would be served as a
        command (a list, which ended the upload thread), and its ids would be served again if redelivered."""
        served = [*served, *(_read_json(self.directory / SERVED_FILE) or [])][-DONE_KEPT:]
        write_atomic(self.directory / SERVED_FILE, json.dumps(served).encode())
        old.unlink()

    def on_command(self, doc: dict[str, Any]) -> None:
        """``cmd: upload`` (already checked by ``protocol.command``): served in the background."""
        self._queue.put(doc)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgekit-upload", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            doc = self._next()
            if doc is None:
                continue
            try:
                self.serve(doc)
            except UploadError as exc:
                self._failed(doc, exc)
            except Exception:  # a bad file must not end the uploads to come
                self.capture.uploads["failed"] += 1
                log.exception("field samples upload %s failed", doc.get("upload"))

    def _next(self) -> dict[str, Any] | None:
        """The next command: a retry that is due, else a new one (waiting at most half a second)."""
        with self._lock:
            due = next((item for item in self._later if item[0] <= time.monotonic()), None)
            if due is not None:
                self._later.remove(due)
                return due[1]
        try:
            return self._queue.get(timeout=0.5)
        except queue.Empty:
            return None

    def _failed(self, doc: dict[str, Any], exc: UploadError) -> None:
        """Refused: dropped (asking again issues a new id). Cut: kept, and tried again later from where the
        collector stands. Stopping: kept for the next start."""
        upload = doc.get("upload", "")
        if exc.code == "cancelled":
            return
        refused = exc.code in ("auth", "refused")
        self.capture.uploads["refused" if refused else "failed"] += 1
        if refused:
            log.warning("field samples upload %s refused: %s", upload, exc)
            self._forget(upload, done=True)
            return
        rounds = self._rounds[upload] = self._rounds.get(upload, 0) + 1
        if rounds > self.retry_rounds:
            log.warning("field samples upload %s failed %d times (%s); kept for the next start", upload, rounds, exc)
            return
        delay = self.retry_seconds * 2 ** (rounds - 1)
        log.warning("field samples upload %s failed (%s); trying again in %.0f s", upload, exc, delay)
        with self._lock:
            self._later.append((time.monotonic() + delay, doc))

    def serve(self, doc: dict[str, Any]) -> int:
        """Build (or find) the upload's file and send what the collector does not have; the bytes sent."""
        upload = doc["upload"]
        config = self.config
        broker_host = config.mqtt.host if config.mqtt.url else None
        if upload in (_read_json(self.directory / SERVED_FILE) or []):
            log.info("field samples upload %s was served already; ignored", upload)
            return 0
        if not config.update.trusts(doc["url"], broker_host):  # anyone who can publish a cmd could name a URL
            raise UploadError(
                doc["url"], "refused", "not the collector this device knows; set [update] collector in agent.toml"
            )
        state_path = self.directory / f"{upload}.json"
        state = _read_json(state_path)
        if state is None or not (self.directory / f"{upload}.gz").exists():
            state = {**doc, **self.build(doc)}
            write_atomic(state_path, json.dumps(state).encode())
        token = config.update.token_for(state["url"], broker_host)

        def progress(received: int) -> None:
            write_atomic(state_path, json.dumps({**state, "sent": received}).encode())

        sent = send_file(
            state["url"],
            self.directory / f"{upload}.gz",
            size=state["size"],
            sha256=state["sha256"],
            token=token,
            start=int(state.get("sent", 0)),
            progress=progress,
            cancelled=self.stopped.is_set,
            attempts=self.attempts,
            backoff=self.backoff,
            chunk_bytes=self.chunk_bytes,
        )
        self._rounds.pop(upload, None)
        self.capture.uploads["done"] += 1
        self.capture.upload_bytes += sent
        self.capture.upload_rows += state["rows"]
        self._forget(upload, done=True)
        log.info("field samples upload %s: %d rows, %d bytes sent", upload, state["rows"], sent)
        return sent

    def build(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Write the upload's file (header, then the selected rows with their labels); its size, sha256, rows."""
        capture, labels = self.capture, self._labels()
        rows = [
            {**record, "label": labels.get(record["id"])}
            for record in capture.rows(since=doc.get("since"), drifted_only=bool(doc.get("drifted_only")))
        ]
        header = {
            "schema": SAMPLES_SCHEMA,
            "device": self.config.device_id,
            "fleet": self.config.fleet,
            "upload": doc["upload"],
            "capture": capture.enabled,
            "models": capture.models(),
            "rows": len(rows),
        }
        return write_upload(self.directory / f"{doc['upload']}.gz", header, rows)

    def _labels(self) -> dict[str, Any]:
        """Every delayed label the prediction log holds, by row id (read-only: the agent writes it)."""
        if not self.log_path.exists():
            return {}
        try:
            db = sqlite3.connect(f"file:{self.log_path}?mode=ro", uri=True, timeout=5)
            try:
                found = db.execute("SELECT boot, n, label FROM predictions WHERE label IS NOT NULL").fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:  # no labels is better than no upload
            log.warning("could not read labels from %s (%s); the rows go without", self.log_path, exc)
            return {}
        return {f"{boot}-{n}": json.loads(label) for boot, n, label in found}

    def _forget(self, upload: str, *, done: bool) -> None:
        for suffix in (".gz", ".json"):
            (self.directory / f"{upload}{suffix}").unlink(missing_ok=True)
        if done:
            served = (_read_json(self.directory / SERVED_FILE) or [])[-DONE_KEPT + 1 :]
            write_atomic(self.directory / SERVED_FILE, json.dumps([*served, upload]).encode())


def write_upload(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An upload's file (``SAMPLES_SCHEMA``: the header line, then one row a line, gzip'd); size, sha256, rows."""
    lines = [json.dumps(header, separators=(",", ":"))] + [json.dumps(r, separators=(",", ":")) for r in rows]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": len(rows)}


def send_file(
    url: str,
    path: Path,
    *,
    size: int,
    sha256: str,
    token: str | None,
    start: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    attempts: int = ATTEMPTS,
    timeout: float = 30.0,
    backoff: float = 0.5,
    progress: Callable[[int], None] = lambda received: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> int:
    """POST ``path`` to ``url`` in chunks from ``start``; the bytes sent. Raises ``UploadError``."""
    offset, sent, failures = start, 0, 0
    with open(path, "rb") as handle:
        while True:
            if cancelled():
                raise UploadError(url, "cancelled", "the agent is stopping", "it resumes at the next start")
            handle.seek(offset)
            chunk = handle.read(chunk_bytes)
            try:
                status, doc = _post_chunk(url, chunk, offset, size, sha256, token, timeout)
            except OSError as exc:
                failures += 1
                if failures >= attempts:
                    raise UploadError(url, "network", f"failed after {attempts} attempts ({exc})") from exc
                time.sleep(min(backoff * 2 ** (failures - 1), 10.0))
                continue
            sent += len(chunk) if status == 200 else 0
            offset = _next_offset(url, status, doc)
            progress(offset)
            if doc.get("complete"):
                return sent
            if offset >= size:
                raise UploadError(url, "refused", f"the collector holds all {size} bytes but did not take them")


def _next_offset(url: str, status: int, doc: dict[str, Any]) -> int:
    """Where to go on after an answer: the collector's ``received`` (a 409 says it holds another offset)."""
    if status in (200, 409) and isinstance(doc.get("received"), int):
        return doc["received"]
    if status in (408, 429) or status >= 500:  # the collector is busy or its database is down: kept, tried later
        raise UploadError(url, "network", f"HTTP {status}: {doc.get('error') or 'the collector is unavailable'}")
    if status in (401, 403):
        raise UploadError(
            url,
            "auth",
            f"HTTP {status}: the collector wants its device token",
            "set [update] token_file (or EDGEKIT_COLLECTOR_TOKEN) and [update] collector in agent.toml",
        )
    raise UploadError(url, "refused", f"HTTP {status}: {doc.get('error') or 'refused'}")


def _post_chunk(
    url: str, chunk: bytes, offset: int, size: int, sha256: str, token: str | None, timeout: float
) -> tuple[int, dict[str, Any]]:
    """One chunk's POST: (status, JSON answer). A connection failure raises OSError (sent again)."""
    last = offset + len(chunk) - 1
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Range": f"bytes {offset}-{last}/{size}",
        "X-Edgekit-Sha256": sha256,
    }
    request = urllib.request.Request(url, data=chunk, method="POST", headers=headers)
    if token:  # unredirected: a redirect must not take the collector's token elsewhere
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the collector's command
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()
        finally:
            exc.close()
        if exc.code >= 500:  # the collector or its database is having a moment: sent again
            raise OSError(f"HTTP {exc.code}") from exc
        return exc.code, _json(body)
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from exc


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
