#!/usr/bin/env python3
"""The host half of scripts/emulated_pi.sh: bundle, broker, flash into the arm64 root, traffic, first summary."""

from __future__ import annotations

import json
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


def main(rootfs: str) -> int:
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
        return 0
    finally:
        listener.loop_stop()
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
