"""``[emulate] feedback``: an emulated device's app sends the true label of a share of its rows back, as the
delayed labels the field samples and a window's accuracy carry (the demo's loop retrains on them)."""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

from device_agent import Agent
from device_agent.config import load_config
from device_agent.errors import ConfigError
from tests.agent_helpers import make_device


def _emulated(tmp_path, bundle, keypair, digits, feedback) -> object:
    config = make_device(tmp_path / "dev", bundle, keypair[1], http=False, window_rows=100)
    with open(config, "a") as handle:
        handle.write(f'[emulate]\ndata = "{digits.test}"\nrows_per_second = 2000\nfeedback = {feedback}\n')
    return config


def test_a_share_of_the_emulated_rows_gets_its_true_label_back(tmp_path, bundle, keypair, digits):
    config = _emulated(tmp_path, bundle, keypair, digits, 0.5)
    with Agent(load_config(config)).start(http=False) as agent:
        deadline = time.monotonic() + 30
        while agent.feeder.sent < 2000 and time.monotonic() < deadline:
            time.sleep(0.05)
        sent = agent.feeder.sent
    with sqlite3.connect(tmp_path / "dev" / "state" / "predictions.db") as db:
        labels = db.execute("SELECT prediction, label FROM predictions WHERE label IS NOT NULL").fetchall()
    assert sent >= 2000 and 0.4 * sent < len(labels) < 0.6 * sent
    with np.load(digits.test) as test:
        truth = set(test["y"].tolist())
    assert {int(label) for _, label in labels} <= truth
    # the model is right on most digits, so the labels are the truth, not its own answers echoed nor noise
    agreement = np.mean([prediction == label for prediction, label in labels])
    assert 0.9 < agreement < 1.0


def test_feedback_outside_zero_to_one_is_refused_at_start(tmp_path, bundle, keypair, digits):
    with pytest.raises(ConfigError, match="feedback 1.5 is outside 0..1"):
        load_config(_emulated(tmp_path, bundle, keypair, digits, 1.5))
