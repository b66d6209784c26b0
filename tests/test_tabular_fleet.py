"""A typed tabular model across the fleet: categorical drift and unseen categories, from an agent's
HTTP requests through a real Mosquitto to the collector's store, alerts and device page."""

import csv
import json
import re
import shutil
import struct
import subprocess
import urllib.request
import zlib

import pytest

from device_agent.agent import Agent
from edgekit.fleet.alerts import AlertRules, AlertSinks
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.ingest import Ingestor, Message
from edgekit.fleet.merge import device_columns, merged_drift
from edgekit.fleet.pages.columns import UNSEEN_COLOR
from edgekit.fleet.pages.device import render_device
from edgekit.fleet.pages.drift import render_fleet_drift
from edgekit.fleet.service import FleetService
from edgekit.fleet.store import SqliteStore
from tests.agent_helpers import config_of, make_device
from tests.fleet_helpers import wait
from tests.tabular_helpers import typed_baseline, typed_baseline_message, typed_summary

CATEGORICAL = ("country", "plan", "payment")


def churn_rows(path, first, count, *, moved=False):
    """Rows of the churn CSV as request objects (NaN and empty strings sent as null). ``moved``: every
    customer in IN is now in BR (a fifth of the rows change category), every tenth row's country is XX."""
    with open(path, newline="") as handle:
        records = list(csv.DictReader(handle))[first : first + count]
    rows = []
    for index, record in enumerate(records):
        record.pop("label")
        row = {k: (v or None) if k in CATEGORICAL else (float(v) if v else None) for k, v in record.items()}
        if moved:
            row["country"] = "XX" if index % 10 == 0 else "BR" if row["country"] == "IN" else row["country"]
        rows.append(row)
    return rows


def post(port, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/churn:predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_device_page_draws_categories_against_the_baseline_and_quality_per_column():
    """Per categorical column, a pair of bars (baseline, recent) per category and for other, unseen and
    missing; a table of each column's shares; and /drift draws a categorical feature the same way."""
    store = SqliteStore(":memory:")
    base = typed_baseline()
    messages = [typed_baseline_message(base, "d1")] + [
        typed_summary(base, "d1", s, shift=0.5, unseen=0.1, missing=0.2) for s in (1, 2)
    ]
    Ingestor(store).handle([Message(topic, payload, 1.7e9) for topic, payload in messages])
    summaries = list(store.summaries(device="d1"))
    columns = device_columns(store, summaries)
    page = render_device("d1", summaries, columns).decode()
    country = page.split("aria-label='categories of country'")[1].split("</svg>")[0]
    assert "<svg" in page.split("categories of country")[0] and "aria-label='categories of plan'" in page
    assert all(f">{label}</text>" in country for label in ("IN", "BR", "other", "unseen", "missing"))
    assert country.count("<rect") == 2 * (len(base.features[1].categories) + 3)  # baseline and recent, per part
    assert f"fill='{UNSEEN_COLOR}'><title>unseen: recent" in country
    quality = page.split("Data quality per column")[1]
    plan, unseen = columns["quality"]["plan"]["null_rate"], columns["quality"]["country"]["unseen_rate"]
    assert "last 2 windows, 1,000 rows" in quality and 0.15 < plan < 0.25 and 0.07 < unseen < 0.13
    assert f"<td>plan</td><td>categorical</td><td>{plan:.2%}</td><td>0.00%</td>" in quality
    assert f"<td>country</td><td>categorical</td><td>0.00%</td><td>{unseen:.2%}</td>" in quality
    fleet_drift = render_fleet_drift(merged_drift(store), "country").decode()
    assert "aria-label='categories of country'" in fleet_drift and "below baseline min" not in fleet_drift
    store.close()


def test_the_device_page_reads_version_1_windows_and_says_when_it_has_no_baseline():
    """A version-1 window's categorical sketch has no unseen count: with a baseline whose categories
    are its whole vocabulary, "other" is all unseen, and the page draws it so."""
    store, base = SqliteStore(":memory:"), typed_baseline()
    summary = json.loads(typed_summary(base, "d1", 1, unseen=0.1)[1])
    page = render_device("d1", [summary], device_columns(store, [summary])).decode()
    assert "no device has published the baseline of these windows yet" in page and "<h2>Data quality" not in page
    Ingestor(store).handle([Message(*typed_baseline_message(base, "d1"), 1.7e9)])
    v2 = device_columns(store, [summary])
    summary["schema"] = "edgekit.summary/1"
    summary["profile"]["features"][1:] = [sketch[:2] for sketch in summary["profile"]["features"][1:]]
    v1 = device_columns(store, [summary])
    assert v1["categories"] == v2["categories"] and v1["quality"] == v2["quality"]
    assert v1["quality"]["country"]["unseen_rate"] == pytest.approx(0.1, abs=0.03)
    store.close()


@pytest.mark.network
def test_categorical_drift_and_unseen_values_reach_the_collector_and_alert(
    tmp_path, churn, keypair, broker, fleet_name
):
    """500 rows as in training, then 1,000 where IN became BR and a tenth of the countries are XX: the
    collector stores windows with country drifted and a 10 % unseen rate, the unseen_rate alert opens
    on country, and the device page draws the country bars (checked in Chromium's pixels too)."""
    collector = FleetService(
        CollectorConfig(
            broker=broker.url, db=str(tmp_path / "fleet.db"), http="127.0.0.1:0", client_id=f"c-{fleet_name}"
        ),
        alert_rules=AlertRules(unseen_rate_max=0.05),
        alert_sinks=AlertSinks(log=False),
    ).start()
    config = make_device(
        tmp_path / "dev", churn.bundle, keypair[1], device_id="churn-dev", fleet=fleet_name, broker=broker.url,
        window_rows=500, window_seconds=3600,
    )  # fmt: skip
    store = collector.store
    try:
        with Agent(config_of(config)).start() as agent:
            port = agent.server.server_address[1]
            assert len(post(port, {"instances": churn_rows(churn.test_csv, 0, 500)})["predictions"]) == 500
            moved = churn_rows(churn.test_csv, 500, 1000, moved=True)
            post(port, {"instances": moved[:500]})
            columnar = {name: [row[name] for row in moved[500:]] for name in moved[0]}
            assert len(post(port, {"inputs": columnar})["predictions"]) == 500
            wait(lambda: sum(d["windows"] for d in store.status()) >= 3, what="3 windows stored")
            # the collector's own alert pass, on the device with news: nobody calls evaluate() here
            wait(lambda: ("unseen_rate", "country") in _open_alerts(store), what="the unseen_rate alert")
        _check_stored_windows(store)
        alert = _open_alerts(store)[("unseen_rate", "country")]
        assert alert["device"] == "churn-dev" and alert["evidence"]["unseen_rate"] == pytest.approx(0.1, abs=0.02)
        _check_device_page(collector.server.server_address[1], tmp_path)
    finally:
        collector.stop()


def _open_alerts(store):
    return {(a["rule"], a["subject"]): a for a in store.alerts(open_only=True)}


def _check_stored_windows(store):
    summaries = sorted(store.summaries(device="churn-dev"), key=lambda s: s["seq"])
    assert [s["schema"] for s in summaries] == ["edgekit.summary/2"] * len(summaries) and len(summaries) >= 3
    first, last = summaries[0], summaries[-1]
    assert first["quality"]["unseen_rate"] == 0 and not first["drift"]["features"]["country"].get("drifted")
    assert last["drift"]["features"]["country"]["drifted"] is True
    assert last["quality"]["unseen_rate"] == pytest.approx(0.1, abs=0.02)
    assert last["profile"]["features"][7][2] == pytest.approx(50, abs=10)  # country: [counts, nulls, unseen]
    assert store.recent_facts("churn-dev", 1)[0]["unseen_columns"] == {
        "country": pytest.approx(last["quality"]["unseen_rate"], abs=1e-4)
    }
    assert store.baseline(last["profile"]["baseline_id"]) is not None  # the device published it: bars can be drawn


def _check_device_page(port, tmp_path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/devices/churn-dev", timeout=10) as response:
        page = response.read().decode()
    assert all(f"aria-label='categories of {name}'" in page for name in CATEGORICAL)
    assert ">unseen</text>" in page and "<td>country</td><td>categorical</td>" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # the HTML above is the contract; the pixels check that it draws
        return
    # The country chart as served, drawn alone at its own size: a small PNG, quick to read back.
    label = page.index("aria-label='categories of country'")
    chart = page[page.rindex("<svg", 0, label) : page.index("</svg>", label) + len("</svg>")]
    svg = tmp_path / "country.svg"
    svg.write_text(chart)
    width, height = re.search(r"width='(\d+)' height='(\d+)'", chart).groups()
    shot = tmp_path / "country.png"
    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={width},{height}",
            f"--screenshot={shot}", svg.as_uri(),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    colors = {name: tuple(bytes.fromhex(value[1:])) for name, value in (("unseen", UNSEEN_COLOR), ("base", "#bbbbbb"))}
    counts = _count_pixels(shot, set(colors.values()))
    assert counts[colors["unseen"]] > 50 and counts[colors["base"]] > 500, f"Chromium drew no bars: {counts}"


def _count_pixels(path, colors):
    """How many pixels have each of ``colors`` in an 8-bit RGB(A), non-interlaced PNG (what Chromium writes)."""
    data, chunks, offset = path.read_bytes(), [], 8
    width = height = channels = 0
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, mode = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and mode in (2, 6), f"unexpected PNG bit depth {depth} / colour type {mode}"
            channels = 3 if mode == 2 else 4
        elif kind == b"IDAT":
            chunks.append(body)
        offset += 12 + length
    raw, stride = zlib.decompress(b"".join(chunks)), width * channels
    previous, found = bytearray(stride), dict.fromkeys(colors, 0)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        _unfilter(kind, line, previous, channels)
        for x in range(0, stride, channels):
            pixel = tuple(line[x : x + 3])
            if pixel in found:
                found[pixel] += 1
        previous = line
    return found


def _unfilter(kind, line, previous, channels):
    for i in range(len(line)):
        left = line[i - channels] if i >= channels else 0
        up, corner = previous[i], previous[i - channels] if i >= channels else 0
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
