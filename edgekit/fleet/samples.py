"""Field samples on the collector: ask a device for its kept rows, take its upload, store and serve the rows.

    POST /api/samples/requests {device, since, drifted_only}   issue an upload id and send ``cmd: upload``
    GET  /api/samples/requests/<id>                           that upload's progress (``fleet samples`` polls)
    POST /api/samples/<device>/<id>                           the device's chunks (Content-Range, sha256)
    GET  /api/samples/<device>?upload=&since=&drifted_only=   stored rows, JSON (with labels)
    GET  /samples                                             the dashboard's uploads page

Every route needs the API token when the collector has one (rows are the fleet owner's data), except the
device's chunks, which take the device token too (``CollectorConfig.device_token``). A chunk
is taken only for an upload id this collector's database issued to that device, while it is open, at
the offset held (else 409 names the offset: the device resumes from there), within ``MAX_CHUNK_BYTES``
and ``MAX_UPLOAD_BYTES``, with as many bytes as its Content-Range says. The last chunk's arrival
checks the whole file's sha256 and its rows. Whatever is refused is counted (``count_reject``, reasons
``upload_<why>``: unrequested, replay, truncated, oversized, corrupt, malformed), as ingest's refusals
are: ``fleet status`` and the collector's /metrics show them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import time
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from device_agent.protocol import Topics, command_payload, encode
from device_agent.wsgi import Request, Response, error_response, json_response
from edgekit.errors import EdgekitError, StoreUnavailable
from edgekit.fleet.auth import bearer_ok, device_route_ok
from edgekit.models.data import FIELD_SAMPLE_METADATA

SAMPLES_SCHEMA = "edgekit.samples/1"  # device_agent.capture_upload's file: a header line, then one row a line
MAX_CHUNK_BYTES = 4 << 20
MAX_UPLOAD_BYTES = 256 << 20  # compressed; what a device may send in one upload
MAX_UNPACKED_BYTES = 1 << 30  # the rows once decompressed (a gzip bomb stops here)
_PIECE_BYTES = 256 << 10  # unpacked at a time: what reading an upload holds in memory, with one chunk
# one row's line at most: a kept tensor example is at most 1 MiB (capture.MAX_EXAMPLE_BYTES), ~1.4 MiB as base64;
# without a cap, a small upload of one long line would be held (and parsed) whole, up to MAX_UNPACKED_BYTES
MAX_LINE_BYTES = 8 << 20
_UPLOAD_ROUTE = re.compile(r"^/api/samples/(?P<device>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/(?P<id>[A-Za-z0-9_-]{1,64})$")
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class SampleStore(Protocol):
    """What the routes use of the store (``store/sample_records.py``, and the fleet table)."""

    def status(self) -> list[dict[str, Any]]: ...

    def count_reject(self, reason: str, device: str, now: float) -> None: ...

    def issue_upload(self, upload_id: str, device: str, selection: dict[str, Any], now: float) -> None: ...

    def sample_upload(self, upload_id: str) -> dict[str, Any] | None: ...

    def sample_uploads(self, *, device: str | None = ..., limit: int = ...) -> list[dict[str, Any]]: ...

    def add_sample_chunk(
        self, upload_id: str, first: int, data: bytes, *, size: int, sha256: str, now: float
    ) -> int | None: ...

    def upload_chunks(self, upload_id: str) -> Iterator[bytes]: ...

    def complete_upload(
        self, upload_id: str, device: str, rows: Iterable[dict[str, Any]], header: dict[str, Any], now: float
    ) -> bool: ...

    def fail_upload(self, upload_id: str, reason: str, now: float) -> None: ...

    def sample_rows(self, **selection: Any) -> list[dict[str, Any]]: ...

    def sample_counts(self) -> dict[str, Any]: ...


class SampleFleet(Protocol):
    """What the routes use of the running collector: the store, the API token, MQTT and the public URL."""

    store: Any
    config: Any
    collector: Any

    def http_url(self) -> str: ...


class Refused(EdgekitError):
    """An upload chunk refused: ``reason`` is counted, ``status`` answered."""

    def __init__(self, reason: str, status: int, problem: str, fix: str = "", *, received: int | None = None) -> None:
        self.reason, self.http_status, self.received = reason, status, received  # received: where to go on from
        super().__init__(problem, fix)


def route(fleet: SampleFleet, request: Request) -> Response | None:
    """The answer to a samples request, or None when the path is not one of these routes."""
    path = request.path
    if not (path.startswith("/api/samples") or path == "/samples"):
        return None
    if request.method not in ("GET", "HEAD", "POST"):
        return error_response(405, f"{request.method} is not served; field samples take GET and POST")
    chunk = _UPLOAD_ROUTE.match(path) if request.method == "POST" else None
    if not (device_route_ok(fleet, request) if chunk else bearer_ok(request, fleet.config.api_token)):
        return error_response(
            401,
            "missing or wrong token for a field-sample upload; set [update] token_file to the collector's device token"
            if chunk
            else "missing or wrong API token for field samples; set EDGEKIT_COLLECTOR_TOKEN (a device token is not it)",
        )
    try:
        if chunk:
            return receive_chunk(fleet.store, chunk["device"], chunk["id"], request)
        if request.method == "POST":
            if path == "/api/samples/requests":
                return json_response(request_upload(fleet, request.json_object() if request.body else {}), 201)
            return error_response(404, f"no route POST {path}")
        return _get(fleet, request)
    except StoreUnavailable:  # transient, not a 400 (a device drops a refused upload): web.route's 503
        raise
    except (EdgekitError, ValueError, TypeError) as exc:
        return error_response(getattr(exc, "http_status", 400), str(exc))


def _get(fleet: SampleFleet, request: Request) -> Response:
    path, query, store = request.path, request.query, fleet.store
    if path == "/samples":
        from edgekit.fleet.pages import page

        return Response(200, page("Field samples", render_uploads(store.sample_uploads(limit=100))), "text/html")
    if path.startswith("/api/samples/requests/"):
        upload = store.sample_upload(path.rsplit("/", 1)[1])
        return json_response(upload) if upload else error_response(404, f"no upload {path.rsplit('/', 1)[1]!r}")
    device = path.split("/", 3)[3] if path.count("/") == 3 else ""
    if not device:
        return json_response(store.sample_uploads(limit=int(query.get("limit", 50))))
    since = float(query["since"]) if query.get("since") else None
    rows = store.sample_rows(
        device=device, upload=query.get("upload"), since=since, drifted_only=query.get("drifted_only") == "true"
    )
    upload = store.sample_upload(query["upload"]) if query.get("upload") else None
    return json_response({"device": device, "header": (upload or {}).get("header"), "rows": rows})


def request_upload(fleet: SampleFleet, doc: dict[str, Any]) -> dict[str, Any]:
    """Issue an upload id for ``doc["device"]`` and send it the ``upload`` command over MQTT."""
    from edgekit.fleet.merge import since_timestamp

    device = str(doc.get("device") or "")
    fleets = {d["device"]: d["fleet"] for d in fleet.store.status()}
    if device not in fleets:
        raise Refused("", 404, f"no device {device!r} is known to this collector", "see 'edgekit fleet status'")
    since = doc.get("since")
    if isinstance(since, str):  # "2h": the device compares its own clock's answer times with it
        since = datetime.fromisoformat(since_timestamp(since).replace("Z", "+00:00")).timestamp()
    since = float(since) if since is not None else None
    selection = {"since": since, "drifted_only": bool(doc.get("drifted_only"))}
    upload_id = "u" + secrets.token_hex(8)
    url = f"{fleet.http_url().rstrip('/')}/api/samples/{device}/{upload_id}"
    fleet.store.issue_upload(upload_id, device, selection, time.time())
    payload = encode(command_payload("upload", upload=upload_id, url=url, **selection))
    if not fleet.collector.publish(Topics(fleets[device], device).cmd, payload):
        fleet.store.fail_upload(upload_id, "the collector was not connected to the broker", time.time())
        raise Refused("", 503, "the collector is not connected to the MQTT broker", "try again in a moment")
    return {"upload": upload_id, "device": device, "url": url, **selection}


def receive_chunk(store: SampleStore, device: str, upload_id: str, request: Request) -> Response:
    """One chunk of an upload; refusals are counted per reason and device."""
    now = time.time()
    try:
        return json_response(_take_chunk(store, device, upload_id, request, now))
    except Refused as exc:
        if exc.reason:
            store.count_reject(f"upload_{exc.reason}", device, now)
        extra = {} if exc.received is None else {"received": exc.received}
        return json_response({"error": str(exc), **extra}, exc.http_status)


def _take_chunk(store: SampleStore, device: str, upload_id: str, request: Request, now: float) -> dict[str, Any]:
    upload = store.sample_upload(upload_id)
    if upload is None or upload["device"] != device:
        raise Refused("unrequested", 403, f"upload {upload_id} was not asked of device {device}", "run fleet samples")
    if upload["state"] not in ("requested", "receiving"):
        raise Refused("replay", 409, f"upload {upload_id} is {upload['state']} already; it is not taken twice")
    first, last, size, sha256 = _chunk_range(request)
    body = request.body
    if size > MAX_UPLOAD_BYTES or len(body) > MAX_CHUNK_BYTES:
        raise Refused(
            "oversized", 413, f"an upload of {size} bytes, a chunk of {len(body)}", f"at most {MAX_UPLOAD_BYTES} bytes"
        )
    if len(body) != last - first + 1 or last >= size:
        raise Refused("truncated", 400, f"a chunk of {len(body)} bytes, its Content-Range says {first}-{last}/{size}")
    received = store.add_sample_chunk(upload_id, first, body, size=size, sha256=sha256, now=now)
    if received is None:
        return _out_of_turn(store, device, upload_id, first, size, sha256, now)
    if received < size:
        return {"received": received, "complete": False}
    return _finish(store, device, upload_id, size, sha256, now)


def _chunk_range(request: Request) -> tuple[int, int, int, str]:
    match = _RANGE.fullmatch(request.header("content-range").strip())
    sha256 = request.header("x-edgekit-sha256").strip().lower()
    if not match or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise Refused("malformed", 400, "a chunk needs Content-Range: bytes first-last/size and X-Edgekit-Sha256")
    first, last, size = (int(group) for group in match.groups())
    if last < first:
        raise Refused("malformed", 400, f"Content-Range {first}-{last} ends before it starts")
    return first, last, size, sha256


def _out_of_turn(store: SampleStore, device: str, upload_id: str, first: int, size: int, sha: str, now: float):
    """A chunk that was not the next one: one of another file is refused; a repeat of the last chunk of an
    upload held whole but never finished (its collector failed between the two) finishes it now, or fails
    it cleanly; any other (a repeat whose answer was lost, or one from further on) gets 409 and the offset
    to go on from."""
    upload = store.sample_upload(upload_id) or {}
    if upload.get("state") not in ("requested", "receiving"):
        raise Refused("replay", 409, f"upload {upload_id} is {upload.get('state')} already; it is not taken twice")
    if upload.get("size") not in (None, size) or upload.get("sha256") not in (None, sha):
        raise Refused("corrupt", 409, f"upload {upload_id} began as another file (size or sha256 differ)")
    held = upload["received"]
    if held == size:
        return _finish(store, device, upload_id, size, sha, now)
    raise Refused("", 409, f"upload {upload_id} holds {held} bytes, not {first}; send from there", received=held)


def _finish(store: SampleStore, device: str, upload_id: str, size: int, sha256: str, now: float) -> dict[str, Any]:
    """Check the whole upload (its sha256, then its header and rows), then store its rows: two passes over
    its chunks as the store yields them, so a large upload costs a chunk of memory, not its size."""
    try:
        header, count = check_upload(store.upload_chunks(upload_id), device, upload_id, sha256)
    except Refused as exc:
        store.fail_upload(upload_id, str(exc), now)  # a no-op when another collector completed it meanwhile
        return _completed(store, upload_id, exc)
    rows = _parsed(_lines(store.upload_chunks(upload_id)), upload_id)
    next(rows)  # the header, checked above
    if not store.complete_upload(upload_id, device, rows, header, now):  # another collector was first
        state = (store.sample_upload(upload_id) or {}).get("state")
        return _completed(store, upload_id, Refused("replay", 409, f"upload {upload_id} is {state} already"))
    return {"received": size, "complete": True, "rows": count}


def _completed(store: SampleStore, upload_id: str, refusal: Refused) -> dict[str, Any]:
    """The answer for an upload another collector (sharing the database) completed while this one
    finished it too: complete. Otherwise ``refusal`` is raised."""
    upload = store.sample_upload(upload_id) or {}
    if upload.get("state") != "complete":
        raise refusal
    return {"received": upload["size"], "complete": True, "rows": upload["rows"]}


def check_upload(
    chunks: Iterable[bytes], device: str, upload_id: str, sha256: str | None = None
) -> tuple[dict[str, Any], int]:
    """The header and row count of an upload's file, read chunk by chunk: ``Refused("corrupt")`` when the
    bytes do not hash to ``sha256``, ``Refused("malformed")`` when they do but are not its rows."""
    hasher = hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for chunk in chunks:
            hasher.update(chunk)
            yield chunk

    source, problem, header, count = hashed(), None, {}, 0
    try:
        rows = _parsed(_lines(source), upload_id)
        header = _header(next(rows, None), device, upload_id)
        count = sum(1 for _ in rows)
        if header.get("rows") != count:
            raise Refused("malformed", 400, f"upload {upload_id}: {count} rows, the header says {header.get('rows')}")
    except Refused as exc:
        problem = exc
    for _ in source:  # the rest, for the hash: a bad hash says "corrupt", whatever else is wrong
        pass
    digest = hasher.hexdigest()
    if sha256 is not None and digest != sha256:
        raise Refused("corrupt", 400, f"upload {upload_id}: its bytes hash to {digest[:12]}…, not {sha256[:12]}…")
    if problem is not None:
        raise problem
    return header, count


def parse_upload(data: bytes, device: str, upload_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and rows of an upload's file held in memory; ``Refused("malformed")`` for anything else."""
    header, _ = check_upload([data], device, upload_id)
    rows = _parsed(_lines([data]), upload_id)
    next(rows)
    return header, list(rows)


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The JSON lines of a gzip'd file given in pieces, unpacked a bounded piece at a time (a gzip bomb stops
    at ``MAX_UNPACKED_BYTES``, a line at ``MAX_LINE_BYTES``). Raises ValueError or zlib.error."""
    decompressor, pending, unpacked = zlib.decompressobj(wbits=31), bytearray(), 0
    for chunk in chunks:
        data = chunk
        while data and not decompressor.eof:
            piece = decompressor.decompress(data, _PIECE_BYTES)
            data = decompressor.unconsumed_tail
            unpacked += len(piece)
            if unpacked > MAX_UNPACKED_BYTES:
                raise ValueError(f"it unpacks past {MAX_UNPACKED_BYTES} bytes")
            start = len(pending)
            pending += piece
            end = pending.rfind(b"\n", start)
            if end >= 0:
                yield from (line for line in bytes(pending[:end]).split(b"\n") if line.strip())
                del pending[: end + 1]
            if len(pending) > MAX_LINE_BYTES:
                raise ValueError(f"a line runs past {MAX_LINE_BYTES} bytes")
    if not decompressor.eof:
        raise ValueError("the gzip stream ends early")
    if pending.strip():
        yield bytes(pending)


def _parsed(lines: Iterator[bytes], upload_id: str) -> Iterator[Any]:
    """Each line as JSON (the header first, then the rows, each checked); ``Refused("malformed")`` for a line
    that is not one, or a file that is not gzip'd JSON lines."""
    index = 0
    try:
        for index, line in enumerate(lines):
            value = json.loads(line)
            if index and not _row_ok(value):
                raise Refused("malformed", 400, f"upload {upload_id}: row {index} is not a field sample")
            yield value
    except (zlib.error, ValueError) as exc:
        raise Refused("malformed", 400, f"upload {upload_id} is not gzip'd JSON lines ({exc})") from exc


def _header(value: Any, device: str, upload_id: str) -> dict[str, Any]:
    header = value if isinstance(value, dict) else {}
    if header.get("schema") != SAMPLES_SCHEMA or header.get("upload") != upload_id or header.get("device") != device:
        raise Refused("malformed", 400, f"upload {upload_id}'s header is not {SAMPLES_SCHEMA} for {device}")
    return header


def _row_ok(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("id"), str)
        and isinstance(row.get("model"), str)
        and isinstance(row.get("version"), int)
        and isinstance(row.get("ts"), (int, float))
        and isinstance(row.get("input"), (list, dict))
        and (row.get("seq") is None or isinstance(row.get("seq"), int))
    )


def render_uploads(uploads: list[dict[str, Any]]) -> str:
    """The dashboard's table of uploads: who was asked, what arrived, what was refused."""
    from html import escape

    head = "<tr><th>upload</th><th>device</th><th>state</th><th>rows</th><th>labelled</th><th>bytes</th>"
    head += "<th>asked</th><th>reason</th></tr>"
    body = "".join(
        f"<tr><td>{escape(u['id'])}</td><td><a href='/devices/{escape(u['device'])}'>{escape(u['device'])}</a></td>"
        f"<td class='{'bad' if u['state'] == 'failed' else 'ok' if u['state'] == 'complete' else ''}'>"
        f"{escape(u['state'])}</td><td>{u['rows']}</td><td>{u['labelled']}</td>"
        f"<td>{u['received']}{'' if u['size'] is None else ' / ' + str(u['size'])}</td>"
        f"<td>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(u['requested_at']))}</td>"
        f"<td>{escape(u['reason'])}</td></tr>"
        for u in uploads
    )
    return f"<h1>Field samples</h1><p><a href='/'>fleet</a></p><table>{head}{body}</table>"


def sample_metrics(store: SampleStore) -> list[Any]:
    """The collector's /metrics families for field samples (``fleet/metrics.py``); refusals are in
    ``edgekit_collector_rejected`` with the ``upload_`` reasons."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    counts = store.sample_counts()
    uploads = GaugeMetricFamily("edgekit_sample_uploads", "Field-sample uploads by state.", labels=["state"])
    for state in ("requested", "receiving", "complete", "failed"):
        uploads.add_metric([state], counts["uploads"].get(state, 0))
    rows = CounterMetricFamily("edgekit_sample_rows", "Field rows stored per device.", labels=["device"])
    labelled = CounterMetricFamily("edgekit_sample_labelled_rows", "Field rows with a label.", labels=["device"])
    for device, (stored, with_label) in sorted(counts["rows"].items()):
        rows.add_metric([device], stored)
        labelled.add_metric([device], with_label)
    return [uploads, rows, labelled]


# -- the operator's side: ``edgekit fleet samples`` ---------------------------------------------------------
def collect_samples(
    client: Any,
    *,
    device: str,
    since: str | None,
    drifted_only: bool,
    timeout: float,
    poll: float = 0.5,
    say: Any = lambda line: None,
) -> dict[str, Any]:
    """Ask ``device`` for its rows through the collector, wait for the upload, and return
    ``{"upload": ..., "header": ..., "rows": [...]}``; ``EdgekitError`` when it fails or times out."""
    issued = client.request_samples(device, since=since, drifted_only=drifted_only)
    upload_id, deadline, last = issued["upload"], time.monotonic() + timeout, None
    while True:
        upload = client.sample_upload(upload_id)
        line = f"upload {upload_id}: {upload['state']}" + (
            f", {upload['received']} of {upload['size']} bytes" if upload["size"] else ""
        )
        if line != last:
            say(line)
            last = line
        if upload["state"] == "complete":
            break
        if upload["state"] == "failed":
            raise EdgekitError(f"the upload of {device}'s field samples failed: {upload['reason']}", "ask again")
        if time.monotonic() > deadline:
            raise EdgekitError(
                f"device {device} did not upload its field samples within {timeout:.0f} s (upload {upload_id} is "
                f"{upload['state']})",
                "check it is online ('edgekit fleet status') and has [update] token and collector in its agent.toml",
            )
        time.sleep(poll)
    return {"upload": upload, **client.sample_rows(device, upload=upload_id)}


def export_samples(
    doc: dict[str, Any], path: Any, *, labelled_only: bool = False, metadata: bool = True, label: bool = True
) -> dict[str, Any]:
    """Write the rows of ``doc`` (``collect_samples``) to ``path``: .csv, .npz or .parquet by its suffix. The
    file appears whole or not at all (written beside it, then renamed); every failure is one ``EdgekitError``.
    A table holds ``_META``, the features, ``label``: data readers take its features and label only
    (``models.data.is_field_export``). ``labelled_only``: the rows with a label (promote's gate, validate);
    ``metadata``/``label`` False: the retrain sink's plain files (an .npz always holds X, y, ids)."""
    path, every = check_export_path(path), doc["rows"]
    rows = [r for r in every if r["label"] is not None] if labelled_only else every
    features, kind = _input_of(doc.get("header") or {}, rows)
    writer = _WRITERS[path.suffix.lower()]
    if kind == "tensor" and writer is not _write_npz:
        raise EdgekitError("tensor examples cannot go into a table", "export them to a .npz (-o field.npz)")
    if kind == "columns" and writer is _write_npz:
        raise EdgekitError("typed columns do not fit a .npz (numbers only)", "export them to a .csv or .parquet")
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        writer(partial, rows, (_META if metadata else (), features, ["label"] if label else []), kind)
        os.replace(partial, path)
    except OSError as exc:
        raise EdgekitError(
            f"cannot write {path} ({exc.strerror or exc})",
            "check the disk's free space and the directory's permissions",
        ) from exc
    except (ValueError, TypeError, KeyError, IndexError, binascii.Error) as exc:
        raise EdgekitError(
            f"the rows do not fit a {path.suffix} file ({exc})",
            "export them to a .csv" if writer is not _write_csv else "export them to a .parquet",
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    written = {"path": str(path), "rows": len(rows), "labelled": sum(1 for r in rows if r["label"] is not None)}
    return {**written, "left_out": len(every) - len(rows)} if labelled_only else written


def check_export_path(path: Any) -> Path:
    """``path`` if an export can be written there; else one ``EdgekitError`` naming what to fix, before a
    device is asked for anything (``fleet samples`` checks first)."""
    path = Path(path)
    if path.suffix.lower() not in _WRITERS:
        raise EdgekitError(f"cannot export field samples to {path.name!r}", "name a .csv, .npz or .parquet file")
    if path.is_dir():
        raise EdgekitError(f"{path} is a directory", f"name a file in it, e.g. -o {path / ('field' + path.suffix)}")
    parent = path.parent
    if not parent.is_dir():
        raise EdgekitError(f"there is no directory {parent} for {path.name}", f"create it (mkdir -p {parent}) first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgekitError(f"cannot write in {parent}", "name a file in a directory you can write to")
    if path.suffix.lower() in (".parquet", ".pq"):
        _pyarrow()
    return path


_META = FIELD_SAMPLE_METADATA


def _input_of(header: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], str]:
    """The rows' feature names and input kind; refused when they come from models of different inputs. Rows
    of a model the header does not describe are named by position (f0, f1, …), their kind by their cells."""
    models = header.get("models") or {}
    described = [models.get(f"{r['model']}:{r['version']}") or _unnamed(r["input"]) for r in rows]
    found = {(tuple(d.get("features", ())), d.get("kind", "matrix")) for d in described}
    if len(found) > 1:
        raise EdgekitError(
            "the rows come from model versions with different inputs", "ask with a shorter --since, one model at a time"
        )
    features, kind = found.pop() if found else ((), "matrix")
    return list(features), kind


def _unnamed(cells: Any) -> dict[str, Any]:
    return {"kind": "tensor"} if isinstance(cells, dict) else {"features": [f"f{i}" for i in range(len(cells))]}


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple, kind: str) -> None:
    """``columns``: the metadata columns, the features, and ``["label"]`` or none (also for the others)."""
    import csv

    meta, features, label = columns
    with open(path, "x", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*meta, *features, *label])
        for r in rows:
            cells = ["" if c is None else c for c in r["input"]]
            writer.writerow([*(_cell(r.get(name)) for name in meta), *cells, *(_cell(r[name]) for name in label)])


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _write_npz(path: Path, rows: list[dict[str, Any]], columns: tuple, kind: str) -> None:
    """``X`` (rows × features, or the examples stacked), ``y`` and ``labelled``, the row ids and windows:
    ``device_agent.tabular`` reads X, y and feature_names back."""
    import numpy as np

    if kind == "tensor":
        arrays = [_tensor(r["input"]) for r in rows]
        X = np.stack(arrays) if arrays else np.empty((0,))
    else:
        X = np.array([[np.nan if c is None else c for c in r["input"]] for r in rows], dtype=np.float64)
        X = X.reshape(len(rows), len(columns[1]))
    labels = [r["label"] for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels if v is not None)
    y = (
        np.array([np.nan if v is None else v for v in labels], dtype=np.float64)
        if numeric
        else np.array(["" if v is None else str(v) for v in labels])
    )
    with open(path, "xb") as handle:  # a handle: given a path without ".npz", numpy would add one
        _savez(handle, X, y, labels, columns[1], rows)


def _tensor(cell: dict[str, Any]) -> Any:
    import numpy as np

    return np.frombuffer(base64.b64decode(cell["b64"], validate=True), dtype=cell["dtype"]).reshape(cell["shape"])


def _savez(handle: Any, X: Any, y: Any, labels: list[Any], features: list[str], rows: list[dict[str, Any]]) -> None:
    import numpy as np

    np.savez(
        handle,
        X=X,
        y=y,
        labelled=np.array([v is not None for v in labels], dtype=bool),
        feature_names=np.array(features, dtype=str),
        ids=np.array([r["id"] for r in rows], dtype=str),
        seq=np.array([-1 if r["seq"] is None else r["seq"] for r in rows], dtype=np.int64),
        ts=np.array([r["ts"] for r in rows], dtype=np.float64),
        prediction=np.array([json.dumps(r["prediction"]) for r in rows], dtype=str),
    )


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise EdgekitError("Parquet needs pyarrow", "pip install 'edgekit-ml[parquet]', or export to .csv") from None
    return pa, pq


def _write_parquet(path: Path, rows: list[dict[str, Any]], columns: tuple, kind: str) -> None:
    pa, pq = _pyarrow()
    meta, features, label = columns
    table = {name: [_cell(r.get(name)) if name == "prediction" else r.get(name) for r in rows] for name in meta}
    for i, name in enumerate(features):
        table[name] = [r["input"][i] for r in rows]
    for name in label:
        table[name] = _one_type([_cell(r[name]) if isinstance(r[name], (list, dict)) else r[name] for r in rows])
    if "prediction" in table:
        table["prediction"] = _one_type(table["prediction"])
    try:
        pq.write_table(pa.table(table), str(path))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise EdgekitError(f"the rows do not fit one Parquet type per column ({exc})", "export to .csv") from exc


_WRITERS = {".csv": _write_csv, ".npz": _write_npz, ".parquet": _write_parquet, ".pq": _write_parquet}


def _one_type(values: list[Any]) -> list[Any]:
    """A column Parquet can type: values of mixed kinds (labels sent as 3 and as "3") as text."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) <= 1 or kinds <= {int, float}:
        return values
    return [None if v is None else str(v) for v in values]
