"""Field-sample uploads against what can go wrong on the collector's side. A database down for a while: the
collector answers 503 (not a 400, which a device takes for a refusal and drops its file) and the device keeps
the file and its progress and sends the rest later (the outage is the store's ``StoreUnavailable`` raised for
the first chunks it is handed). A small upload of one huge line: refused without holding the line. Real
collector, real HTTP, the real uploader."""

from __future__ import annotations

import pytest

from device_agent.capture_upload import UploadError, send_file, write_upload
from edgekit.errors import StoreUnavailable
from tests.fleet_helpers import wait
from tests.test_field_samples import TOKEN, _header, _post, _row, _sha, quick_uploader
from tests.test_field_samples import collector as collector  # the real collector, with TOKEN


def _database_down_for(store, chunks: int) -> list[int]:
    """Make the store refuse its next ``chunks`` chunks as a database outage would; the count refused."""
    refused, add = [0], store.add_sample_chunk

    def add_or_fail(*args, **kwargs):
        if refused[0] < chunks:
            refused[0] += 1
            raise StoreUnavailable("PostgreSQL: the connection was lost", "it is retried")
        return add(*args, **kwargs)

    store.add_sample_chunk = add_or_fail
    return refused


@pytest.mark.network
def test_a_database_outage_answers_503_which_the_device_takes_for_a_cut_not_a_refusal(tmp_path, collector):
    upload = "u-outage1"
    collector.store.issue_upload(upload, "dev1", {}, 1.0)
    _database_down_for(collector.store, 1)
    file = write_upload(tmp_path / "f.gz", _header("dev1", upload, 10), [_row(n) for n in range(10)])
    with pytest.raises(UploadError) as raised:
        send_file(
            f"{collector.url}/api/samples/dev1/{upload}",
            tmp_path / "f.gz",
            size=file["size"],
            sha256=file["sha256"],
            token=TOKEN,
            attempts=1,
        )
    assert raised.value.code == "network" and "503" in str(raised.value)
    assert collector.store.sample_upload(upload)["state"] in ("requested", "receiving")


@pytest.mark.network
def test_an_upload_cut_by_a_database_outage_keeps_its_file_and_completes_when_it_is_back(tmp_path, collector):
    rows, upload, chunk = [_row(n) for n in range(2000)], "u-outage2", 32 << 10
    collector.store.issue_upload(upload, "dev1", {}, 1.0)
    uploader, capture, stop = quick_uploader(tmp_path, collector.url, chunk)
    uploader.build = lambda doc: write_upload(
        uploader.directory / f"{upload}.gz", _header("dev1", upload, len(rows)), rows
    )
    refused = _database_down_for(collector.store, 2)
    try:
        uploader.on_command({"upload": upload, "url": f"{collector.url}/api/samples/dev1/{upload}"})
        wait(lambda: capture.uploads["done"] == 1 or capture.uploads["refused"], what="the upload to end")
    finally:
        stop.set()
    assert refused[0] == 2 and capture.uploads["refused"] == 0 and capture.uploads["failed"] >= 1
    stored = collector.store.sample_upload(upload)
    assert stored["state"] == "complete" and stored["rows"] == 2000


@pytest.mark.network
def test_one_huge_line_is_refused_without_being_held(tmp_path, collector):
    """64 MiB of one row gzip to 64 KiB: finishing the upload must not hold the line (nor parse it) whole."""
    import gzip
    import json
    import tracemalloc

    from edgekit.fleet.samples import MAX_LINE_BYTES

    upload = "u-long"
    header = json.dumps(_header("dev1", upload, 1)).encode()
    body = gzip.compress(header + b"\n" + b'{"id": "x", "input": ["' + b"a" * (64 << 20) + b'"]}\n')
    assert len(body) < 1 << 20
    collector.store.issue_upload(upload, "dev1", {}, 1.0)
    tracemalloc.start()
    try:
        status, error = _post(f"{collector.url}/api/samples/dev1/{upload}", body, 0, len(body), _sha(body))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_LINE_BYTES, f"refusing a {len(body) >> 10} KiB upload took {peak >> 20} MiB"
    assert status == 400 and f"a line runs past {MAX_LINE_BYTES} bytes" in error
    assert collector.store.sample_upload(upload)["state"] == "failed"


@pytest.mark.network
def test_operator_routes_answer_503_with_retry_after_while_the_store_is_out(collector):
    """Not a 400 (the request was fine) and not a 404 for a rollout the store could not be asked about."""
    import json
    import urllib.error
    import urllib.request

    def down(*args, **kwargs):
        raise StoreUnavailable("PostgreSQL: the connection was lost", "it is retried")

    collector.store.rollout = down
    collector.store.running_rollouts = down
    collector.store.rollout_ids = down
    for path in ("/api/rollouts/r-1", "/api/rollouts"):
        request = urllib.request.Request(f"{collector.url}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 503, (path, raised.value.code)
        assert raised.value.headers["Retry-After"] == "5"
        assert "store is unavailable" in json.loads(raised.value.read())["error"]


def test_the_served_list_of_an_older_agent_is_moved_not_served_as_an_upload(tmp_path):
    """Agents before ``served.list`` kept the served ids in ``uploads/done.json``, a name the start-up scan
    takes for an upload's state: it is moved into the new list, and its ids stay served."""
    import json

    from device_agent.capture_upload import SERVED_FILE

    uploads = tmp_path / "capture" / "uploads"
    uploads.mkdir(parents=True)
    (uploads / "done.json").write_text(json.dumps(["u-old1", "u-old2"]))
    uploader, capture, stop = quick_uploader(tmp_path, "http://127.0.0.1:9/", 1024)
    stop.set()
    assert not (uploads / "done.json").exists()
    assert json.loads((uploads / SERVED_FILE).read_text()) == ["u-old1", "u-old2"]
    assert uploader._queue.empty()  # nothing taken for a command
    assert uploader.serve({"upload": "u-old2", "url": "http://127.0.0.1:9/api/samples/dev1/u-old2"}) == 0
    assert capture.uploads == {"done": 0, "failed": 0, "refused": 0}
