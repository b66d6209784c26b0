#!/usr/bin/env python3
"""Measure OTA rollouts end to end; print a table and write JSON.

Every phase runs its own Mosquitto, an in-process collector (HTTP API, bundle serving, rollout
controller, trusting a key made here) and emulated devices: real ``edge-agent run`` processes fed
digits rows at a steady rate. v1 is the int8 digits model, v2 the float32 one, both signed here.

1. Fleet: ``--devices`` (50) devices go from v1 to v2 in waves (10%,50%,100%) with a shadow phase
   and a health watch: seconds from ``rollout start`` (bundle upload included) to "succeeded".
   Starting the agent processes is timed apart (it is not part of the rollout).
2. Inference gap at the swap: a probe process of its own posts one-row predictions to a device's
   HTTP API back to back over one keep-alive connection (``--fresh-connections`` for one per
   request; both request times are printed: keep-alive ones stalled 40 ms before bea8f61) and
   timestamps every answer; the largest interval between answers in a window around the first
   answer from v2 (1 s before to 2 s after: the old model's last window closes 1 s after the swap)
   against the same-length window just before the rollout, with no swap, as the bare baseline.
   Measured on a small quiet fleet (``--gap-devices``, 2) for the figure, and on the last device
   of the big fleet (last wave, the busiest moment) for information.
3. Bytes downloaded per device / bundle size, from each device's report in the rollout status; and
   a download cut in half by a proxy (``tests.rollout_helpers.BundleProxy``) on one device: bytes
   fetched / size (1.0 when the second request resumes, 1.5 if it started from zero) and the Range
   header of the second request.

    python scripts/bench_rollout.py [--devices 50] [--quick] [--out bench-results/bench_rollout.json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import print_checks, write_json

from edgekit.build.convert import QuantizeOptions, convert_model
from edgekit.bundle.keys import generate_keypair
from edgekit.bundle.package import build_bundle
from edgekit.fleet.client import CollectorClient
from edgekit.fleet.config import CollectorConfig
from edgekit.fleet.service import FleetService
from edgekit.local.broker import free_port, start_local_broker
from edgekit.local.emulate import EmulatedFleet, prepare_devices
from edgekit.local.fixtures import fixtures_usable, make_fixtures
from edgekit.processes import stop_processes

TARGETS = {"rollout_seconds_max": 60.0, "swap_gap_ms_max": 50.0, "bytes_ratio_max": 1.0, "resumed_ratio_max": 1.0}
FINISHED = ("succeeded", "aborted", "failed")
WINDOW_BEFORE, WINDOW_AFTER = 1.0, 2.0  # seconds around the first answer from v2
OLD, NEW = 1, 2


def setup(work: Path) -> dict:
    fixtures = ROOT / "fixtures" if fixtures_usable(ROOT / "fixtures", ("digits",)) else work / "fixtures"
    if fixtures != ROOT / "fixtures":
        make_fixtures(fixtures, ("digits",))
    train, test = fixtures / "digits_train.npz", fixtures / "digits_test.npz"
    fp32, int8 = work / "digits.onnx", work / "digits.int8.onnx"
    convert_model(str(fixtures / "digits.joblib"), str(fp32))
    convert_model(
        str(fixtures / "digits.joblib"),
        str(int8),
        quantize=QuantizeOptions(mode="static", per_channel=False, force=True),
        calibration=str(train),
    )
    private, public, _ = generate_keypair(work / "keys")
    bundles = {}
    for version, model in ((OLD, int8), (NEW, fp32)):
        bundles[version] = work / f"digits-{version}.edgebundle"
        build_bundle(
            str(model),
            name="digits",
            version=version,
            baseline_path=str(train),
            key_path=str(private),
            output=str(bundles[version]),
        )
    return {"v1": bundles[OLD], "v2": bundles[NEW], "public": public, "test": test}


# -- a fleet: broker, collector, agents; everything registered for stopping ---------------------------
@dataclass
class Fleet:
    name: str
    collector: FleetService
    client: CollectorClient
    configs: list[Path]
    agents: EmulatedFleet
    startup_seconds: float = 0.0

    def port(self, index: int) -> int:
        return json.loads((self.configs[index].parent / "state" / "http.json").read_text())["port"]

    def versions(self) -> dict[str, int]:
        """What each device serves now, asked of the device itself."""
        found = {}
        for index, config in enumerate(self.configs):
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port(index)}/v1/models/digits", timeout=10
            ) as response:
                found[config.parent.name] = json.loads(response.read())["version"]
        return found


def start_fleet(
    stack: contextlib.ExitStack, work: Path, paths: dict, name: str, devices: int, rows_per_second: float, proxy=None
) -> Fleet:
    """A broker of its own (so fleets of earlier phases are never heard), a collector, and ``devices`` agents,
    all online."""
    root = work / name
    broker = start_local_broker(root / "broker")
    stack.callback(broker.stop)
    collector = FleetService(
        CollectorConfig(
            broker=broker.url,
            db=str(root / "fleet.db"),
            http=f"127.0.0.1:{free_port()}",
            client_id=f"bench-{name}",
            trust=str(paths["public"]),
            public_url=proxy.url if proxy else None,
        )
    )
    collector.start()
    stack.callback(collector.stop)
    api = f"http://127.0.0.1:{collector.server.server_address[1]}"
    if proxy is not None:
        proxy.upstream = api
    configs = prepare_devices(
        devices=devices,
        bundle=str(paths["v1"]),
        pubkey=str(paths["public"]),
        broker=broker.url,
        data=str(paths["test"]),
        fleet=name,
        window_rows=500,
        window_seconds=10,
        rows_per_second=rows_per_second,
        drift=None,
        state_dir=str(root / "devices"),
        http_port_base=None,
    )
    agents = EmulatedFleet(configs, say=lambda _: None)
    stack.callback(agents.stop)
    started = time.perf_counter()
    agents.start()
    fleet = Fleet(name, collector, CollectorClient(api), configs, agents)
    wait(
        lambda: sum(d["online"] and d["fleet"] == name for d in collector.store.status()) == devices,
        60 + 2 * devices,
        f"{devices} devices online",
        fleet,
    )
    wait(
        lambda: all((c.parent / "state" / "http.json").exists() for c in configs), 30, "every device's HTTP port", fleet
    )
    fleet.startup_seconds = time.perf_counter() - started
    return fleet


def wait(predicate, timeout: float, what: str, fleet: Fleet | None = None):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if fleet is not None:
            fleet.agents.check()
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- steady load on one device, every answer timestamped ----------------------------------------------
PROBE = r"""
import http.client, json, signal, sys, time
port, keep_alive, bodies_file, out = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
bodies = [b.encode() for b in json.load(open(bodies_file))]
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
lines, connection, count = [], None, 0
while not stop:
    body = bodies[count % len(bodies)]
    count += 1
    try:
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/v1/models/digits:predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        now = time.monotonic()
        if not keep_alive:
            connection.close()
            connection = None
        if response.status == 200:
            lines.append([now, json.loads(data)["model_version"]])
        else:
            lines.append([now, None, f"HTTP {response.status}: {data[:200]!r}"])
    except (OSError, http.client.HTTPException) as exc:
        lines.append([time.monotonic(), None, repr(exc)])
        connection = None
        time.sleep(0.01)
json.dump(lines, open(out, "w"))
"""


@dataclass
class Prober:
    """One-row predictions back to back, from a process of its own (so the in-process collector's threads
    cannot stall the client); (time.monotonic() answered, model version) per answer, over one keep-alive
    connection or a fresh connection per request."""

    port: int
    rows: np.ndarray
    work: Path
    keep_alive: bool = True
    answers: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def start(self) -> Prober:
        bodies, self._out = self.work / f"probe-{self.port}.bodies.json", self.work / f"probe-{self.port}.json"
        bodies.write_text(json.dumps([json.dumps({"instances": [row]}) for row in self.rows[:200].tolist()]))
        self._process = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(self.port), "1" if self.keep_alive else "0", str(bodies), str(self._out)]
        )
        return self

    def stop(self) -> None:
        stop_processes([self._process], timeout=30)
        if self._out.exists() and not self.answers:
            lines = json.loads(self._out.read_text())
            self.answers = [(t, v) for t, v, *_ in lines if v is not None]
            self.failures = [(t, why[0]) for t, v, *why in lines if v is None]

    def swap_time(self) -> float | None:
        return next((t for t, version in self.answers if version == NEW), None)

    def max_gap_ms(self, start: float, end: float) -> tuple[float | None, int]:
        """The largest interval between consecutive answers that ends in [start, end], and the answers in it."""
        times = np.array([t for t, _ in self.answers])
        if len(times) < 2:
            return None, len(times)
        ends = (times[1:] >= start) & (times[1:] <= end)
        gaps = np.diff(times)[ends]
        return (float(gaps.max() * 1e3) if gaps.size else None), int(ends.sum())

    def largest(self, start: float, end: float, origin: float, count: int = 5) -> list[dict]:
        """The ``count`` largest intervals ending in [start, end]: where each ended (s from ``origin``) and how long
        it was."""
        times = np.array([t for t, _ in self.answers])
        gaps = [(float(b - a), float(b)) for a, b in itertools.pairwise(times) if start <= b <= end]
        return [
            {"ended_s": round(b - origin, 4), "ms": round(g * 1e3, 3)} for g, b in sorted(gaps, reverse=True)[:count]
        ]

    def figures(self, rollout_started: float) -> dict:
        swap = self.swap_time()
        length = WINDOW_BEFORE + WINDOW_AFTER
        baseline_end = rollout_started - 0.5
        baseline_ms, baseline_answers = self.max_gap_ms(baseline_end - length, baseline_end)
        doc = {
            "answers": len(self.answers),
            "failures": len(self.failures),
            "failure_examples": [f for _, f in self.failures[:3]],
            "window_seconds": length,
            "baseline_gap_ms": baseline_ms,
            "baseline_answers": baseline_answers,
            "swap_seen": swap is not None,
        }
        if swap is None:
            return doc
        swap_ms, swap_answers = self.max_gap_ms(swap - WINDOW_BEFORE, swap + WINDOW_AFTER)
        last_old = max((t for t, version in self.answers if version == OLD and t < swap), default=swap)
        in_window = [f for f in self.failures if swap - WINDOW_BEFORE <= f[0] <= swap + WINDOW_AFTER]
        doc.update(
            swap_gap_ms=swap_ms,
            largest_gaps=self.largest(swap - WINDOW_BEFORE, swap + WINDOW_AFTER, swap),
            swap_answers=swap_answers,
            last_v1_to_first_v2_ms=(swap - last_old) * 1e3,
            swap_failures=len(in_window),
            ratio=swap_ms / baseline_ms if swap_ms and baseline_ms else None,
            swap_after_start_s=swap - rollout_started,
            answers_per_second=swap_answers / length,
        )
        return doc


def request_latency(port: int, rows: np.ndarray, count: int = 50) -> dict:
    """Median one-row request time over one keep-alive connection and over a fresh connection each time."""
    body = json.dumps({"instances": [rows[0].tolist()]}).encode()
    found = {}
    for mode in ("keep_alive", "fresh"):
        connection, times = http.client.HTTPConnection("127.0.0.1", port, timeout=10), []
        for _ in range(count):
            start = time.perf_counter()
            if mode == "fresh":
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("POST", "/v1/models/digits:predict", body, {"Content-Type": "application/json"})
            connection.getresponse().read()
            if mode == "fresh":
                connection.close()
            times.append((time.perf_counter() - start) * 1e3)
        connection.close()
        found[f"{mode}_ms_median"] = float(np.median(times))
    return found


# -- a rollout, timed -----------------------------------------------------------------------------------
def run_rollout(fleet: Fleet, bundle: Path, args, *, waves: str, timeout: float) -> dict:
    started = time.monotonic()
    rollout_id = fleet.client.start(
        bundle,
        fleet=fleet.name,
        waves=waves,
        shadow_rows=args.shadow_rows,
        health_seconds=args.health_seconds,
        abort_on=args.abort_on,
    )["id"]
    wave_times, wave, status = {}, None, None
    deadline = started + timeout
    while time.monotonic() < deadline:
        fleet.agents.check()
        status = fleet.client.status(rollout_id)
        if status["wave"] != wave:
            wave = status["wave"]
            wave_times[wave] = time.monotonic() - started
        if status["state"] in FINISHED:
            break
        time.sleep(0.1)
    seconds = time.monotonic() - started
    if status is None or status["state"] not in FINISHED:
        raise RuntimeError(f"rollout {rollout_id} did not finish in {timeout:.0f} s: {status and status['counts']}")
    return {
        "id": rollout_id,
        "state": status["state"],
        "reason": status["reason"],
        "seconds": seconds,
        "started": started,
        "collector_seconds": (status["finished_at"] or 0) - status["created_at"],
        "wave_started_s": wave_times,
        "counts": status["counts"],
        "status": status,
    }


def download_ratios(status: dict, size: int) -> dict:
    fetched = [(d["device"], (d.get("download") or {}).get("bytes")) for d in status["devices"]]
    known = [b for _, b in fetched if b is not None]
    return {
        "bundle_bytes": size,
        "devices_reporting": len(known),
        "max_ratio": max(known) / size if known else None,
        "min_ratio": min(known) / size if known else None,
        "missing": [d for d, b in fetched if b is None],
    }


def bench_fleet(stack, work: Path, paths: dict, args) -> dict:
    fleet = start_fleet(stack, work, paths, "bench-fleet", args.devices, args.rows_per_second)
    probe_index = len(fleet.configs) - 1  # the last wave: the busiest moment of the rollout
    prober = Prober(fleet.port(probe_index), np.load(paths["test"])["X"], work, keep_alive=args.keep_alive).start()
    stack.callback(prober.stop)
    time.sleep(WINDOW_BEFORE + WINDOW_AFTER + 1.0)  # a steady window for the baseline
    rollout = run_rollout(fleet, paths["v2"], args, waves=args.waves, timeout=args.timeout)
    time.sleep(0.5)
    prober.stop()
    versions = fleet.versions()
    result = {
        "devices": args.devices,
        "startup_seconds": fleet.startup_seconds,
        **{k: v for k, v in rollout.items() if k not in ("status", "started")},
        "on_v2": sum(v == NEW for v in versions.values()),
        "download": download_ratios(rollout["status"], paths["v2"].stat().st_size),
        "probe": {"device": fleet.configs[probe_index].parent.name, **prober.figures(rollout["started"])},
        "device_states": {
            d["device"]: [d["state"], d["reason"]] for d in rollout["status"]["devices"] if d["state"] != "succeeded"
        },
    }
    shadows = [d["shadow"] for d in rollout["status"]["devices"] if d.get("shadow")]
    if shadows:
        result["shadow_agreement_min"] = min(s["agreement"] for s in shadows if s.get("agreement") is not None)
    return result


def bench_gap(stack, work: Path, paths: dict, args) -> dict:
    fleet = start_fleet(stack, work, paths, "bench-gap", args.gap_devices, args.rows_per_second)
    latency = request_latency(fleet.port(0), np.load(paths["test"])["X"])
    prober = Prober(fleet.port(0), np.load(paths["test"])["X"], work, keep_alive=args.keep_alive).start()
    stack.callback(prober.stop)
    time.sleep(WINDOW_BEFORE + WINDOW_AFTER + 1.0)
    rollout = run_rollout(fleet, paths["v2"], args, waves="100%", timeout=args.timeout)
    time.sleep(0.5)
    prober.stop()
    return {
        "devices": args.gap_devices,
        "device": fleet.configs[0].parent.name,
        "state": rollout["state"],
        "seconds": rollout["seconds"],
        "keep_alive": args.keep_alive,
        "request_latency": latency,
        **prober.figures(rollout["started"]),
    }


def bench_resume(stack, work: Path, paths: dict, args) -> dict:
    from tests.rollout_helpers import BundleProxy

    proxy = BundleProxy("cut")
    stack.callback(proxy.stop)
    fleet = start_fleet(stack, work, paths, "bench-resume", 1, args.rows_per_second, proxy=proxy)
    rollout = run_rollout(fleet, paths["v2"], args, waves="100%", timeout=args.timeout)
    size = paths["v2"].stat().st_size
    device = rollout["status"]["devices"][0]
    fetched = (device.get("download") or {}).get("bytes")
    return {
        "state": rollout["state"],
        "reason": rollout["reason"],
        "bundle_bytes": size,
        "fetched_bytes": fetched,
        "ratio": fetched / size if fetched is not None else None,
        "ranges": proxy.seen,
        "expected_range": f"bytes={size // 2}-",
        "on_v2": fleet.versions() == {"emu-00": NEW},
    }


# -- the table --------------------------------------------------------------------------------------------
def checks(results: dict, args) -> list[tuple[str, float | None, str, bool]]:
    fleet, gap, resume = results["fleet"], results["gap"], results["resume"]
    probe = fleet["probe"]
    n = fleet["devices"]
    size = fleet["download"]["bundle_bytes"]
    return [
        (
            f"{n} devices v1 -> v2, rollout start to succeeded (s)",
            fleet["seconds"],
            f"≤ {TARGETS['rollout_seconds_max']:.0f}",
            fleet["state"] == "succeeded"
            and fleet["on_v2"] == n
            and fleet["seconds"] <= TARGETS["rollout_seconds_max"],
        ),
        (f"  devices serving v2 afterwards (asked over HTTP), of {n}", fleet["on_v2"], f"= {n}", fleet["on_v2"] == n),
        (
            f"  starting {n} agent processes until all online (s, not timed above)",
            fleet["startup_seconds"],
            "info",
            True,
        ),
        (
            f"largest gap between answers around the swap, {gap['devices']}-device fleet (ms)",
            gap.get("swap_gap_ms"),
            f"< {TARGETS['swap_gap_ms_max']:.0f}",
            gap.get("swap_gap_ms") is not None
            and gap["swap_gap_ms"] < TARGETS["swap_gap_ms_max"]
            and gap["swap_failures"] == 0,
        ),
        ("  same, steady window without a swap (bare baseline, ms)", gap.get("baseline_gap_ms"), "info", True),
        ("  swap / baseline", gap.get("ratio"), "info", True),
        (
            "  one request over a keep-alive connection, median (ms)",
            gap["request_latency"]["keep_alive_ms_median"],
            "info",
            True,
        ),
        ("  one request over a fresh connection, median (ms)", gap["request_latency"]["fresh_ms_median"], "info", True),
        (
            f"largest gap around the swap, {probe['device']} in the {n}-device fleet (ms)",
            probe.get("swap_gap_ms"),
            "info",
            True,
        ),
        ("  same, steady window without a swap (ms)", probe.get("baseline_gap_ms"), "info", True),
        (
            f"bytes downloaded per device / bundle size ({size:,} B), worst device",
            fleet["download"]["max_ratio"],
            "≈ 1",
            fleet["download"]["max_ratio"] is not None
            and fleet["download"]["max_ratio"] <= TARGETS["bytes_ratio_max"]
            and not fleet["download"]["missing"],
        ),
        (
            "download cut in half, resumed: bytes fetched / size",
            resume["ratio"],
            "= 1 (not 1.5)",
            resume["ratio"] is not None
            and resume["ratio"] <= TARGETS["resumed_ratio_max"]
            and resume["state"] == "succeeded",
        ),
    ]


def print_table(results: dict, args) -> list:
    rows = checks(results, args)
    print(
        f"\nwaves {args.waves}, shadow rows {args.shadow_rows}, health watch {args.health_seconds:g} s, "
        f"abort on {args.abort_on}, {args.rows_per_second:g} rows/s per device, {args.devices} devices, "
        f"probe on {'one keep-alive connection' if args.keep_alive else 'a fresh connection per request'}"
    )
    print_checks(rows)
    fleet, gap, resume = results["fleet"], results["gap"], results["resume"]
    waves = ", ".join(f"wave {w} at {s:.1f} s" for w, s in fleet["wave_started_s"].items())
    print(
        f"\nfleet rollout {fleet['state']} ({fleet['reason']}); {waves}; "
        f"collector's own clock {fleet['collector_seconds']:.1f} s"
    )
    if fleet.get("device_states"):
        print(f"devices not succeeded: {fleet['device_states']}")
    for label, probe in (("gap fleet", gap), (f"probe in fleet ({fleet['probe']['device']})", fleet["probe"])):
        if probe.get("swap_seen"):
            print(
                f"{label}: {probe['answers']:,} answers, {probe['answers_per_second']:.0f}/s around the swap, "
                f"last v1 -> first v2 answer {probe['last_v1_to_first_v2_ms']:.2f} ms, "
                f"{probe['failures']} failed requests ({probe['swap_failures']} around the swap), "
                f"swap {probe['swap_after_start_s']:.1f} s after rollout start"
            )
        else:
            print(
                f"{label}: no answer from v2 seen "
                f"({probe['answers']} answers, {probe['failures']} failures {probe['failure_examples']})"
            )
    print(
        f"resumed download: requests carried Range {resume['ranges']} (expected second: {resume['expected_range']}); "
        f"{resume['fetched_bytes']} of {resume['bundle_bytes']} bytes; rollout {resume['state']}"
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=50, help="emulated devices in the timed rollout (default 50)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 devices unless --devices is given")
    parser.add_argument("--waves", default="10%,50%,100%")
    parser.add_argument("--shadow-rows", type=int, default=200)
    parser.add_argument("--health-seconds", type=float, default=5.0)
    parser.add_argument("--abort-on", default="failed>20%,agreement<0.95")
    parser.add_argument("--rows-per-second", type=float, default=50.0, help="emulated traffic per device")
    parser.add_argument(
        "--gap-devices", type=int, default=2, help="devices in the quiet fleet where the swap gap is measured"
    )
    parser.add_argument(
        "--fresh-connections",
        dest="keep_alive",
        action="store_false",
        help="probe with a fresh connection per request, not one keep-alive connection",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a rollout after this many seconds")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output (default bench-results/bench_rollout.json, or bench_rollout_quick.json with --quick)",
    )
    args = parser.parse_args()
    if args.quick and "--devices" not in sys.argv:
        args.devices = 5
    out = Path(
        args.out or ROOT / "bench-results" / ("bench_rollout_quick.json" if args.quick else "bench_rollout.json")
    )

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-rollout-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # Mosquitto, run as root, drops to its own user and must reach its config in here
        paths = setup(work)
        results = {}
        for phase, bench in (("gap", bench_gap), ("resume", bench_resume), ("fleet", bench_fleet)):
            with contextlib.ExitStack() as stack:  # every process of the phase stops here, whatever happened
                print(f"{phase} ...", flush=True)
                results[phase] = bench(stack, work, paths, args)
    rows = print_table(results, args)
    settings = {
        k: getattr(args, k)
        for k in (
            "devices",
            "waves",
            "shadow_rows",
            "health_seconds",
            "abort_on",
            "rows_per_second",
            "gap_devices",
            "keep_alive",
            "quick",
        )
    }
    write_json(out, rows, targets=TARGETS, settings=settings, results=results)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
