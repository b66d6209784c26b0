"""Field samples (issue 19): rows the devices keep, uploaded when the fleet asks, exported with their labels.

The capture tests run the real agent (its background thread closes the windows); the upload tests run
the real collector with its HTTP API over Mosquitto, an in-process agent with MQTT, and ``edgekit fleet
samples``; the resume test cuts a real TCP connection mid-chunk."""

from __future__ import annotations

import contextlib
import csv
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from device_agent import Agent
from device_agent.capture import Capture, row_hash, row_hashes
from device_agent.capture_upload import SAMPLES_SCHEMA, UploadError, send_file, write_upload
from device_agent.config import parse_config
from device_agent.errors import ConfigError
from device_agent.metrics import render_metrics
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.samples import MAX_UPLOAD_BYTES, parse_upload
from edgekit.fleet.service import FleetService
from edgekit.fleet.store import PostgresStore, SqliteStore
from edgekit.local.broker import free_port
from tests.agent_helpers import config_of, make_device
from tests.fleet_helpers import wait

TOKEN = "field-token"


def capture_device(tmp_path, bundle, keypair, *, capture=None, broker=None, fleet="f", collector=None, window_rows=100):
    config = make_device(
        tmp_path / "dev1", bundle, keypair[1], fleet=fleet, broker=broker, window_rows=window_rows, http=False
    )
    lines = []
    if capture is not None:
        lines += ["[capture]", *(f"{key} = {json.dumps(value)}" for key, value in capture.items())]
    if collector:
        lines += ["[update]", f'collector = "{collector}"', f'token = "{TOKEN}"']
    with open(config, "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return config


def test_capture_is_off_by_default_and_its_settings_are_checked(tmp_path, bundle, keypair, digits):
    with np.load(digits.test) as npz:
        X = npz["X"]
    config = capture_device(tmp_path, bundle, keypair)
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        agent.predict(X[:250])
        wait(lambda: agent.stats["windows"] >= 2, what="two windows")
        assert "capture" not in agent.last_summary  # a summary is what it was before capture existed
        assert "edgekit_capture_enabled 0" in render_metrics(agent)
    assert not (tmp_path / "dev1" / "state" / "capture" / "segments").exists()
    base = {"device_id": "d", "state_dir": "s", "trust": {"public_key": "k.pub"}}
    assert not parse_config(base).capture.enabled
    for bad, says in (
        ({"rat": 0.1}, "no setting 'rat'"),
        ({"enabled": "yes"}, "not true or false"),
        ({"rate": 2}, "out of range"),
        ({"max_mb": 0}, "out of range"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_config({**base, "capture": bad})


def test_the_rows_kept_are_those_whose_id_hashes_under_the_rate_with_their_window(tmp_path, bundle, keypair, digits):
    with np.load(digits.test) as npz:
        X = npz["X"]
    config = capture_device(tmp_path, bundle, keypair, capture={"enabled": True, "rate": 0.2, "drifted_rows": 0})
    answers = []
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        for i in range(50):  # one-row requests (hashed in Python) and batches (in numpy) alike
            answers += agent.predict(X[i : i + 1]).answers()
        answers += agent.predict(X[50:330]).answers() + agent.predict(X[330:450]).answers()
        wait(lambda: agent.stats["windows"] >= 4, what="four windows")  # a stop would leave the rest unsketched
    boot = agent.boot
    assert np.array_equal(row_hashes(boot, np.arange(450)), [row_hash(boot, n) for n in range(450)])
    kept = {int(r["id"].rsplit("-", 1)[1]): r for r in agent.capture.rows()}
    assert set(kept) == {n for n in range(450) if row_hash(boot, n) < 0.2}
    for n, record in kept.items():
        assert record["seq"] == agent.spool.seq_base() + n // 100  # the window it was sketched in (a cut request too)
        assert np.allclose(record["input"], X[n]) and record["prediction"] == answers[n]
        assert (record["model"], record["version"]) == ("digits", 3)
    assert agent.last_summary["capture"]["stored_rows"] == len(kept)


def test_a_drifted_window_keeps_its_rows_with_the_smallest_hashes(tmp_path, bundle, keypair, digits):
    with np.load(digits.test) as npz:
        X = npz["X"]
    config = capture_device(tmp_path, bundle, keypair, capture={"enabled": True, "rate": 0.0, "drifted_rows": 5})
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        agent.predict(X[:100])
        agent.predict(np.clip(X[100:200] + 9.0, 0, 40))
        wait(lambda: agent.stats["windows"] >= 2, what="two windows")
    drifted = sorted(range(100, 200), key=lambda n: row_hash(agent.boot, n))
    # candidates are the rows hashing under drifted_share (twice the rows wanted): for about 2 boots in 100,
    # fewer than 5 of a window's 100 rows do, and the window keeps those it has
    candidates = [n for n in drifted if row_hash(agent.boot, n) < agent.capture.drifted_share]
    kept = [r for r in agent.capture.rows()]
    assert {int(r["id"].rsplit("-", 1)[1]) for r in kept} == set(candidates[:5])
    assert all(r["seq"] == agent.spool.seq_base() + 1 and r["drifted"] is True for r in kept)
    assert agent.last_summary["drift"]["drifted"] and agent.last_summary["capture"]["kept_rows"] == len(candidates[:5])


def test_the_disk_cap_drops_the_oldest_segments_first(tmp_path, bundle, keypair, digits):
    with np.load(digits.test) as npz:
        X = npz["X"]
    config = capture_device(tmp_path, bundle, keypair, capture={"enabled": True, "rate": 1.0, "max_mb": 0.02})
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        agent.predict(X[:500])
        wait(lambda: agent.stats["windows"] >= 5, what="five windows")
    capture, cap = agent.capture, int(0.02 * (1 << 20))
    on_disk = sum(p.stat().st_size for p in capture.segments.glob("*.jsonl"))
    assert on_disk == capture.stored_bytes <= cap and capture.dropped["size_cap"] > 0
    assert capture.stored_rows + capture.dropped["size_cap"] == capture.kept_rows == 500
    kept = sorted(int(r["id"].rsplit("-", 1)[1]) for r in capture.rows())
    assert kept == list(range(500 - len(kept), 500))  # the newest rows stay
    metrics = render_metrics(agent)
    assert f'edgekit_capture_dropped_rows_total{{reason="size_cap"}} {capture.dropped["size_cap"]}' in metrics
    reopened = Capture(config_of(config).capture, capture.directory, agent.boot, window_rows=100)
    assert (reopened.stored_rows, reopened.stored_bytes) == (capture.stored_rows, capture.stored_bytes)


@contextlib.contextmanager
def running_collector(tmp_path, broker, fleet_name, **settings):
    """The real collector on ``broker`` with its HTTP API on a free port (at ``.url``); ``settings``: the rest
    of its ``CollectorConfig`` (tokens, trust)."""
    service = FleetService(
        CollectorConfig(
            broker=broker.url,
            db=str(tmp_path / "fleet.db"),
            http=f"127.0.0.1:{free_port()}",
            client_id=f"c-{fleet_name}",
            **settings,
        )
    ).start()
    service.url = f"http://127.0.0.1:{service.server.server_address[1]}"
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def collector(tmp_path, broker, fleet_name):
    with running_collector(tmp_path, broker, fleet_name, api_token=TOKEN) as service:
        yield service


@pytest.mark.network
def test_fleet_samples_exports_the_kept_rows_with_the_labels_that_arrived(
    tmp_path, bundle, keypair, digits, broker, fleet_name, collector, cli
):
    with np.load(digits.test) as npz:
        data = dict(npz)
    X, y = data["X"], data["y"]
    capture = {"enabled": True, "rate": 0.3, "drifted_rows": 0}
    config = capture_device(
        tmp_path, bundle, keypair, capture=capture, broker=broker.url, fleet=fleet_name, collector=collector.url
    )
    with Agent(config_of(config)).start(http=False) as agent:
        wait(lambda: collector.drain() >= 0 and _online(collector, "dev1"), what="the device online")
        ids = agent.predict(X[:300]).ids
        for n in range(0, 300, 2):  # delayed labels for half of them
            assert agent.feedback(ids[n], int(y[n])) == "accepted"
        wait(lambda: agent.stats["windows"] >= 3, what="three windows")
        env = {"EDGEKIT_COLLECTOR_TOKEN": TOKEN}
        out = tmp_path / "field.csv"
        result = cli("fleet", "samples", "--device", "dev1", "--collector", collector.url, "-o", out, env=env)
        assert result.exit_code == 0, result.output
        assert "with a label" in result.stdout and "complete" in result.stderr
        expected = {n for n in range(300) if row_hash(agent.boot, n) < 0.3}
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert {int(r["id"].rsplit("-", 1)[1]) for r in rows} == expected
        for r in rows:
            n = int(r["id"].rsplit("-", 1)[1])
            assert r["label"] == (str(int(y[n])) if n % 2 == 0 else "")
            assert float(r[agent.schema.feature_names[5]]) == pytest.approx(X[n, 5])
            assert int(r["seq"]) == agent.spool.seq_base() + n // 100
        as_json = cli(
            "fleet",
            "samples",
            "--device",
            "dev1",
            "--collector",
            collector.url,
            "-o",
            tmp_path / "f.npz",
            "--json",
            env=env,
        )
        assert json.loads(as_json.stdout)["rows"] == len(expected)
        with np.load(tmp_path / "f.npz") as npz:
            assert (
                npz["X"].shape == (len(expected), X.shape[1]) and npz["labelled"].sum() == (npz["y"] == npz["y"]).sum()
            )
        wait(lambda: agent.capture.uploads["done"] == 2, what="the device to count its uploads")
        assert 'edgekit_capture_uploads_total{outcome="done"} 2' in render_metrics(agent)
        served = agent.capture.uploader.serve({"upload": json.loads(as_json.stdout)["upload"], "url": "http://x/"})
        assert served == 0  # a redelivered command is not served twice
    metrics = _get(collector.url + "/metrics").decode()
    assert f'edgekit_sample_rows_total{{device="dev1"}} {len(expected)}.0' in metrics
    assert "complete" in _get(collector.url + "/samples").decode()


@pytest.mark.network
def test_a_cut_upload_resumes_where_the_collector_stands(tmp_path, broker, collector):
    rows = [_row(n) for n in range(3000)]
    path = tmp_path / "u.gz"
    upload = "u-resume"
    collector.store.issue_upload(upload, "dev1", {"since": None, "drifted_only": False}, 1.0)
    file = write_upload(path, _header("dev1", upload, len(rows)), rows)
    proxy = CuttingProxy(collector.server.server_address[1], cut_connection=2, after_bytes=20_000)
    url = f"http://127.0.0.1:{proxy.port}/api/samples/dev1/{upload}"
    chunk, sent_before_crash = 32 << 10, []

    def crash_after_three(received):
        sent_before_crash.append(received)

    with pytest.raises(UploadError, match="stopping"):
        send_file(
            url,
            path,
            **file_of(file),
            token=TOKEN,
            chunk_bytes=chunk,
            backoff=0.01,
            progress=crash_after_three,
            cancelled=lambda: len(sent_before_crash) >= 3,
        )
    assert collector.store.sample_upload(upload)["received"] == 3 * chunk  # the cut chunk was sent again
    # The device lost its progress (it starts from 0): the collector answers with the offset it holds.
    sent = send_file(url, path, **file_of(file), token=TOKEN, chunk_bytes=chunk, backoff=0.01)
    stored = collector.store.sample_upload(upload)
    assert stored["state"] == "complete" and stored["rows"] == 3000 and stored["received"] == file["size"]
    assert sent == file["size"] - 3 * chunk  # the collector took nothing twice
    # on the wire: the file, the cut part of a chunk, the one chunk the collector answered "from 96 KB on", heads
    assert file["size"] < proxy.upstream_bytes < file["size"] + 20_000 + chunk + 500 * proxy.connections
    proxy.stop()


@pytest.mark.network
def test_an_upload_the_network_cut_keeps_its_state_and_resumes_when_the_link_is_back(tmp_path, collector):
    rows, upload, chunk = [_row(n) for n in range(3000)], "u-cut", 32 << 10
    collector.store.issue_upload(upload, "dev1", {}, 1.0)
    proxy = CuttingProxy(collector.server.server_address[1], cut_connection=3, after_bytes=10_000, stay_down=True)
    url = f"http://127.0.0.1:{proxy.port}/api/samples/dev1/{upload}"
    uploader, capture, stop = quick_uploader(tmp_path, f"http://127.0.0.1:{proxy.port}", chunk)
    files = {}
    uploader.build = lambda doc: files.setdefault(
        "file", write_upload(uploader.directory / f"{upload}.gz", _header("dev1", upload, len(rows)), rows)
    )
    try:
        uploader.on_command({"upload": upload, "url": url})
        wait(lambda: capture.uploads["failed"] >= 1, what="the upload to fail while the link is down")
        assert (uploader.directory / f"{upload}.gz").exists() and (uploader.directory / f"{upload}.json").exists()
        assert collector.store.sample_upload(upload)["received"] == 2 * chunk
        proxy.down = False  # the link is back: the retry goes on from the collector's offset
        wait(lambda: capture.uploads["done"] == 1, what="the upload to resume and complete")
    finally:
        stop.set()
        proxy.stop()
    stored = collector.store.sample_upload(upload)
    assert stored["state"] == "complete" and stored["rows"] == 3000
    assert not (uploader.directory / f"{upload}.gz").exists()
    assert proxy.upstream_bytes < files["file"]["size"] + 10_000 + chunk + 500 * proxy.connections  # not from 0


@pytest.mark.network
def test_replayed_unrequested_oversized_truncated_and_corrupt_uploads_are_refused_and_counted(tmp_path, collector):
    store = collector.store
    rows = [_row(n) for n in range(10)]
    store.issue_upload("u-ok", "dev1", {}, 1.0)
    store.issue_upload("u-other", "dev2", {}, 1.0)
    store.issue_upload("u-bad", "dev1", {}, 1.0)
    file = write_upload(tmp_path / "ok.gz", _header("dev1", "u-ok", 10), rows)
    body = (tmp_path / "ok.gz").read_bytes()
    base = collector.url + "/api/samples/dev1/"
    assert _post(base + "u-ok", body, 0, file["size"], file["sha256"])[0] == 200
    refusals = {
        "replay": _post(base + "u-ok", body, 0, file["size"], file["sha256"]),
        "unrequested": _post(base + "u-never", body, 0, file["size"], file["sha256"]),
        "oversized": _post(base + "u-bad", body[:10], 0, MAX_UPLOAD_BYTES + 1, file["sha256"], last=9),
        "truncated": _post(base + "u-bad", body[:10], 0, file["size"], file["sha256"], last=99),
        "corrupt": _post(base + "u-bad", body, 0, file["size"], "0" * 64),
    }
    refusals["unrequested (another device's id)"] = _post(base + "u-other", body, 0, file["size"], file["sha256"])
    assert {why: status for why, (status, _) in refusals.items()} == {
        "replay": 409,
        "unrequested": 403,
        "oversized": 413,
        "truncated": 400,
        "corrupt": 400,
        "unrequested (another device's id)": 403,
    }
    assert "not taken twice" in refusals["replay"][1] and "was not asked of device dev1" in refusals["unrequested"][1]
    assert store.sample_upload("u-bad")["state"] == "failed"
    assert {k: v for k, v in store.rejects().items() if k.startswith("upload_")} == {
        "upload_replay": 1,
        "upload_unrequested": 2,
        "upload_oversized": 1,
        "upload_truncated": 1,
        "upload_corrupt": 1,
    }
    assert _post(base + "u-ok", body, 0, file["size"], file["sha256"], token="wrong")[0] == 401
    assert 'edgekit_collector_rejected_total{reason="upload_replay"} 1.0' in _get(collector.url + "/metrics").decode()
    assert len(store.sample_rows(device="dev1")) == 10


@pytest.mark.network
def test_an_upload_held_whole_but_never_finished_is_finished_by_a_resent_chunk(tmp_path, collector):
    """The collector stored the last chunk, then failed before checking the file (a crash, a database that
    went away): the device's resent chunk finishes it, or fails it cleanly; it never stays 'receiving'."""
    store, rows = collector.store, [_row(n) for n in range(200)]
    files = {}
    for upload in ("u-stuck", "u-lost-progress"):  # the whole file committed, nothing finished
        write_upload(tmp_path / f"{upload}.gz", _header("dev1", upload, len(rows)), rows)
        data = files[upload] = (tmp_path / f"{upload}.gz").read_bytes()
        store.issue_upload(upload, "dev1", {}, 1.0)
        half = len(data) // 2
        assert store.add_sample_chunk(upload, 0, data[:half], size=len(data), sha256=_sha(data), now=2.0) == half
        assert store.add_sample_chunk(upload, half, data[half:], size=len(data), sha256=_sha(data), now=2.0)
        assert store.sample_upload(upload)["state"] == "receiving"
    base, body = collector.url + "/api/samples/dev1/", files["u-stuck"]
    status, _ = _post(base + "u-stuck", body[half:], half, len(body), _sha(body))  # the last chunk, again
    assert status == 200 and store.sample_upload("u-stuck")["state"] == "complete"
    assert store.sample_upload("u-stuck")["rows"] == 200 and store.upload_bytes("u-stuck") == b""
    # a device that lost its progress starts from 0: the collector finishes rather than answering "send from N"
    other = files["u-lost-progress"]
    url = base + "u-lost-progress"
    send_file(url, tmp_path / "u-lost-progress.gz", size=len(other), sha256=_sha(other), token=TOKEN, chunk_bytes=4096)
    assert store.sample_upload("u-lost-progress")["state"] == "complete"
    store.issue_upload("u-wrong", "dev1", {}, 1.0)
    # whole but wrong (the stored bytes do not hash to the sha256 it began with): failed, with its reason
    assert store.add_sample_chunk("u-wrong", 0, body, size=len(body), sha256="1" * 64, now=2.0) == len(body)
    status, error = _post(base + "u-wrong", body, 0, len(body), "1" * 64)
    assert status == 400 and "hash to" in error
    assert store.sample_upload("u-wrong")["state"] == "failed" and "hash to" in store.sample_upload("u-wrong")["reason"]
    assert _post(base + "u-wrong", body, 0, len(body), "1" * 64)[0] == 409  # and it stays closed
    assert len(store.sample_rows(device="dev1")) == 200


@pytest.mark.network
def test_finishing_an_upload_streams_it_rather_than_holding_it_in_memory(tmp_path, collector):
    import secrets
    import tracemalloc

    rows = [{**_row(n), "input": [secrets.token_hex(2000)]} for n in range(12_000)]  # ~24 MB once gzip'd
    file = write_upload(tmp_path / "big.gz", _header("dev1", "u-big", len(rows)), rows)
    del rows
    body, chunk = (tmp_path / "big.gz").read_bytes(), 1 << 20
    collector.store.issue_upload("u-big", "dev1", {}, 1.0)
    url = collector.url + "/api/samples/dev1/u-big"
    last = (len(body) - 1) // chunk * chunk
    for first in range(0, last, chunk):
        assert _post(url, body[first : first + chunk], first, len(body), file["sha256"])[0] == 200
    tracemalloc.start()
    try:
        status, _ = _post(url, body[last:], last, len(body), file["sha256"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 200 and collector.store.sample_upload("u-big")["rows"] == 12_000
    # measured: 6.4 MB to finish 26 MB (chunk, request body, a batch of rows); reading it whole took 179 MB
    assert peak < len(body) / 2, f"finishing a {len(body) >> 20} MB upload took {peak >> 20} MB"


STORES = {
    "sqlite": lambda request, tmp_path: SqliteStore(tmp_path / "fleet.db"),
    "postgresql": lambda request, tmp_path: PostgresStore(request.getfixturevalue("postgres_url")),
}


@pytest.mark.parametrize("kind", sorted(STORES))
def test_the_sample_records_on_every_store(request, tmp_path, kind):
    store = STORES[kind](request, tmp_path)
    try:
        store.issue_upload("u1", "d", {"since": 5.0}, 1.0)
        assert store.add_sample_chunk("u1", 0, b"abc", size=6, sha256="s", now=2.0) == 3
        assert store.add_sample_chunk("u1", 0, b"abc", size=6, sha256="s", now=2.0) is None  # not the next one
        assert store.add_sample_chunk("u1", 3, b"def", size=7, sha256="s", now=2.0) is None  # another file
        assert store.add_sample_chunk("u1", 3, b"def", size=6, sha256="s", now=2.0) == 6
        assert store.upload_bytes("u1") == b"abcdef"
        assert list(store.upload_chunks("u1")) == [b"abc", b"def"]  # one chunk at a time, in order
        rows = [_row(1), {**_row(2), "label": 7, "drifted": True}]
        assert store.complete_upload("u1", "d", iter(rows), {"models": {}}, 3.0) is True
        assert store.complete_upload("u1", "d", [_row(3)], {}, 3.1) is False  # finished once, by one collector
        store.fail_upload("u1", "too late", 3.2)
        assert store.sample_upload("u1")["state"] == "complete" and store.sample_upload("u1")["rows"] == 2
        store.issue_upload("u2", "d", {}, 4.0)
        store.complete_upload("u2", "d", [{**_row(1), "label": "x"}, _row(2)], {}, 5.0)  # again, with a label
        found = {r["id"]: r for r in store.sample_rows(device="d")}
        assert found["b-1"]["label"] == "x" and found["b-2"]["label"] == 7 and found["b-2"]["upload"] == "u2"
        assert found["b-1"]["input"] == [1.0, "a", True] and store.sample_rows(drifted_only=True)[0]["id"] == "b-2"
        assert store.sample_upload("u1")["state"] == "complete" and store.upload_bytes("u1") == b""
        assert store.sample_counts() == {"uploads": {"complete": 2}, "rows": {"d": (2, 2)}}
    finally:
        store.close()


def test_an_upload_file_is_parsed_only_whole_and_for_its_device(tmp_path):
    rows = [_row(n) for n in range(4)]
    write_upload(tmp_path / "a.gz", _header("d", "u", 4), rows)
    data = (tmp_path / "a.gz").read_bytes()
    assert parse_upload(data, "d", "u") == (_header("d", "u", 4), rows)
    for broken, device in ((data[:-20], "d"), (data, "e"), (b"not gzip", "d")):
        with pytest.raises(Exception, match="upload u"):
            parse_upload(broken, device, "u")


# -- helpers ---------------------------------------------------------------------------------------------
def quick_uploader(tmp_path: Path, collector_url: str, chunk: int):
    """The agent's uploader for device dev1 (the collector at ``collector_url``, TOKEN) without the agent,
    retrying fast: 2 tries a chunk, rounds 0.3 s apart. Returns it, its capture counters and its stop event."""
    from types import SimpleNamespace

    from device_agent.capture_upload import Uploader
    from device_agent.config import UpdateConfig

    config = SimpleNamespace(
        update=UpdateConfig(collector=collector_url, token=TOKEN),
        mqtt=SimpleNamespace(url="mqtt://127.0.0.1:1883", host="127.0.0.1"),
        state_dir=tmp_path,
        device_id="dev1",
    )
    capture = SimpleNamespace(
        directory=tmp_path / "capture", uploads={"done": 0, "failed": 0, "refused": 0}, upload_bytes=0, upload_rows=0
    )
    stop = threading.Event()
    uploader = Uploader(capture, SimpleNamespace(config=config, _stop=stop))
    uploader.attempts, uploader.backoff, uploader.retry_seconds, uploader.chunk_bytes = 2, 0.01, 0.3, chunk
    return uploader, capture, stop


def _row(n: int) -> dict:
    return {
        "id": f"b-{n}",
        "ts": 1.7e9 + n,
        "seq": 1 + n // 100,
        "model": "m",
        "version": 1,
        "drifted": False,
        "prediction": n % 3,
        "input": [float(n), "a", True] if n < 3 else np.random.default_rng(n).random(40).tolist(),
        "label": None,
    }


def _header(device: str, upload: str, rows: int) -> dict:
    return {"schema": SAMPLES_SCHEMA, "device": device, "upload": upload, "capture": True, "models": {}, "rows": rows}


def file_of(file: dict) -> dict:
    return {"size": file["size"], "sha256": file["sha256"]}


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _online(collector, device: str) -> bool:
    return any(d["device"] == device and d["online"] for d in collector.store.status())


def _get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def _post(url, body, first, size, sha256, *, last=None, token=TOKEN) -> tuple[int, str]:
    last = first + len(body) - 1 if last is None else last
    headers = {"Content-Range": f"bytes {first}-{last}/{size}", "X-Edgekit-Sha256": sha256}
    request = urllib.request.Request(
        url, data=body, method="POST", headers={**headers, "Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read()).get("error", "")


class CuttingProxy:
    """A TCP proxy to the collector that closes its ``cut_connection``-th connection after forwarding
    ``after_bytes`` of the request: a link that drops mid-upload."""

    def __init__(self, upstream_port: int, *, cut_connection: int, after_bytes: int, stay_down=False) -> None:
        self.upstream_port, self.cut_connection, self.after_bytes = upstream_port, cut_connection, after_bytes
        self.upstream_bytes, self.connections = 0, 0
        self.stay_down, self.down = stay_down, False  # stay_down: after the cut, connections close at once
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            self.connections += 1
            limit = self.after_bytes if self.connections == self.cut_connection else None
            self.down = self.stay_down and limit is not None
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None, False), daemon=True).start()

    def _pipe(self, source, target, limit, count=True) -> None:
        forwarded = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if limit is not None and forwarded + len(data) > limit:
                    target.sendall(data[: limit - forwarded])
                    self.upstream_bytes += limit - forwarded
                    break
                target.sendall(data)
                forwarded += len(data)
                if count:
                    self.upstream_bytes += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def stop(self) -> None:
        self._stopped.set()
        self.listener.close()


def test_hashes_are_uniform_enough_to_be_a_rate():
    shares = [(row_hashes(boot, np.arange(100_000)) < 0.01).mean() for boot in ("00000000", "deadbeef", "0a1b2c3d")]
    assert all(0.008 < share < 0.012 for share in shares)


def test_exports_keep_typed_cells_and_put_tensors_in_npz_only(tmp_path):
    import pyarrow.parquet as pq

    from edgekit.errors import EdgekitError
    from edgekit.fleet.samples import export_samples

    typed = {
        "header": {"models": {"m:1": {"features": ["x", "city", "ok"], "kind": "columns"}}},
        "rows": [{**_row(n), "label": ["yes", None, 1][n]} for n in range(3)],
    }
    assert export_samples(typed, tmp_path / "t.parquet") == {
        "path": str(tmp_path / "t.parquet"),
        "rows": 3,
        "labelled": 2,
    }
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert (
        table["label"] == ["yes", None, "1"]
        and table["city"] == ["a", "a", "a"]
        and table["ok"] == [True, True, True]
        and table["x"] == [0.0, 1.0, 2.0]
    )
    with pytest.raises(EdgekitError, match="typed columns do not fit a .npz"):
        export_samples(typed, tmp_path / "t.npz")
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    cells = {"dtype": "uint8", "shape": [2, 2, 3], "b64": __import__("base64").b64encode(image.tobytes()).decode()}
    tensors = {
        "header": {"models": {"m:1": {"features": ["image"], "kind": "tensor"}}},
        "rows": [{**_row(n), "input": cells, "label": 3} for n in range(2)],
    }
    export_samples(tensors, tmp_path / "x.npz")
    with np.load(tmp_path / "x.npz") as npz:
        assert npz["X"].shape == (2, 2, 2, 3) and np.array_equal(npz["X"][1], image) and list(npz["y"]) == [3, 3]
    with pytest.raises(EdgekitError, match="tensor examples cannot go into a table"):
        export_samples(tensors, tmp_path / "x.csv")


@pytest.mark.network
def test_a_device_that_keeps_nothing_says_so_at_once(tmp_path, bundle, keypair, broker, fleet_name, collector, cli):
    config = capture_device(tmp_path, bundle, keypair, broker=broker.url, fleet=fleet_name, collector=collector.url)
    with Agent(config_of(config)).start(http=False):
        wait(lambda: collector.drain() >= 0 and _online(collector, "dev1"), what="the device online")
        result = cli(
            "fleet",
            "samples",
            "--device",
            "dev1",
            "--collector",
            collector.url,
            "-o",
            tmp_path / "f.csv",
            env={"EDGEKIT_COLLECTOR_TOKEN": TOKEN},
        )
    assert result.exit_code == 0 and "wrote 0 row(s)" in result.stdout
    assert "keeps no field rows: set [capture] enabled = true" in result.stderr
    unknown = cli(
        "fleet",
        "samples",
        "--device",
        "nobody",
        "--collector",
        collector.url,
        "-o",
        tmp_path / "g.csv",
        env={"EDGEKIT_COLLECTOR_TOKEN": TOKEN},
    )
    assert unknown.exit_code != 0 and "no device 'nobody'" in unknown.output


@pytest.mark.slow
def test_the_bench_runs_quick_and_writes_its_json(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_samples.py"), "--quick", "--json", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert [r["kind"] for r in doc["results"]] == ["digits", "churn"]
    assert all(d["rows"] > 0 and d["bytes_per_row"] > 0 for r in doc["results"] for d in r["devices"])


def test_field_samples_go_only_to_the_collector_the_device_knows(tmp_path):
    """Anyone who can publish a ``cmd`` could name a URL: the rows go nowhere the token would not go."""
    import threading
    from types import SimpleNamespace

    from device_agent.capture_upload import Uploader, UploadError
    from device_agent.config import UpdateConfig

    config = SimpleNamespace(
        update=UpdateConfig(collector="http://collector:8480"),
        mqtt=SimpleNamespace(url="mqtt://broker:1883", host="broker"),
        state_dir=tmp_path,
    )
    capture = SimpleNamespace(directory=tmp_path / "capture")
    uploader = Uploader(capture, SimpleNamespace(config=config, _stop=threading.Event()))
    uploader.build = lambda doc: pytest.fail("built an upload for a URL it must not send to")
    with pytest.raises(UploadError, match="not the collector this device knows"):
        uploader.serve({"upload": "u1", "url": "https://attacker.example/api/samples/d/u1"})
    assert UpdateConfig(collector="http://collector:8480").trusts("http://collector:8480/api/samples/d/u1", None)
    assert UpdateConfig().trusts("http://broker:8480/api/samples/d/u1", "broker")
    assert not UpdateConfig().trusts("http://elsewhere:8480/api/samples/d/u1", "broker")


def test_every_export_failure_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, cli):
    import base64
    import sys

    from edgekit.errors import EdgekitError
    from edgekit.fleet.samples import export_samples

    features = [f"f{i}" for i in range(40)]
    matrix = {
        "header": {"models": {"m:1": {"features": features, "kind": "matrix"}}},
        "rows": [_row(n) for n in range(3, 8)],
    }
    for name in ("x.csv", "x.npz", "x.parquet"):
        with pytest.raises(EdgekitError, match="there is no directory .*nodir.* create it"):
            export_samples(matrix, tmp_path / "nodir" / name)
    assert not (tmp_path / "nodir").exists()
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(EdgekitError, match="is a directory"):
        export_samples(matrix, tmp_path / "dir.csv")
    (tmp_path / "out").mkdir()
    kept = tmp_path / "out" / "field.npz"
    kept.write_bytes(b"the export of yesterday")
    cell = {"dtype": "uint8", "shape": [2, 2], "b64": base64.b64encode(bytes(4)).decode()}
    broken = {
        "a cell that is no number": {**matrix, "rows": [*matrix["rows"], {**_row(9), "input": ["x"] * 40}]},
        "a row of another length": {**matrix, "rows": [*matrix["rows"], {**_row(9), "input": [1.0]}]},
        "tensors of two shapes": {
            "header": {"models": {"m:1": {"features": ["image"], "kind": "tensor"}}},
            "rows": [{**_row(0), "input": cell}, {**_row(1), "input": {**cell, "shape": [4, 1, 1]}}, _row(2)],
        },
        "a tensor that is not base64": {
            "header": {"models": {"m:1": {"features": ["image"], "kind": "tensor"}}},
            "rows": [{**_row(0), "input": {**cell, "b64": "not base64!"}}],
        },
    }
    for why, doc in broken.items():
        with pytest.raises(EdgekitError, match=r"do not fit a \.npz file") as caught:
            export_samples(doc, kept)
        assert "\n" not in str(caught.value), why
        assert kept.read_bytes() == b"the export of yesterday", why  # not clobbered
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["field.npz"]  # no part file left behind
    assert export_samples(matrix, kept)["rows"] == 5  # a good one replaces it whole
    with np.load(kept) as npz:
        assert npz["X"].shape == (5, 40)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # pyarrow is an optional extra
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(EdgekitError, match=r"Parquet needs pyarrow.*pip install 'edgekit-ml\[parquet\]'"):
        export_samples(matrix, tmp_path / "out" / "x.parquet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["field.npz"]
    # the CLI says so before it asks any device (no collector runs at this address)
    nowhere = f"http://127.0.0.1:{free_port()}"
    for out, says in ((tmp_path / "nodir" / "x.csv", "no directory"), (tmp_path / "x.parquet", "pip install")):
        result = cli(
            "fleet",
            "samples",
            "--device",
            "d",
            "--collector",
            nowhere,
            "-o",
            out,
            env={"EDGEKIT_COLLECTOR_TOKEN": TOKEN},
        )
        assert result.exit_code != 0 and says in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
