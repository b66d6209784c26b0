#!/usr/bin/env python3
"""The host half of scripts/emulated_pi.sh: bundle, broker, flash into the arm64 root, traffic, first summary.

With ``--bench``, then the agent's own cost inside the root (``scripts/bench_agent.py --device``: agent
against the bare LiteRT interpreter, both emulated), printed beside the host's last figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import paho.mqtt.client as mqtt

from edgekit.build.convert import QuantizeOptions, convert_model
from edgekit.bundle.keys import generate_keypair
from edgekit.bundle.package import build_bundle
from edgekit.local.broker import start_local_broker
from edgekit.local.fixtures import fixtures_usable, make_fixtures
from edgekit.local.flash import Flasher, FlashPlan


def main(rootfs: str, bench: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="edgekit-pi-"))
    # onnxruntime's aarch64 wheel crashes on import under qemu-user (7.2 here); LiteRT runs, and it is
    # what a Pi runs best anyway: the emulated Pi gets the int8 .tflite of the digits model.
    print("[4/5] building the digits bundle (int8 .tflite) on the host", file=sys.stderr)
    fixtures = ROOT / "fixtures"
    if not fixtures_usable(fixtures, ("digits",)):
        fixtures = work / "fixtures"
        make_fixtures(fixtures, ("digits",))
    model = work / "digits.tflite"
    convert_model(
        str(fixtures / "digits.joblib"),
        str(model),
        target_format="tflite",
        quantize=QuantizeOptions(force=True),
        calibration=str(fixtures / "digits_train.npz"),
    )
    private, public, _ = generate_keypair(work / "keys")
    bundle = work / "digits-1.edgebundle"
    build_bundle(
        str(model),
        name="digits",
        version=1,
        baseline_path=str(fixtures / "digits_train.npz"),
        key_path=str(private),
        output=str(bundle),
    )
    broker = start_local_broker(work / "broker")
    summaries, got = [], threading.Event()
    listener = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda c, u, m: (summaries.append(json.loads(m.payload)), got.set())
    listener.connect("127.0.0.1", broker.port)
    listener.subscribe("edgekit/v1/pi/emulated-pi/summary", qos=1)
    listener.loop_start()
    try:
        port = 18470
        plan = FlashPlan(
            bundle=bundle,
            device_id="emulated-pi",
            fleet="pi",
            broker=broker.url,
            pubkey=public,
            target=f"chroot:{rootfs}",
            listen=f"127.0.0.1:{port}",
            python="/usr/bin/python3",
            window_rows=100,
        )
        started = time.time()
        print("[5/5] flashing into the arm64 root (pip fetches aarch64 wheels: about a minute)", file=sys.stderr)
        state = Flasher(plan).run(wait_seconds=300)
        print(f"      flashed and online in {time.time() - started:.0f} s: {state}", file=sys.stderr)
        rows = np.load(fixtures / "digits_test.npz")["X"][:150].tolist()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/digits:predict", data=json.dumps({"instances": rows}).encode()
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        print(
            f"      the emulated Pi answered {len(answer['predictions'])} rows (model v{answer['model_version']})",
            file=sys.stderr,
        )
        if not got.wait(120):
            print("emulated_pi: no summary within 120 s", file=sys.stderr)
            return 1
        summary = summaries[0]
        print(
            json.dumps(
                {
                    "device": summary["device"],
                    "seq": summary["seq"],
                    "rows": summary["rows"],
                    "drifted": summary["drift"]["drifted"],
                    "latency_p50_ms": summary["latency"]["p50_ms"],
                }
            )
        )
        print("emulated Pi: agent flashed, served and reported a summary", file=sys.stderr)
        return run_bench(Path(rootfs), fixtures / "digits_test.npz") if bench else 0
    finally:
        listener.loop_stop()
        broker.stop()


def run_bench(rootfs: Path, test: Path, rounds: int = 5) -> int:
    """``bench_agent.py --device`` in the arm64 root, on the bundle just flashed; its figures beside the host's.

    Both sides of each ratio run under qemu-user, so a ratio says what the agent adds to a LiteRT call on an
    emulated Cortex-A72, not what a real Pi takes in microseconds (qemu translates NEON and the Python
    interpreter alike, but not at one rate)."""
    bench = rootfs / "opt" / "edgekit" / "bench"
    bench.mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "bench_agent.py", bench / "bench_agent.py")
    shutil.copy(test, bench / "digits_test.npz")
    print(f"[bench] the agent's own cost inside the arm64 root ({rounds} rounds; minutes under qemu)", file=sys.stderr)
    inside = "/opt/edgekit"
    command = [
        "chroot", str(rootfs), f"{inside}/venv/bin/python", f"{inside}/bench/bench_agent.py", "--rounds", str(rounds),
        "--device", f"{inside}/bundle.edgebundle", f"{inside}/etc/trusted.pub", f"{inside}/bench/digits_test.npz",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(f"emulated_pi: the bench failed inside the root:\n{done.stderr[-2000:]}", file=sys.stderr)
        return 1
    emulated = json.loads(done.stdout.strip().splitlines()[-1])
    host = _host_figures()
    rows = [
        ("batch 1: agent / bare", "b1_ratio"),
        ("batch 1, default CPU budget: agent / bare", "budget_b1_ratio"),
        ("batch 1000 throughput, every row sketched", "b1000_throughput"),
        ("batch 1000 throughput, default CPU budget", "budget_b1000_throughput"),
        ("the same, one background pass per 100 ms", "budget_b1000_throughput_agent_pace"),
        ("share of rows sketched under the budget", "budget_sample_rate"),
        ("bare engine call, batch 1 (µs)", "bare_b1_us"),
        ("bare engine call, batch 1000 (ms)", "bare_b1000_ms"),
    ]
    print(f"{'figure':46s} {'emulated Pi (LiteRT int8)':>26s} {'host (onnxruntime)':>20s}")
    for label, key in rows:
        shown = "n/a" if key not in host else f"{host[key]:.4g}"
        print(f"{label:46s} {emulated[key]:>26.4g} {shown:>20s}")
    out = ROOT / "bench-results" / "bench_agent_emulated_pi.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"emulated_pi": emulated, "host": host}, indent=1))
    print(f"[bench] written to {out}", file=sys.stderr)
    return 0


def _host_figures() -> dict:
    """The host's last ``scripts/bench_agent.py`` results, if it was run here."""
    path = ROOT / "bench-results" / "bench_agent.json"
    try:
        return json.loads(path.read_text()).get("results", {})
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], bench="--bench" in sys.argv[2:]))
