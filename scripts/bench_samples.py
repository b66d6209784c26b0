#!/usr/bin/env python3
"""Measure what field samples cost on the wire: bytes a device uploads per sampled row, for a numeric
matrix (digits, 64 features) and a typed table (churn: strings, integers, floats), over the real path.

A local Mosquitto, the real collector (``FleetService``, HTTP API with a token) and in-process agents
with MQTT and ``[capture]`` on; each device is fed its rows, gets delayed labels for half of them, and
is then asked for its samples the way ``edgekit fleet samples`` asks (``CollectorClient.request_samples``:
the collector issues an upload id and sends ``cmd: upload``; the device POSTs its gzip'd JSON lines in
chunks). The figure is the upload's size (what crossed the network, less HTTP heads) over its rows; the
JSON lines before gzip are shown beside it.

    python scripts/bench_samples.py [--devices 3] [--rows 20000] [--rate 0.05] [--quick]
                                    [--json bench-results/bench_samples.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_report import print_checks, write_json  # noqa: E402

from device_agent import Agent  # noqa: E402
from device_agent.config import load_config  # noqa: E402
from device_agent.signing import load_public_key  # noqa: E402
from device_agent.state import StateDir  # noqa: E402
from device_agent.tabular import read_table  # noqa: E402
from edgekit.build.convert import convert_model  # noqa: E402
from edgekit.bundle.keys import generate_keypair  # noqa: E402
from edgekit.bundle.package import build_bundle  # noqa: E402
from edgekit.fleet.client import CollectorClient  # noqa: E402
from edgekit.fleet.config import CollectorConfig  # noqa: E402
from edgekit.fleet.samples import collect_samples  # noqa: E402
from edgekit.fleet.service import FleetService  # noqa: E402
from edgekit.local.broker import free_port, start_local_broker  # noqa: E402
from edgekit.local.fixtures import fixtures_usable, make_fixtures  # noqa: E402

TOKEN = "bench-token"
BYTES_PER_ROW_MAX = {"digits": 400.0, "churn": 250.0}  # gzip'd JSON lines; a float32 matrix row alone is 256 B


def bundles(work: Path, key: Path) -> dict[str, dict[str, Any]]:
    """digits (64 numbers) and churn (typed columns), converted and packaged, with rows to feed."""
    from edgekit.local.churn import make_churn

    fixtures = ROOT / "fixtures" if fixtures_usable(ROOT / "fixtures", ("digits",)) else work / "fixtures"
    if fixtures != ROOT / "fixtures":
        make_fixtures(fixtures, ("digits",))
    convert_model(str(fixtures / "digits.joblib"), str(work / "digits.onnx"))
    build_bundle(
        str(work / "digits.onnx"),
        name="digits",
        version=1,
        baseline_path=str(fixtures / "digits_train.npz"),
        key_path=str(key),
        output=str(work / "digits.edgebundle"),
    )
    test = np.load(fixtures / "digits_test.npz")
    churn = {k: Path(v) for k, v in make_churn(work / "churn", train_rows=3000, test_rows=2000).items()}
    convert_model(str(churn["churn_rf"]), str(work / "churn.onnx"))
    build_bundle(
        str(work / "churn.onnx"),
        name="churn",
        version=1,
        baseline_path=str(churn["train_csv"]),
        label="label",
        key_path=str(key),
        output=str(work / "churn.edgebundle"),
    )
    return {
        "digits": {"bundle": work / "digits.edgebundle", "X": test["X"], "y": test["y"]},
        "churn": {"bundle": work / "churn.edgebundle", "csv": churn["test_csv"]},
    }


def device(work: Path, name: str, kind: dict, public: Path, broker: str, collector: str, rate: float) -> Agent:
    root = work / name
    root.mkdir(parents=True)
    (root / "agent.toml").write_text(
        f'device_id = "{name}"\nfleet = "bench"\nstate_dir = "{root / "state"}"\n[trust]\npublic_key = "{public}"\n'
        f'[monitor]\nwindow_rows = 500\nmax_cpu_fraction = 0\n[server]\nlisten = ""\n[mqtt]\nurl = "{broker}"\n'
        f'[update]\ncollector = "{collector}"\ntoken = "{TOKEN}"\n'
        f"[capture]\nenabled = true\nrate = {rate}\ndrifted_rows = 0\nmax_mb = 50\n"
    )
    StateDir(root / "state").install(kind["bundle"], load_public_key(public))
    return Agent(load_config(root / "agent.toml")).start(http=False)


def feed(agent: Agent, kind: dict, rows: int, seed: int) -> int:
    """``rows`` rows in requests of 1 to 64, a delayed label for every second one; the labels given."""
    rng = np.random.default_rng(seed)
    if "X" in kind:
        X, y = kind["X"], kind["y"]
    else:
        X, y, _ = read_table(kind["csv"], label="label", columns=agent.schema.columns)
    done, labelled = 0, 0
    while done < rows:
        size = int(rng.integers(1, 65))
        picked = rng.integers(0, len(X), size)
        if "X" in kind:  # pixels moved by -1, 0 or +1: distinct rows, as field images are (gzip would gain on repeats)
            batch = np.clip(X[picked] + rng.integers(-1, 2, (size, X.shape[1])), 0, 16)
        else:
            batch = X[picked].tolist()
        result = agent.predict(batch)
        for i in range(0, size, 2):
            agent.feedback(result.ids[i], y[picked[i]].item() if hasattr(y[picked[i]], "item") else y[picked[i]])
            labelled += 1
        done += size
    return labelled


def measure(kind_name: str, kind: dict, args, work: Path, public: Path, broker: str, service: FleetService) -> dict:
    url = f"http://127.0.0.1:{service.server.server_address[1]}"
    agents = [device(work, f"{kind_name}-{i}", kind, public, broker, url, args.rate) for i in range(args.devices)]
    client, per_device = CollectorClient(url, token=TOKEN), []
    try:
        deadline, names = time.time() + 60, {agent.config.device_id for agent in agents}
        while not names <= {d["device"] for d in service.store.status() if d["online"]}:
            if time.time() > deadline:
                raise SystemExit("the devices did not come online")
            time.sleep(0.2)
        for seed, agent in enumerate(agents):
            feed(agent, kind, args.rows, seed)
            while agent.monitor.backlog or agent.stats["windows"] < args.rows // 500:
                time.sleep(0.1)
        for agent in agents:
            started = time.perf_counter()
            doc = collect_samples(client, device=agent.config.device_id, since=None, drifted_only=False, timeout=120)
            upload = doc["upload"]
            raw = sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in doc["rows"])
            distinct = len({json.dumps(r["input"]) for r in doc["rows"]})
            per_device.append(
                {
                    "device": agent.config.device_id,
                    "rows": upload["rows"],
                    "labelled": upload["labelled"],
                    "bytes": upload["size"],
                    "bytes_per_row": upload["size"] / max(1, upload["rows"]),
                    "json_bytes_per_row": raw / max(1, upload["rows"]),
                    "distinct_inputs": distinct,
                    "seconds": time.perf_counter() - started,
                }
            )
    finally:
        for agent in agents:
            agent.stop()
    return {"kind": kind_name, "devices": per_device}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20_000, help="rows fed to each device")
    parser.add_argument("--rate", type=float, default=0.05, help="[capture] rate")
    parser.add_argument("--quick", action="store_true", help="1 device, 2,000 rows: a smoke test, not figures")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "bench_samples.json"))
    args = parser.parse_args()
    if args.quick:
        args.devices, args.rows = 1, 2000
    started, load = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-samples-") as tmp:
        work = Path(tmp)
        private, public, _ = generate_keypair(work / "keys")
        kinds = bundles(work, private)
        broker = start_local_broker(work / "broker")
        service = FleetService(
            CollectorConfig(
                broker=broker.url,
                db=str(work / "fleet.db"),
                http=f"127.0.0.1:{free_port()}",
                client_id="bench-samples",
                api_token=TOKEN,
            )
        ).start()
        try:
            results = [measure(name, kind, args, work, public, broker.url, service) for name, kind in kinds.items()]
        finally:
            service.stop()
            broker.stop()
    print(
        f"{'kind':8} {'device':10} {'rows':>6} {'distinct':>8} {'labelled':>8} {'bytes':>9} {'B/row':>7} "
        f"{'JSON B/row':>10} {'s':>5}"
    )
    checks = []
    for result in results:
        for d in result["devices"]:
            print(
                f"{result['kind']:8} {d['device']:10} {d['rows']:>6} {d['distinct_inputs']:>8} {d['labelled']:>8} "
                f"{d['bytes']:>9} "
                f"{d['bytes_per_row']:>7.1f} {d['json_bytes_per_row']:>10.1f} {d['seconds']:>5.2f}"
            )
        mean = float(np.mean([d["bytes_per_row"] for d in result["devices"]]))
        limit = BYTES_PER_ROW_MAX[result["kind"]]
        checks.append((f"{result['kind']}: bytes uploaded per sampled row", mean, f"<= {limit:.0f}", mean <= limit))
    print()
    print_checks(checks)
    machine = {"cpus": os.cpu_count(), "load_average": load, "load_average_after": os.getloadavg()}
    print(
        f"\n{'quick (smoke test, not figures): ' if args.quick else ''}{time.time() - started:.0f} s on "
        f"{machine['cpus']} CPUs, load average {load[0]:.1f} before, {machine['load_average_after'][0]:.1f} after"
    )
    write_json(args.json, checks, results=results, machine=machine, settings=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
