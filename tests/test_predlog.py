"""Delayed labels find their prediction: every recent id, not only the rows the debug log samples."""

import threading

import numpy as np

from device_agent import Agent
from device_agent.predlog import PredictionLog
from tests.agent_helpers import config_of, make_device


def _log(tmp_path, **options) -> PredictionLog:
    return PredictionLog(str(tmp_path / "predictions.db"), **options)


def test_every_recent_id_takes_feedback_though_one_row_in_100_is_logged(tmp_path):
    log = _log(tmp_path, capacity=1000, sample_every=100)
    for first in range(0, 500, 5):  # 100 small requests
        log.add("boot", first, np.zeros((5, 2)), np.arange(first, first + 5) % 3)
    log.flush()
    assert log.count() == 5  # sampled: rows 0, 100, 200, 300, 400
    assert [log.label("boot", "boot", n, 0)[0] for n in (1, 2, 99, 499)] == ["accepted"] * 4
    assert log.label("boot", "boot", 1, 0) == ("duplicate", 1)
    log.close()


def test_unknown_means_another_run_or_older_than_the_ring(tmp_path):
    log = _log(tmp_path, capacity=100, sample_every=100)
    log.add("boot", 0, np.zeros((250, 2)), np.zeros(250, dtype=int))
    assert log.label("boot", "boot", 149, 0)[0] == "unknown"  # 100 newer predictions since
    assert log.label("boot", "boot", 150, 0)[0] == "accepted"
    assert log.label("earlier-boot", "boot", 200, 0)[0] == "unknown"  # the agent restarted since
    assert log.label("boot", "boot", 250, 0)[0] == "unknown"  # never answered
    log.close()


def test_feedback_waits_for_a_batch_the_background_flush_holds(tmp_path, monkeypatch):
    """The background thread takes requests off the queue before filing them; a label arriving in
    between used to find neither the queue nor the ring and answered "unknown"."""
    log = _log(tmp_path, capacity=100)
    log.add("boot", 0, np.zeros((3, 2)), np.array([1, 2, 0]))
    taken, real_put = threading.Event(), log.recent.put

    def slow_put(numbers, answers):
        taken.set()
        threading.Event().wait(0.3)
        real_put(numbers, answers)

    monkeypatch.setattr(log.recent, "put", slow_put)
    background = threading.Thread(target=log.flush)
    background.start()
    assert taken.wait(5)
    assert log.label("boot", "boot", 2, 0) == ("accepted", 0)
    background.join()
    log.close()


def test_feedback_on_the_first_of_many_predictions_through_the_agent(tmp_path, bundle, keypair, digits):
    X, y = np.load(digits.test)["X"], np.load(digits.test)["y"]
    with Agent(config_of(make_device(tmp_path / "dev", bundle, keypair[1], http=False))).start(http=False) as agent:
        ids = [agent.predict(X[i : i + 1]).ids[0] for i in range(300)]
        assert [agent.feedback(ids[i], int(y[i])) for i in (0, 1, 150, 299)] == ["accepted"] * 4
        assert agent.log.count() < 10  # the SQLite log sampled a few rows; the answer did not depend on it


def test_the_log_keeps_a_trickle_not_a_share_of_heavy_traffic(tmp_path, monkeypatch):
    """One row in 100, but no more than ``max_per_second`` rows a second: at a thousand rows a millisecond
    the log would otherwise cost as much as the model."""
    clock = [1000.0]
    monkeypatch.setattr("device_agent.predlog.time.time", lambda: clock[0])
    log = _log(tmp_path, capacity=10_000, sample_every=100, max_per_second=10)
    for first in range(0, 20_000, 1000):  # 200 candidates in one instant
        log.add("boot", first, np.zeros((1000, 2)), np.zeros(1000, dtype=int))
    log.flush()
    assert log.count() == 10
    clock[0] += 0.5  # half a second: half the bucket back
    log.add("boot", 20_000, np.zeros((1000, 2)), np.zeros(1000, dtype=int))
    log.flush()
    assert log.count() == 15
    assert log.label("boot", "boot", 12_345, 1)[0] == "accepted"  # every id still takes feedback
    log.close()
