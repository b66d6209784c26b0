"""The agent's threads against each other, with a real model (onnxruntime), real HTTP and the real background
thread: request threads answering, the background thread sketching and closing windows, a scraper reading
/metrics, and a hot swap while a request is still running."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import replace

import numpy as np

from device_agent import Agent
from tests.agent_helpers import config_of, make_device
from tests.fleet_helpers import wait

COUNTERS = ("edgekit_unmonitored_rows_total", "edgekit_sampled_out_rows_total")


def _rows(digits, n):
    X = np.load(digits.test)["X"]
    return np.tile(X, (n // len(X) + 1, 1))[:n]


def _counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in COUNTERS:
            found[name] = float(line.rsplit(" ", 1)[1])
    return found


def test_metrics_counters_never_go_backwards_while_windows_close(tmp_path, bundle, keypair, digits):
    """Prometheus reads a counter that goes down as a restart and counts its whole value again: one dip of a
    million-row total is a spike of a million rows in ``rate()``. The totals are the closed windows' plus the
    open window's, and the background thread moves rows from one to the other (and through the sample's carry)
    in several steps: a scrape between two of them read fewer rows than the scrape before."""
    config = config_of(
        make_device(tmp_path / "dev", bundle, keypair[1], window_rows=100, max_cpu_fraction=0.002, http=True)
    )
    config = replace(config, monitor=replace(config.monitor, backlog_rows=3000))  # some rows go unmonitored
    agent = Agent(config).start(mqtt=False)
    url = f"http://127.0.0.1:{agent.server.server_address[1]}/metrics"
    X = _rows(digits, 1000)
    stop = threading.Event()
    seen: dict[str, list[float]] = {name: [] for name in COUNTERS}
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            while not stop.is_set():
                agent.predict(X)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    def scrape() -> None:
        try:
            while not stop.is_set():
                for name, value in _counters(url).items():
                    seen[name].append(value)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(2)] + [threading.Thread(target=scrape)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(4.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        agent.stop()
    assert not failures, failures
    for name, values in seen.items():
        assert len(values) > 20 and values[-1] > 0, (name, len(values), values[-1:])  # the race was exercised
        dips = [(a, b) for a, b in zip(values, values[1:], strict=False) if b < a]
        assert not dips, f"{name} went down {len(dips)} times in {len(values)} scrapes, e.g. {dips[:3]}"


def test_a_request_still_running_at_a_hot_swap_is_counted_in_the_old_models_windows(tmp_path, bundle, keypair, digits):
    """A request that took the old model before a swap and finishes after it hands its rows to the old model's
    monitor. Its last window was closed a fixed second after the swap, whatever was still running: a request
    slower than that (a batch of images on a Pi takes seconds) handed its rows to a monitor nobody would close
    again, and they were in no window, not even counted as unmonitored. The old model's slowness is played by
    holding its (real) onnxruntime call until the swap's grace has passed."""
    from device_agent.runtimes import open_runtime

    config = config_of(make_device(tmp_path / "dev", bundle, keypair[1], window_rows=200, http=False))
    agent = Agent(config).start(http=False, mqtt=False)
    old = agent.serving
    entered, release = threading.Event(), threading.Event()
    run = old._run_matrix
    assert run is not None  # the digits model takes the runtime's bound call

    def slow_run(X):
        entered.set()
        release.wait(30)
        return run(X)

    old._run_matrix = slow_run
    X = _rows(digits, 50)
    answered: list = []
    request = threading.Thread(target=lambda: answered.append(agent.predict(X)))
    try:
        request.start()
        assert entered.wait(30)
        bundle_now = old.bundle
        new = agent.serving_for(
            bundle_now, open_runtime(bundle_now.model_format, bundle_now.model_bytes, source=bundle_now.path)
        )
        agent.swap(new)
        deadline = time.monotonic() + 3.0  # the grace (1 s) and a few background passes
        while time.monotonic() < deadline:
            time.sleep(0.1)
        release.set()
        request.join(30)
        assert answered and answered[0].model_version == old.model_info["version"]
        for _ in range(3):
            agent.predict(X)  # the new model's rows
        time.sleep(1.5)  # the background thread's passes after the request ended
    finally:
        release.set()
        agent.stop()
    served = agent.rows_served
    assert served == 4 * len(X)
    windows = agent.stats["predictions"] + agent.stats["unmonitored_rows"]
    assert windows == served, f"{served - windows} of {served} rows are in no window"
    assert old.monitor.backlog == 0


def test_requests_answered_just_before_stop_reach_the_prediction_log(tmp_path, bundle, keypair, digits):
    """Answered requests wait in a queue for the background thread to hand them to the log (every 0.1 s).
    ``stop`` joins that thread and closes the log: the requests of its last tenth of a second were answered,
    with ids, and never logged (prediction 0 is always one of the sampled rows)."""
    import sqlite3

    X = _rows(digits, 5)
    lost = 0
    for attempt in range(3):
        root = tmp_path / f"dev{attempt}"
        agent = Agent(config_of(make_device(root, bundle, keypair[1], http=False))).start(http=False, mqtt=False)
        try:
            first = agent.predict(X).ids[0]
        finally:
            agent.stop()
        with sqlite3.connect(root / "state" / "predictions.db") as db:
            logged = {f"{boot}-{n}" for boot, n in db.execute("SELECT boot, n FROM predictions")}
        lost += first not in logged
    assert lost == 0, f"the first prediction was not logged in {lost} of 3 runs"


def test_a_label_for_an_answer_of_the_model_swapped_out_is_not_credited_to_the_new_one(
    tmp_path, bundle, v4_bundle, keypair, digits
):
    """Delayed labels arrive long after the answer: a label for an answer v3 gave, arriving after a hot swap
    to v4, was counted in v4's window accuracy, so an A/B split decided on delayed labels compared v3 with
    itself for as long as the labels took. It counts in v3's last window when that is still open, else in
    none (the label is still kept in the prediction log)."""
    from device_agent.bundle import read_bundle
    from device_agent.runtimes import open_runtime
    from device_agent.signing import load_public_key

    config = config_of(make_device(tmp_path / "dev", bundle, keypair[1], window_rows=1000, http=False))
    agent = Agent(config).start(http=False, mqtt=False)
    X = _rows(digits, 20)
    y = np.load(digits.test)["y"][:20]
    try:
        before = agent.predict(X)  # v3's answers
        newer = read_bundle(v4_bundle, load_public_key(keypair[1]))
        close_retired = agent._close_retired
        agent._close_retired = lambda: close_retired(grace=600)  # v3's last window stays open however slow this is
        agent.swap(agent.serving_for(newer, open_runtime(newer.model_format, newer.model_bytes, source=newer.path)))
        labels = {i: int(label) for i, label in zip(before.ids, y, strict=True)}
        early = before.ids[:5]  # within the swap's grace: v3's last window is still open
        assert [agent.feedback(i, labels[i]) for i in early] == ["accepted"] * len(early)
        agent._close_retired = lambda: close_retired(grace=0.0)
        wait(lambda: not agent._retired, what="v3's last window closed")
        after = agent.predict(X)  # v4's answers
        labels.update({i: int(label) for i, label in zip(after.ids, y, strict=True)})
        late = before.ids[5:] + after.ids
        assert [agent.feedback(i, labels[i]) for i in late] == ["accepted"] * len(late)
    finally:
        agent.stop()
    labelled: dict[int, int] = {}
    for seq in agent.spool.pending():
        summary = json.loads(agent.spool.get(seq))
        accuracy = summary.get("accuracy") or {}
        version = summary["model"]["version"]
        labelled[version] = labelled.get(version, 0) + accuracy.get("labelled", 0)
    assert labelled.get(4) == len(X), labelled  # v4's own answers only
    assert labelled.get(3) == 5, labelled  # in v3's last window while it was open; after that, nowhere
