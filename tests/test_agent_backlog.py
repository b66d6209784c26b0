"""Stopping with a large monitoring backlog, and the backlog's bound.

Stop must not sketch minutes of queued rows, nor close the prediction log under the background
thread; rows that are served but never sketched are counted (``unmonitored_rows``), never dropped
silently: predicted = sketched + unmonitored.
"""

import logging
import time
from dataclasses import replace

import numpy as np

from device_agent import Agent
from device_agent.monitor import Monitor
from tests.agent_helpers import config_of, make_device


def _agent(tmp_path, bundle, keypair, *, window_rows=50, backlog_rows=None):
    config = config_of(make_device(tmp_path / "dev", bundle, keypair[1], window_rows=window_rows, http=False))
    if backlog_rows is not None:
        config = replace(config, monitor=replace(config.monitor, backlog_rows=backlog_rows))
    return Agent(config).start(http=False, mqtt=False)


def _rows(digits, n):
    X = np.load(digits.test)["X"]
    return np.tile(X, (n // len(X) + 1, 1))[:n]


def _accounted(agent, predicted):
    sketched, unmonitored = agent.stats["predictions"], agent.stats["unmonitored_rows"]
    assert sketched + unmonitored == predicted, (sketched, unmonitored, predicted)
    return sketched, unmonitored


def test_stop_with_a_large_backlog_is_quick_clean_and_counts_what_was_not_sketched(
    tmp_path, bundle, keypair, digits, caplog
):
    caplog.set_level(logging.WARNING)
    agent = _agent(tmp_path, bundle, keypair, window_rows=50)
    caplog.clear()  # the start's warning that 50-row windows are below min_rows is expected; stopping must add none
    X = _rows(digits, 20_000)
    predicted = 0
    for _ in range(15):  # 300,000 rows in 15 requests: thousands of 50-row windows queued
        agent.predict(X)
        predicted += len(X)
    status = agent.status()
    start = time.monotonic()
    agent.stop()
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"stop took {elapsed:.1f} s"
    # This agent runs no reporter: a reporter warning comes from another test's agent in this worker process.
    ours = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "device_agent.reporter"]
    assert not ours, [r.getMessage() for r in ours]
    assert agent._thread is None  # joined
    assert status["unmonitored_rows"] > 0  # before stop: the excess over the backlog bound
    sketched, unmonitored = _accounted(agent, predicted)
    assert unmonitored > 0 and agent.last_summary["unmonitored_rows"] > 0  # the closing window says so
    assert agent.monitor.unmonitored_rows == unmonitored
    assert agent.status()["unmonitored_rows"] == unmonitored


def test_backlog_is_bounded_by_rows_and_the_excess_is_counted(tmp_path, bundle, keypair, digits):
    agent = _agent(tmp_path, bundle, keypair, window_rows=50, backlog_rows=1000)
    monitor = agent.monitor
    assert monitor.backlog_rows == 1000
    predicted = 0
    try:
        for n in (300, 300, 300, 5000, 300):
            result = agent.predict(_rows(digits, n))  # serving goes on whatever the backlog
            assert len(result.ids) == n
            predicted += n
            assert monitor.backlog <= 1000
        assert monitor.unmonitored_rows >= predicted - 1000 - agent.stats["predictions"] - 50
        assert (
            agent.status()["unmonitored_rows"]
            == agent.stats["unmonitored_rows"] + monitor.current()["unmonitored_rows"]
        )
        from device_agent.metrics import render_metrics

        exposed = next(
            line for line in render_metrics(agent).splitlines() if line.startswith("edgekit_unmonitored_rows_total{")
        )
        assert float(exposed.rsplit(" ", 1)[1]) == agent.status()["unmonitored_rows"] > 0  # /metrics says it too
    finally:
        agent.stop()
    _accounted(agent, predicted)
    assert agent.stats["unmonitored_rows"] == monitor.unmonitored_rows > 0


def test_monitor_bound_keeps_a_copy_of_the_rows_it_takes_and_counts_the_rest(tmp_path, bundle, keypair, digits):
    agent = _agent(tmp_path, bundle, keypair)
    try:
        serving = agent.serving
        X = serving.schema.check(_rows(digits, 5000), source="test")
        prediction = serving.spec.interpret(serving.runtime.predict(X))
    finally:
        agent.stop()
    windows = []
    monitor = Monitor(serving.baseline, 50, 3600, windows.append, backlog_rows=1000)
    monitor.record(X[:600], _head(prediction, 600), 0.01)
    monitor.record(X, prediction, 0.01)  # 400 of 5000 fit
    monitor.record(X[:10], _head(prediction, 10), 0.01)  # full: counted
    assert monitor.backlog == 1000 and monitor.unmonitored_rows == 4610
    kept = monitor._pending[1].rows
    assert len(kept) == 400 and kept.base is None  # a copy: the 5000-row request can be freed
    assert monitor.process() == 20 and monitor.backlog == 0
    monitor.record(X[:30], _head(prediction, 30), 0.01)
    monitor.stop()
    monitor.record(X[:5], _head(prediction, 5), 0.01)
    last = monitor.flush()
    assert sum(w.rows for w in windows) == 1000
    assert sum(w.unmonitored for w in windows) == monitor.unmonitored_rows == 4610 + 35
    assert last is windows[-1] and last.rows == 0 and last.unmonitored == 35


def _head(prediction, n):
    from device_agent.outputs import Prediction

    def cut(a):
        return None if a is None else a[:n]

    return Prediction(
        labels=cut(prediction.labels), probabilities=cut(prediction.probabilities), values=cut(prediction.values)
    )
