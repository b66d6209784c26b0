"""scripts/bench_tabular.py runs end to end in its --quick mode and writes its JSON.

Only that it works is checked, never a timing: timings on a shared machine flake.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_tabular.py"), "--quick", "--data", str(tmp_path / "churn"),
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "agent.predict batch 1 (dict row) / bare session.run" in done.stdout
    assert "where agent.predict's time goes" in done.stdout
    doc = json.loads(out.read_text())
    assert [m["model"] for m in doc["models"]] == ["churn_rf", "churn_hgb"]
    for model in doc["models"]:
        assert model["agreement"] >= 0.99  # correctness, not speed: the converted model answers as scikit-learn does
        assert model["max_dp"] <= 1e-4
    assert {"schema.check (dict row)", "schema.feed", "runtime.predict", "monitor.record"} <= set(doc["stages_us"])
    assert doc["agent"]["agent_dict_us"] > 0 and doc["profile"]
    assert all(isinstance(c["ok"], bool) for c in doc["checks"])
