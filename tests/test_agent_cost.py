"""The agent's own cost: the CPU budget's sample, what it reports, and requests read without a float per value.

No test here times anything: the budget is driven with a fake clock and given costs, and the sample is
forced to a rate, so every verdict is deterministic (seeded data).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from device_agent import Agent
from device_agent.budget import MOST_EVERY, CpuBudget
from device_agent.config import parse_config
from device_agent.errors import ConfigError
from device_agent.instances import TooManyRows, numeric_instances
from device_agent.metrics import render_metrics
from device_agent.monitor import GATHER_ROWS, GATHER_SECONDS, Monitor
from device_agent.outputs import Prediction
from device_agent.profile import build_baseline
from device_agent.protocol import ProtocolError, build_summary, check_summary
from tests.agent_helpers import config_of, make_device


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_samples_when_sketching_outgrows_its_share_and_recovers() -> None:
    clock = FakeClock()
    budget = CpuBudget(0.1, clock=clock)
    clock.now = 0.05
    budget.spent(sketch_seconds=0.006, inference_seconds=0.02)  # 30 % of the inference time: 1 row in 4
    assert budget.every == 4 and budget.rate == 0.25
    clock.now = 0.1
    budget.spent(sketch_seconds=0.0015, inference_seconds=0.02)  # 7.5 % at that rate: inside the margin, kept
    assert budget.every == 4
    clock.now = 0.15
    budget.spent(sketch_seconds=0.0002, inference_seconds=0.02)  # far below: more rows again, twice as many a look
    assert budget.every == 2
    clock.now = 0.175
    budget.spent(sketch_seconds=0.0001, inference_seconds=0.02)
    assert budget.every == 1
    clock.now = 0.2
    budget.spent(sketch_seconds=100.0, inference_seconds=0.02)
    assert budget.every == MOST_EVERY  # never fewer than one row in a thousand
    budget.every, clock.now = 3, 0.25  # an odd step grows back to 2, not 1: at most twofold a look, rounded up
    budget.spent(sketch_seconds=0.0, inference_seconds=0.02)
    assert budget.every == 2


def test_budget_leaves_an_idle_device_alone_and_zero_turns_it_off() -> None:
    clock = FakeClock()
    budget = CpuBudget(0.1, clock=clock)
    clock.now = 2.0  # two seconds with 1 ms of inference: the allowance comes from a quarter of the wall time
    budget.spent(sketch_seconds=0.01, inference_seconds=0.001)
    assert budget.every == 1
    off = CpuBudget(0.0, clock=clock)
    clock.now = 4.0
    off.spent(sketch_seconds=10.0, inference_seconds=0.02)
    assert off.every == 1


def _baseline(rng: np.random.Generator, features: int = 16):
    return build_baseline(rng.normal(size=(20000, features)), [f"f{i}" for i in range(features)])


def test_monitor_sketches_the_rows_whose_id_the_sample_keeps_and_counts_the_rest() -> None:
    rng = np.random.default_rng(5)
    base = _baseline(rng, 4)
    windows: list = []
    monitor = Monitor(base, 100, 1e9, windows.append)
    monitor.budget.every = 4
    rows = rng.normal(size=(1000, 4)).astype(np.float32)
    served = 0
    for size in (1, 1, 1, 1, 3, 250, 743):  # one-row requests are kept or skipped whole
        monitor.record(rows[served : served + size], Prediction(values=np.zeros((size, 1))), 0.01, served)
        served += size
    assert monitor.backlog == 250
    monitor.process()
    assert len(windows) == 2 and all(w.rows == 100 for w in windows)
    assert [w.sampled_out for w in windows] == [300, 300]  # pro rata: three rows skipped for each one kept
    assert windows[0].sample_rate == 0.25
    kept = rows[::4]  # ids 0, 4, 8, ...: exactly those were sketched
    first = base.empty_like()
    first.update_inputs(kept[:100])
    np.testing.assert_array_equal(windows[0].profile.features[0].counts, first.features[0].counts)
    last = monitor.flush()
    assert last.rows == 50 and last.sampled_out == 150
    assert sum(w.rows + w.sampled_out + w.unmonitored for w in [*windows]) == served


def test_sampled_windows_keep_the_false_alarm_rate_and_detect_a_shift() -> None:
    """At one row in five, windows of 400 sketched rows: the family-wise test still holds its false
    alarms near its level, and a 0.5σ shift of one feature is still found (seeded: deterministic)."""
    rng = np.random.default_rng(20)
    base = _baseline(rng)
    verdicts: dict[str, list[bool]] = {}
    for kind in ("clean", "moved"):
        closed: list = []
        monitor = Monitor(base, 400, 1e9, closed.append, backlog_rows=10**6)
        monitor.budget.every = 5
        served = 0
        while len(closed) < 60:
            rows = rng.normal(size=(4000, 16)).astype(np.float32)
            if kind == "moved":
                rows[:, 3] += 0.5
            monitor.record(rows, Prediction(values=np.zeros((4000, 1))), 0.01, served)
            served += 4000
            monitor.process()
        assert all(w.rows == 400 and w.sample_rate == pytest.approx(0.2, abs=0.01) for w in closed)
        if kind == "clean":
            verdicts[kind] = [bool(w.drift["drifted"]) for w in closed[:60]]
        else:
            verdicts[kind] = [bool(w.drift["features"]["f3"]["drifted"]) for w in closed[:60]]
    assert sum(verdicts["clean"]) <= 2  # 60 windows at a family-wise level of 1 %
    assert sum(verdicts["moved"]) >= 57


def test_a_sampled_window_says_so_in_its_summary_and_the_collector_checks_it() -> None:
    rng = np.random.default_rng(2)
    base = _baseline(rng, 4)
    windows: list = []
    monitor = Monitor(base, 100, 1e9, windows.append)
    monitor.budget.every = 2
    monitor.record(rng.normal(size=(200, 4)).astype(np.float32), Prediction(values=np.zeros((200, 1))), 0.01, 0)
    monitor.process()
    summary = build_summary(windows[0], device="d1", fleet="f", model={"name": "m", "version": 1}, seq=1)
    assert summary["sampling"] == {"rate": 0.5, "skipped_rows": 100} and summary["rows"] == 100
    check_summary(json.loads(json.dumps(summary)))
    for bad in ({"rate": 0, "skipped_rows": 1}, {"rate": 0.5, "skipped_rows": -1}, {"rate": True, "skipped_rows": 1}):
        with pytest.raises(ProtocolError):
            check_summary({**summary, "sampling": bad})
    full: list = []
    plain = Monitor(base, 100, 1e9, full.append)
    plain.record(rng.normal(size=(100, 4)).astype(np.float32), Prediction(values=np.zeros((100, 1))), 0.01, 0)
    plain.process()
    assert "sampling" not in build_summary(full[0], device="d1", fleet="f", model={"name": "m", "version": 1}, seq=2)


def test_max_cpu_fraction_is_read_and_checked(tmp_path) -> None:
    base = {"device_id": "d", "state_dir": str(tmp_path), "trust": {"public_key": str(tmp_path / "k.pub")}}
    assert parse_config({**base}, base=tmp_path).monitor.max_cpu_fraction == 0.1
    assert parse_config({**base, "monitor": {"max_cpu_fraction": 0}}, base=tmp_path).monitor.max_cpu_fraction == 0
    with pytest.raises(ConfigError, match="max_cpu_fraction"):
        parse_config({**base, "monitor": {"max_cpu_fraction": -1}}, base=tmp_path)


def test_the_agent_reports_its_sample_rate_on_metrics_and_status(tmp_path, bundle, keypair) -> None:
    config = make_device(tmp_path / "dev", bundle, keypair[1], http=False, max_cpu_fraction=0.1)
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        agent.monitor.budget.every = 10
        with np.load("fixtures/digits_test.npz") as npz:
            X = npz["X"].astype(np.float32)
        for i in range(40):
            agent.predict(X[i : i + 1])
        status = agent.status()
        assert status["sample_rate"] == 0.1 and status["sampled_out_rows"] == 36
        text = render_metrics(agent)
        assert 'edgekit_sketch_sample_rate{model="digits",version="3"} 0.1' in text
        assert 'edgekit_sampled_out_rows_total{model="digits",version="3"} 36' in text


def test_numeric_instances_read_as_json_would_and_refuse_what_they_cannot() -> None:
    rows = [[1, 2.5, -3e-2], [4e10, 0, 6.25]] * 3000
    body = json.dumps({"instances": rows}).encode()
    array = numeric_instances(body, np.dtype("float32"), 100_000)
    np.testing.assert_array_equal(array, np.asarray(rows, dtype=np.float64).astype(np.float32))
    assert array.dtype == np.float32 and array.shape == (6000, 3)
    with pytest.raises(TooManyRows) as refused:
        numeric_instances(body, np.dtype("float32"), 5999)
    assert refused.value.rows == 6000
    for other in (
        {"instances": [[1, None, 3]]},
        {"instances": [[1, 2], [3]]},
        {"instances": [{"a": 1}]},
        {"instances": [[1, 2]], "parameters": {}},
        {"inputs": [[1, 2]]},
        {"instances": [[[1], [2]]]},
        {"instances": [[True, 2]]},
        {"instances": [["1", 2]]},
        {"instances": []},
    ):
        assert numeric_instances(json.dumps(other).encode(), np.dtype("float32"), 10) is None, other
    assert numeric_instances(b'{"instances": [[1, 2], [3, 4]] , "x": 1}', np.dtype("float64"), 10) is None
    assert numeric_instances(b'{"instances": [[1, 2e], [3, 4]]}', np.dtype("float64"), 10) is None


def test_http_reads_a_large_plain_request_and_refuses_too_many_rows_with_the_limit(tmp_path, bundle, keypair) -> None:
    config = make_device(tmp_path / "dev", bundle, keypair[1], server={"max_rows": 10000})
    with np.load("fixtures/digits_test.npz") as npz:
        X = npz["X"]
    with Agent(config_of(config)).start(mqtt=False) as agent:
        url = f"http://127.0.0.1:{agent.server.server_address[1]}/v1/models/digits:predict"

        def post(doc):
            data = json.dumps(doc).encode()
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        rows = np.resize(X, (9000, 64))
        fast = post({"instances": rows.tolist()})
        assert len(fast["predictions"]) == 9000 and len(fast["probabilities"]) == 9000
        answer = agent.predict(rows.astype(np.float32))
        assert answer.json_body() == json.dumps(answer.to_json()).encode()  # written in slices, the same bytes
        named = [dict(zip(agent.schema.feature_names, r, strict=True)) for r in rows[:20].tolist()]
        assert fast["predictions"][:20] == post({"instances": named})["predictions"]  # the ordinary path agrees
        with pytest.raises(urllib.error.HTTPError) as refused:
            post({"instances": np.resize(X, (10001, 64)).tolist()})
        assert refused.value.code == 413
        assert "10001 rows, over the limit of 10000 ([server] max_rows)" in json.loads(refused.value.read())["error"]


def test_the_answer_ring_keeps_its_type_and_turns_to_python_values_when_a_swap_changes_it() -> None:
    """``RecentPredictions`` stores a request with one slice copy in an array of the answers' type; a hot swap
    to answers of another type or shape keeps every earlier answer, as the Python value it was answered as."""
    from device_agent.predlog import RecentPredictions

    ring = RecentPredictions(capacity=8)
    ring.put(0, np.arange(6, dtype=np.int64))
    ring.put(6, np.arange(6, 11, dtype=np.int64))  # wraps around the end of the ring
    assert ring._answers.dtype == np.int64
    assert [ring.get(n) for n in (2, 3, 10, 11)] == [None, 3, 10, None]  # 0-2 fell out; 11 not answered yet
    assert type(ring.get(3)) is int
    ring.put(11, np.array([[0.5, 1.5], [2.5, 3.5]]))  # a regressor with two targets now
    assert ring._answers.dtype == object
    assert [ring.get(n) for n in (10, 11, 12)] == [10, [0.5, 1.5], [2.5, 3.5]]
    ring.put(13, np.array(["cat", "dog"], dtype=object))
    assert [ring.get(n) for n in (12, 13, 14)] == [[2.5, 3.5], "cat", "dog"]
    assert ring.mark_labelled(13) and not ring.mark_labelled(13)


def test_answers_of_another_kind_after_a_swap_read_back_as_they_were_answered() -> None:
    """A regressor swapped for a classifier: its int labels must not read back as floats from the float ring
    (a label "3" would then never match the answer "3.0"), nor flags as ints."""
    from device_agent.predlog import RecentPredictions

    ring = RecentPredictions(capacity=8)
    ring.put(0, np.array([0.5, 1.5]))
    ring.put(2, np.array([3, 4], dtype=np.int64))
    ring.put(4, np.array([True, False]))
    assert [ring.get(n) for n in range(6)] == [0.5, 1.5, 3, 4, True, False]
    assert [type(ring.get(n)) for n in (0, 2, 4)] == [float, int, bool]


def test_the_log_writes_sampled_rows_at_most_once_a_second_and_a_label_is_never_overwritten(tmp_path) -> None:
    """Sampled rows wait (at most ``WRITE_EVERY_SECONDS``) to share a transaction; whatever reads the table
    writes them first, so a label on a sampled prediction lands on its row, not under a later replace."""
    import sqlite3

    from device_agent.predlog import PredictionLog

    db = tmp_path / "predictions.db"
    log = PredictionLog(str(db), capacity=100, sample_every=10, max_per_second=1000)
    log.add("boot", 0, np.zeros((20, 2)), np.arange(20) % 3)
    log.flush()  # the first flush writes at once: nothing was written in the last second
    log.add("boot", 20, np.zeros((20, 2)), np.arange(20, 40) % 3)
    log.flush()
    outside = sqlite3.connect(str(db))
    assert outside.execute("SELECT count(*) FROM predictions").fetchone()[0] == 2  # rows 0 and 10; 20, 30 wait
    assert log.label("boot", "boot", 30, 0) == ("accepted", 0)
    log.close()
    rows = dict(outside.execute("SELECT n, label FROM predictions").fetchall())
    assert rows == {0: None, 10: None, 20: None, 30: "0"}
    outside.close()


def test_the_last_sampled_rows_are_written_a_second_later_when_traffic_stops(tmp_path, monkeypatch) -> None:
    """A flush with nothing new still writes the rows that waited: the background thread flushes every
    interval, so at most ``WRITE_EVERY_SECONDS`` of sampled rows are lost to a crash, busy or idle."""
    import sqlite3

    from device_agent import predlog

    monkeypatch.setattr(predlog, "WRITE_EVERY_SECONDS", 60.0)
    db = tmp_path / "predictions.db"
    log = predlog.PredictionLog(str(db), capacity=100, sample_every=10, max_per_second=1000)
    log.add("boot", 0, np.zeros((20, 2)), np.arange(20) % 3)
    log.flush()
    log.add("boot", 20, np.zeros((20, 2)), np.arange(20, 40) % 3)
    log.flush()
    outside = sqlite3.connect(str(db))
    assert outside.execute("SELECT count(*) FROM predictions").fetchone()[0] == 2  # 20 and 30 wait
    monkeypatch.setattr(predlog, "WRITE_EVERY_SECONDS", 0.0)  # as if the second had passed
    log.flush()  # nothing queued
    assert outside.execute("SELECT count(*) FROM predictions").fetchone()[0] == 4
    outside.close()
    log.close()


def test_a_request_split_across_windows_gives_each_window_its_rows_latencies() -> None:
    """The monitor keeps a request's latency once with its row count; a window closing inside a request
    still reports one latency per row, each row's own request's."""
    rng = np.random.default_rng(6)
    base = _baseline(rng, 3)
    windows: list = []
    monitor = Monitor(base, 100, 1e9, windows.append)
    for size, latency in ((30, 1.0), (150, 2.0), (1, 3.0), (19, 4.0)):
        monitor.record(rng.normal(size=(size, 3)), Prediction(values=np.zeros((size, 1))), latency, 0)
    monitor.process()
    assert [w.rows for w in windows] == [100, 100]
    assert windows[0].latencies_ms.tolist() == [1.0] * 30 + [2.0] * 70
    assert windows[1].latencies_ms.tolist() == [2.0] * 80 + [3.0] + [4.0] * 19
    assert windows[1].profile.latency_ms.counts.sum() == 100


def test_a_gathering_pass_leaves_a_few_rows_for_later_but_never_past_their_time() -> None:
    """The agent's background passes (``gather=True``) leave fewer than ``GATHER_ROWS`` waiting rows for a
    later pass: at most ``GATHER_SECONDS``, never past the window's time; a plain ``process`` and ``flush``
    sketch everything."""
    rng = np.random.default_rng(8)
    base = _baseline(rng, 4)
    clock = FakeClock()
    windows: list = []
    monitor = Monitor(base, 10_000, 60.0, windows.append, clock=clock)

    def record(n: int) -> None:
        monitor.record(rng.normal(size=(n, 4)).astype(np.float32), Prediction(values=np.zeros((n, 1))), 0.01)

    record(100)
    monitor.process(gather=True)
    clock.now = GATHER_SECONDS / 2
    monitor.process(gather=True)
    assert monitor.backlog == 100 and monitor.current()["rows"] == 0
    clock.now = GATHER_SECONDS * 1.1  # waited long enough since the first pass left them
    monitor.process(gather=True)
    assert monitor.backlog == 0 and monitor.current()["rows"] == 100
    record(GATHER_ROWS)
    monitor.process(gather=True)
    assert monitor.current()["rows"] == 100 + GATHER_ROWS
    record(10)
    monitor.process()
    assert monitor.backlog == 0
    record(10)
    monitor.process(gather=True)
    assert monitor.backlog == 10
    clock.now = 61.0  # the window's time is up: its rows are sketched before it closes
    monitor.process(gather=True)
    assert [w.rows for w in windows] == [120 + GATHER_ROWS] and monitor.backlog == 0
    record(5)
    monitor.process(gather=True)
    assert monitor.flush().rows == 5 and monitor.backlog == 0


def test_rows_a_gathering_pass_left_waiting_are_sketched_when_the_monitor_stops() -> None:
    """A few rows a gathering pass left for later would have been sketched a pass later: stopping sketches
    them rather than counting them unmonitored."""
    rng = np.random.default_rng(10)
    monitor = Monitor(_baseline(rng, 4), 10_000, 60.0, lambda window: None, clock=FakeClock())
    monitor.record(rng.normal(size=(50, 4)).astype(np.float32), Prediction(values=np.zeros((50, 1))), 0.01)
    monitor.process(gather=True)
    assert monitor.backlog == 50
    monitor.stop()
    window = monitor.flush()
    assert (window.rows, window.unmonitored) == (50, 0)


def test_a_backlog_recorded_before_the_budget_looked_is_sampled_again_by_row_id() -> None:
    """Requests queued in full (the budget had not looked yet) are sampled at the rate in force when they are
    sketched, by row id, when the new step is a multiple of theirs; the rows left out are counted."""
    rng = np.random.default_rng(9)
    base = _baseline(rng, 4)
    windows: list = []
    monitor = Monitor(base, 10_000, 1e9, windows.append)
    rows = rng.normal(size=(2000, 4)).astype(np.float32)
    for first in (0, 1000):
        monitor.record(rows[first : first + 1000], Prediction(values=np.zeros((1000, 1))), 0.01, first)
    monitor.budget.every = 4
    monitor.process()
    window = monitor.flush()
    assert window.rows == 500 and window.sampled_out == 1500 and window.sample_rate == 0.25
    expected = base.empty_like()
    expected.update_inputs(rows[::4])
    for got, want in zip(window.profile.features, expected.features, strict=True):
        np.testing.assert_array_equal(got.counts, want.counts)
    assert window.latencies_ms.size == 500
    monitor.budget.every = 2  # recorded one row in two ...
    monitor.record(rows[:1000], Prediction(values=np.zeros((1000, 1))), 0.01, 0)
    monitor.budget.every = 3  # ... then the budget asks one in three: not a subset, the recorded sample stands
    assert monitor.flush().rows == 500


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_updates_gathered_give_the_sketch_of_every_row(dtype: type) -> None:
    """A window fed a few rows at a time (the numeric block holds them, ``binning.HOLD_ROWS``), with a
    change of dtype on the way, ends with the counts, moments and extremes of each column sketched on its
    own (``NumericSketch.update``, no block), NaN and infinities included."""
    rng = np.random.default_rng(10)
    base = _baseline(rng, 6)
    rows = rng.normal(size=(700, 6)).astype(dtype)
    rows[::37, 2], rows[::53, 4] = np.nan, np.inf
    other = rows[:3].astype(np.float64 if dtype == np.float32 else np.float32)
    window = base.empty_like()
    for start in range(0, len(rows), 7):
        window.update_inputs(rows[start : start + 7], settle=False)
    window.update_inputs(other, settle=False)  # another dtype: what was gathered is binned first
    window.settle()
    every = np.concatenate([rows.astype(np.float64), other.astype(np.float64)])
    for column, (made, sketch) in enumerate(zip(window.features, base.features, strict=True)):
        plain = sketch.empty_like()
        plain.update(every[:, column])
        np.testing.assert_array_equal(made.counts, plain.counts)
        assert (made.count, made.nulls, made.infs) == (plain.count, plain.nulls, plain.infs)
        assert (made.minimum, made.maximum) == (plain.minimum, plain.maximum)
        assert made.total == pytest.approx(plain.total) and made.total_sq == pytest.approx(plain.total_sq)
    assert window.rows == 703
