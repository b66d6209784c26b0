"""scripts/bench_tensor.py runs end to end in its --quick mode (the digits CNN in the image network's part)
and writes its JSON.

Only that it works is checked, never a timing: timings on a shared machine flake. What is checked is
what a fast wrong answer would hide: the served model answers as the bare session does, int8 agrees
with float32, and every figure of the issue has its row.
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
        [sys.executable, str(ROOT / "scripts" / "bench_tensor.py"), "--quick", "--data", str(tmp_path / "data"),
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for row in ("int8 batch-1 speedup", "int8 accuracy drop (points), --force", "sketch (rows + update_inputs)"):
        assert row in done.stdout
    assert "v2 infer, binary, fp32 (tritonclient, loopback) / bare session.run" in done.stdout
    assert "v2 infer (tritonclient, binary) round trip through the real server" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["quick"] and doc["quantized"]["agreement"] >= 0.99
    assert doc["digits"]["forced"] and doc["digits"]["drop_points"] <= 1.0
    assert doc["http"]["answers_match"]
    for key in ("v2_binary_fp32_ratio", "v2_binary_int8_ratio", "v2_json_fp32_ratio", "v1_b64_fp32_ratio"):
        assert doc["http"][key] > 0
    assert doc["sketch"]["b1_share"] > 0 and doc["sketch"]["b16_share"] > 0
    assert {"clean", "brighter", "blurred"} <= set(doc["drift"])
    assert all("session.run, in the server" in doc["timeline_us"][kind] for kind in ("v2", "v1")) and doc["profile"]
    assert all(isinstance(c["ok"], bool) for c in doc["checks"])
