"""A tensor model across the fleet: drift on an image model's signals, from an agent's HTTP requests
through a real Mosquitto to the collector's store, alerts, fleet drift page and device page.

The digits CNN bundle's baseline is its PNG folder sketched as tensor signals (``x.c0.values`` with 64
values an example, ``x.c0.mean``, ``x.c0.std``, ``x.saturated``, ``x.sharpness``, ``embedding.0``..7:
``device_agent.tensor_signals``). A gray image has one channel, so its brightness is ``x.c0.mean``
(there is no ``x.brightness`` to sketch twice).
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

from device_agent.agent import Agent
from edgekit.fleet.alerts import AlertRules, AlertSinks
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.merge import device_columns
from edgekit.fleet.service import FleetService
from tests.agent_helpers import config_of, make_device
from tests.fleet_helpers import wait

WINDOW = 300
BRIGHTER = 1.3
# The image signals an over-exposure moves: the brightness of a gray image (its channel's mean), its
# contrast (std: the clipped whites no longer spread), the share of saturated pixels, and the sharpness.
BRIGHTNESS = {"x.c0.mean", "x.c0.std", "x.saturated", "x.sharpness"}


def pngs(folder, count: int, *, gain: float = 1.0) -> list[dict]:
    """The first ``count`` digit PNGs (cycling), as ``{"b64": ...}`` items; ``gain`` scales each pixel
    (clipped to 255) as an over-exposed camera would."""
    files = sorted(folder.glob("*.png"))
    items = []
    for index in range(count):
        data = files[index % len(files)].read_bytes()
        if gain != 1.0:
            pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
            buffer = io.BytesIO()
            Image.fromarray(np.clip(np.round(pixels * gain), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
            data = buffer.getvalue()
        items.append({"b64": base64.b64encode(data).decode()})
    return items


def post(port: int, items: list[dict]) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/cam:predict",
        data=json.dumps({"instances": items}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


@pytest.mark.network
def test_brighter_images_drift_on_brightness_signals_and_alert(tmp_path, digits_cnn, keypair, broker, fleet_name):
    """300 digit PNGs as in the baseline, then 300 over-exposed PNGs (pixels x 1.3, clipped to 255) and
    300 over-exposed tensors (x 1.3, not clipped: past the baseline's range): the collector stores three
    windows, the clean one with no drift, the bright ones drifted on the brightness signals; a drift
    alert opens on two consecutive windows; the out-of-range share of the 64-values-an-image sketch is a
    share of its values; the fleet drift page and the device page name the tensor sketches."""
    collector = FleetService(
        CollectorConfig(
            broker=broker.url, db=str(tmp_path / "fleet.db"), http="127.0.0.1:0", client_id=f"c-{fleet_name}"
        ),
        alert_rules=AlertRules(drift_windows=2),
        alert_sinks=AlertSinks(log=False),
    ).start()
    config = make_device(
        tmp_path / "dev", digits_cnn.bundle, keypair[1], device_id="cam-dev", fleet=fleet_name, broker=broker.url,
        window_rows=WINDOW, window_seconds=3600,
    )  # fmt: skip
    bright_tensors = np.load(digits_cnn.test)["X"][:WINDOW] * BRIGHTER
    store = collector.store
    try:
        with Agent(config_of(config)).start() as agent:
            port = agent.server.server_address[1]
            assert len(post(port, pngs(digits_cnn.images, WINDOW))["predictions"]) == WINDOW
            assert len(post(port, pngs(digits_cnn.images, WINDOW, gain=BRIGHTER))["predictions"]) == WINDOW
            assert len(post(port, bright_tensors.tolist())["predictions"]) == WINDOW
            wait(lambda: sum(d["windows"] for d in store.status()) >= 3, what="3 windows stored")
            # the collector's own alert pass, on the device with news: nobody calls evaluate() here
            wait(lambda: ("drift", "x.c0.mean") in _open_alerts(store), what="the drift alert on x.c0.mean")
        _check_windows(store)
        _check_alerts(store)
        _check_quality(store, bright_tensors)
        _check_pages(collector.server.server_address[1])
    finally:
        collector.stop()


def _open_alerts(store):
    return {(a["rule"], a["subject"]): a for a in store.alerts(open_only=True)}


def _drifted(summary) -> set[str]:
    return {name for name, verdict in summary["drift"]["features"].items() if verdict.get("drifted")}


def _check_windows(store):
    clean, clipped, tensors = sorted(store.summaries(device="cam-dev"), key=lambda s: s["seq"])[:3]
    assert [s["rows"] for s in (clean, clipped, tensors)] == [WINDOW] * 3
    assert clean["drift"]["drifted"] is False and _drifted(clean) == set()
    assert all(v["psi"] < 0.05 for v in clean["drift"]["features"].values()), clean["drift"]
    assert BRIGHTNESS <= _drifted(clipped) and BRIGHTNESS <= _drifted(tensors)
    assert clipped["drift"]["drifted"] is True and tensors["drift"]["drifted"] is True
    # The element histogram counts one observation an image (drift.py): clipped, most digit pixels stay 0 or
    # 255 and it moves too little to flag on 300 images; past the baseline's maximum, its overflow bin does.
    values = [s["drift"]["features"]["x.c0.values"]["psi"] for s in (clean, clipped, tensors)]
    assert values[0] < 0.01 < values[1] < values[2] and "x.c0.values" in _drifted(tensors), values


def _check_alerts(store):
    alerts = _open_alerts(store)
    assert {("drift", name) for name in BRIGHTNESS} <= set(alerts)
    mean = alerts[("drift", "x.c0.mean")]
    first = min(s["seq"] for s in store.summaries(device="cam-dev"))  # the spool's base: numbered from the clock
    assert mean["device"] == "cam-dev" and mean["evidence"]["seqs"] == [first + 2, first + 1]
    assert min(mean["evidence"]["psi"]) > 1


def _check_quality(store, bright_tensors):
    """Out of range: a share of the sketch's values (64 an image here), never more than all of them."""
    summaries = list(store.summaries(device="cam-dev"))
    quality = device_columns(store, summaries)["quality"]
    past = float(np.count_nonzero(bright_tensors > 1.0)) / (3 * WINDOW * bright_tensors[0].size)
    assert quality["x.c0.values"]["out_of_range_rate"] == pytest.approx(past, abs=0.005)
    assert all(0 <= share <= 1 for shares in quality.values() for share in shares.values()), quality


def _check_pages(port):
    drift_page, device_page = get(port, "/drift"), get(port, "/devices/cam-dev")
    assert "cam v1: 3 windows, 900 rows, 1 device(s)" in drift_page
    assert "merged verdict: <b class='bad'>drifted" in drift_page
    for name in ("x.c0.mean", "x.c0.std", "x.sharpness", "embedding.0"):
        assert f"feature={name}'>{name}</a>" in drift_page, name
    assert "aria-label='distribution of x.c0." in drift_page  # the worst feature's bins against the baseline
    values = get(port, "/drift?model=cam&version=1&feature=x.c0.values")  # 64 values an image, drawn as shares
    assert "aria-label='distribution of x.c0.values'" in values and "above baseline max" in values
    latest = device_page.split("<h2>Latest window</h2>")[1].split("</table>")[0]
    for name in ("x.c0.values", "x.c0.mean", "x.sharpness", "x.saturated", "embedding.0"):
        assert f"<td>{name}</td>" in latest, name
    assert "<td>x.c0.mean</td><td>" in latest and "aria-label='drift per feature'" in device_page
    assert "<td>x.c0.values</td><td>numeric</td>" in device_page.split("Data quality per column")[1]


def test_the_device_page_judges_by_the_last_tested_window():
    """An agent closes a small window on shutdown: PSIs but no verdict. The table shows the last window
    that was tested, and says why, instead of a PSI of 16 marked 'no'."""
    from edgekit.fleet.pages.device import render_device

    def window(seq, rows, tested, drifted):
        features = {"x.c0.mean": {"psi": 16.0, "ks": 1.0, "js": 0.9, **({"drifted": True} if drifted else {})}}
        return {
            "seq": seq, "rows": rows, "model": {"name": "cam", "version": 1},
            "window": {"start": "2026-12-02T00:00:00Z", "end": f"2026-12-02T00:00:0{seq}Z"},
            "drift": {"tested": tested, "drifted": drifted, "features": features},
        }  # fmt: skip

    page = render_device("cam-00", [window(1, 200, True, True), window(2, 64, False, False)]).decode()
    assert "the last window (64 rows) was too small for a drift verdict; this is window 1 (200 rows)" in page
    assert "<td class='bad'>yes</td>" in page.split("Latest window")[1]
