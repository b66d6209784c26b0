"""scripts/bench_loop.py's quick mode end to end (3 emulated devices, a real broker and collector, the retrain
sink with the example command): the figures it writes are measured, not printed constants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_loop.py"


@pytest.mark.network
def test_the_quick_bench_closes_the_loop_on_every_device_and_writes_its_figures(tmp_path):
    out = tmp_path / "bench_loop.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    loop = doc["loop"]
    assert (loop["version"], loop["devices_in_rollout"]) == (2, 3)  # promoted over v1, rolled out to the whole fleet
    steps = [s["step"] for s in loop["steps"]]
    assert steps[:4] == ["triggered", "champion", "samples requested", "samples exported"]
    assert steps[-3:] == ["promote", "bundle stored", "rollout started"]
    parts = loop["parts_s"]
    assert 0 <= parts["samples exported"] < parts["command finished"] < parts["rollout started"] < parts["all serving"]
    assert loop["alert_to_all_serving_s"] == pytest.approx(loop["command_s"] + loop["rollout_s"], abs=10)
    assert 0 < doc["upload"]["digits"] < 400 and 0 < doc["upload"]["churn"] < 250
    assert doc["cbpe"]["in_support"] is None and doc["cbpe"]["all_shifted"] > 0  # quick: noise windows only
    equal, better = doc["ab"]["equal"], doc["ab"]["better"]
    assert 0 <= equal["promoted"] + equal["reverted_as_worse"] <= 1 and better["median_hours"] < equal["median_hours"]
    figures = {c["figure"] for c in doc["checks"]}
    assert "drift alert -> new version serving on all 3 devices (s)" in figures
    assert "all devices serving" in done.stdout and "figure" in done.stdout
