#!/usr/bin/env python3
"""Measure the closed loop (issue 19): drift alert to the new version on every device, upload cost, CBPE error, A/B.

(a) **Alert to fleet-wide serving.** A local Mosquitto, the real collector (``FleetService`` with the
    ``alerts.toml`` this script writes: drift after 2 windows, the retrain sink with the shipped example
    command, ``promote`` against the bundle the devices run, and ``[sinks.retrain.rollout]`` for the whole
    fleet, shadow first), and ``--devices`` (20) emulated devices (``EmulatedFleet``: real ``edge-agent run``
    processes fed the held-out digits, 3 rows in 4 labelled later by their app, ``[capture]`` on). Device 0
    (started last, so every device is known when its alert opens) gets a hot pixel (``pixel_0_1`` + 8, which
    costs the model 10 points) after ``--drift-after`` rows. The figure runs from the drift alert's opening
    (the store's ``opened_at``) to the first moment the collector's table shows every device on the new
    version; its parts come from the alert's timeline (samples, the command, promote, the rollout).
(b) **Bytes uploaded per device per sampled row**: ``scripts/bench_samples.py``'s own measurement (its
    ``bundles`` and ``measure``: in-process agents, the real upload path), digits and churn.
(c) **CBPE estimate error on shifted windows**: ``scripts/bench_cbpe.py``'s windows (one seed; with ``--quick``
    its quick mode), the mean absolute error of the estimate against realized accuracy, in points, under
    in-support covariate shift (the issue's target, at most 2) and over every shifted window (out of support too).
(d) **A/B decision time and false-winner rate**, two equal models (90 %), ``--experiments`` (200) simulated
    splits through the collector's rule: ``scripts/bench_ab.py``'s ``simulate`` (and the decision time when the
    candidate is 5 points better).

    python scripts/bench_loop.py [--devices 20] [--experiments 200] [--quick] [--json bench-results/bench_loop.json]

``--quick`` (3 devices, a 100-epoch network, 40 experiments, 1 device and 2,000 rows for the upload): a smoke
test, not figures. On a 2-core machine the full run takes a few minutes, most of it 20 agents starting and the
example command training its network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_report import print_checks, print_run, write_json  # noqa: E402

ALPHA = 0.05
DRIFT_FEATURE, DRIFT_SHIFT = "pixel_0_1", 8.0


# -- (a) alert to the new version on every device ---------------------------------------------------------------


def fleet_alerts(work: Path, *, gate: Path, train: Path, key: Path, waves: str, max_iter: int) -> Path:
    """The collector's alerts.toml: drift after 2 windows; the retrain sink with the example command and a
    rollout to the whole fleet (shadow first, the new bundle's baseline the training data)."""
    command = [sys.executable, "-m", "edgekit.local.retrain_example", "--max-iter", str(max_iter)]
    path = work / "alerts.toml"
    path.write_text(
        f"""[rules]
drift_windows = 2
offline_seconds = 3600
[sinks]
log = false
[sinks.retrain]
models = ["digits"]
command = {json.dumps(command)}
data = [{json.dumps(str(gate))}]
trained_on = [{json.dumps(str(train))}]
max_regression = 0.02
quantize = "none"
key = {json.dumps(str(key))}
samples_timeout = "120s"
timeout = "10m"
workdir = "retrain"
[sinks.retrain.rollout]
waves = "{waves}"
shadow_rows = 100
health_seconds = 3
"""
    )
    return path


def digits_bundle(work: Path, private: Path) -> tuple[Path, Path, Path]:
    """digits v1 (float32, the fixtures' network) and its train and test files."""
    from edgekit.build.convert import convert_model
    from edgekit.bundle.package import build_bundle
    from edgekit.local.fixtures import fixtures_usable, make_fixtures

    fixtures = ROOT / "fixtures" if fixtures_usable(ROOT / "fixtures", ("digits",)) else work / "fixtures"
    if fixtures != ROOT / "fixtures":
        make_fixtures(fixtures, ("digits",))
    train, test = fixtures / "digits_train.npz", fixtures / "digits_test.npz"
    onnx = work / "digits.onnx"
    convert_model(str(fixtures / "digits.joblib"), str(onnx), names_from=str(train))
    bundle = work / "digits-1.edgebundle"
    build_bundle(
        str(onnx), name="digits", version=1, baseline_path=str(train), key_path=str(private), output=str(bundle)
    )
    return bundle, train, test


@contextlib.contextmanager
def running_collector(work: Path, client_id: str, *, alerts: Path | None = None, **settings: Any) -> Iterator[Any]:
    """A local broker of this run's own and the real collector on it (``settings``: more ``CollectorConfig``;
    ``alerts``: its alerts.toml), yielded as (broker, service); both stopped on the way out, whatever happens."""
    from edgekit.fleet.alerts import load_alert_config
    from edgekit.fleet.config import CollectorConfig
    from edgekit.fleet.service import FleetService
    from edgekit.local.broker import free_port, start_local_broker

    rules, sinks = load_alert_config(alerts) if alerts else (None, None)
    with contextlib.ExitStack() as stack:
        broker = start_local_broker(work / "broker")
        stack.callback(broker.stop)
        config = CollectorConfig(
            broker=broker.url,
            db=str(work / "fleet.db"),
            http=f"127.0.0.1:{free_port()}",
            client_id=client_id,
            **settings,
        )
        service = FleetService(config, alert_rules=rules, alert_sinks=sinks).start()
        stack.callback(service.stop)
        yield broker, service


def alert_to_fleet(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run (a) once: the seconds from the drift alert to every device serving the new version, and their parts."""
    from edgekit.bundle.keys import generate_keypair
    from edgekit.local.emulate import DriftSpec, EmulatedFleet, prepare_devices

    private, public, _ = generate_keypair(work / "keys")
    bundle, train, test = digits_bundle(work, private)
    alerts = fleet_alerts(work, gate=test, train=train, key=private, waves=args.waves, max_iter=args.max_iter)
    with running_collector(work, "bench-loop", alerts=alerts, trust=str(public)) as (broker, service):
        service.rollouts.add_bundle(bundle.read_bytes())  # the champion: the bundle the devices run
        configs = prepare_devices(
            devices=args.devices,
            bundle=str(bundle),
            pubkey=str(public),
            broker=broker.url,
            data=str(test),
            fleet="bench",
            window_rows=100,
            window_seconds=10,
            rows_per_second=args.rows_per_second,
            drift=DriftSpec(DRIFT_FEATURE, DRIFT_SHIFT, args.drift_after, frozenset({0})),
            state_dir=str(work / "fleet"),
            http_port_base=None,
            feedback=0.75,
            capture={"enabled": True, "rate": 0.25},
        )
        fleet = EmulatedFleet(configs[1:] + configs[:1], say=lambda _: None).start()  # the drifting one last
        try:
            return _watch(service, fleet, args)
        finally:
            fleet.stop()


def _watch(service: Any, fleet: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Poll the collector until every device serves the promoted version (or the retrain run ends without one)."""
    deadline, online_at, run, timeline = time.time() + args.timeout, None, None, None
    while time.time() < deadline:
        fleet.check()
        status = service.store.status()
        if online_at is None and len(status) == args.devices and all(d["online"] for d in status):
            online_at = time.time()
        runs = [r for r in service.store.retrain_runs(limit=100) if r["state"] != "skipped"]
        run = runs[-1] if runs else None
        if run is not None:
            timeline = service.store.timeline(run["alert"])
            if run["state"] in ("failed", "kept", "awaiting"):
                raise SystemExit(f"the retrain run ended {run['state']}: {run['outcome']}")
            version = _promoted_version(timeline)
            if version is not None and len(status) == args.devices:
                if all(d["model_version"] == version for d in status):
                    return _figures(service, timeline, version, time.time(), online_at)
        time.sleep(0.2)
    steps = [(s["step"], s["message"]) for s in (timeline or {}).get("steps", [])]
    raise SystemExit(f"the loop did not finish within {args.timeout:.0f} s; the timeline so far: {steps}")


def _promoted_version(timeline: dict[str, Any] | None) -> int | None:
    for step in (timeline or {}).get("steps", []):
        if step["step"] == "bundle stored":
            return int(step["detail"]["version"])
    return None


def _figures(service: Any, timeline: dict[str, Any], version: int, all_at: float, online_at: float | None):
    alert = service.store.alert(timeline["run"]["alert"])
    opened = alert["opened_at"]
    at = {step["step"]: step["at"] - opened for step in timeline["steps"]}
    rollout_id = next(s["detail"]["rollout"] for s in timeline["steps"] if s["step"] == "rollout started")
    rollout = service.rollouts.status(rollout_id)
    return {
        "version": version,
        "devices_in_rollout": len(rollout["devices"]),
        "alert_to_all_serving_s": all_at - opened,
        "parts_s": {
            "samples exported": at.get("samples exported"),
            "command finished": at.get("command finished"),
            "promoted and stored": at.get("bundle stored"),
            "rollout started": at.get("rollout started"),
            "all serving": all_at - opened,
        },
        "command_s": next(s["detail"]["seconds"] for s in timeline["steps"] if s["step"] == "command finished"),
        "rollout_s": all_at - opened - at["rollout started"],
        "alert_after_all_online_s": None if online_at is None else opened - online_at,
        "steps": [{"step": s["step"], "at_s": s["at"] - opened, "message": s["message"]} for s in timeline["steps"]],
    }


# -- (b), (c), (d): the other benches' own measurements -------------------------------------------------------------


def upload_bytes(work: Path, quick: bool) -> dict[str, float]:
    """bench_samples' bytes per sampled row (gzip'd JSON lines over HTTP), per kind, mean over its devices."""
    import bench_samples

    from edgekit.bundle.keys import generate_keypair

    args = SimpleNamespace(devices=1 if quick else 3, rows=2000 if quick else 20_000, rate=0.05)
    private, public, _ = generate_keypair(work / "keys")
    kinds = bench_samples.bundles(work, private)
    with running_collector(work, "bench-loop-up", api_token=bench_samples.TOKEN) as (broker, service):
        results = [bench_samples.measure(n, k, args, work, public, broker.url, service) for n, k in kinds.items()]
    return {r["kind"]: float(np.mean([d["bytes_per_row"] for d in r["devices"]])) for r in results}


def cbpe_error(work: Path, quick: bool) -> dict[str, float | None]:
    """bench_cbpe's windows (one seed; ``quick``: its quick mode, unshifted and noise only), the estimate's MAE in
    points: on windows under in-support covariate shift (resampled; the issue's target) and on every shifted one
    (noise, occlusion and brightness take the inputs out of the model's support, where no confidence-based estimate
    sees the errors; ``bench_cbpe.py``'s docstring)."""
    import bench_cbpe

    args = SimpleNamespace(rows=1000, windows=4, seeds=1, quick=quick)
    windows = []
    for name, shifts in (("digits", bench_cbpe.DIGIT_SHIFTS), ("cancer", bench_cbpe.CANCER_SHIFTS)):
        model, X, y = bench_cbpe.load_fixture(name, work)
        windows += bench_cbpe.run_fixture(name, model, X, y, shifts, args, 0)
    return {
        "in_support": bench_cbpe.mae_points([w for w in windows if w["family"] == "resampled"]),
        "all_shifted": bench_cbpe.mae_points([w for w in windows if w["family"] != "none"]),
    }


def ab_splits(experiments: int, seed: int = 19) -> dict[str, Any]:
    """bench_ab's simulation through the collector's rule: two equal models (90 %), the false-winner rate and
    the decision time; and a candidate 5 points better, the time a real difference takes to find."""
    import bench_ab

    args = SimpleNamespace(
        experiments=experiments, labels_per_hour=600, check=1.0, min_labels=500, max_days=7.0, alpha=ALPHA
    )
    rng = np.random.default_rng(seed)
    return {"equal": bench_ab.simulate(rng, args, 0.90, 0.90), "better": bench_ab.simulate(rng, args, 0.90, 0.85)}


# -- the run -------------------------------------------------------------------------------------------------------


def checks(loop: dict[str, Any], upload: dict[str, float], cbpe: dict[str, float], ab: dict[str, Any], args):
    import bench_cbpe
    import bench_samples

    equal, better = ab["equal"], ab["better"]
    false_winners = equal["promoted"] + equal["reverted_as_worse"]
    found = [
        (
            f"drift alert -> new version serving on all {args.devices} devices (s)",
            loop["alert_to_all_serving_s"],
            "info",
            True,
        ),
        ("  of which the retraining command (s)", loop["command_s"], "info", True),
        ("  of which the rollout, shadow first (s)", loop["rollout_s"], "info", True),
    ]
    for kind, value in upload.items():
        limit = bench_samples.BYTES_PER_ROW_MAX[kind]
        found.append((f"bytes uploaded per sampled row, {kind}", value, f"<= {limit:.0f}", value <= limit))
    limit, in_support = bench_cbpe.TARGET_MAE_POINTS, cbpe["in_support"]
    if in_support is not None:  # --quick has no resampled windows
        found.append(
            ("CBPE MAE, in-support covariate shift (points)", in_support, f"<= {limit:g}", in_support <= limit)
        )
    found.append(("CBPE MAE, every shifted window, out of support too (points)", cbpe["all_shifted"], "info", True))
    found += [
        (
            f"A/B false-winner rate, equal models, {args.experiments} experiments",
            false_winners,
            f"<= {ALPHA:g}",
            false_winners <= ALPHA,
        ),
        ("A/B decision time, equal models (median h; the time limit is 168)", equal["median_hours"], "info", True),
        ("A/B decision time, candidate 5 points better (median h)", better["median_hours"], "info", True),
    ]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=20, help="emulated devices in the fleet")
    parser.add_argument("--rows-per-second", type=float, default=50, help="each device's traffic")
    parser.add_argument("--drift-after", type=int, default=1500, help="device 0's rows before the hot pixel")
    parser.add_argument("--waves", default="10%,100%", help="the retrain rollout's waves")
    parser.add_argument("--max-iter", type=int, default=600, help="the example command's training epochs")
    parser.add_argument("--experiments", type=int, default=200, help="A/B splits simulated")
    parser.add_argument("--timeout", type=float, default=600, help="seconds (a) may take")
    parser.add_argument("--quick", action="store_true", help="3 devices, a small network: a smoke test")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "bench_loop.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.max_iter, args.experiments, args.drift_after = 3, 100, 40, 600
    started, load, parts = time.time(), os.getloadavg(), {}
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        work = Path(tmp)
        for name, step in (
            ("loop", lambda: alert_to_fleet(work / "loop", args)),
            ("upload", lambda: upload_bytes(work / "upload", args.quick)),
            ("cbpe", lambda: cbpe_error(work / "cbpe", args.quick)),
            ("ab", lambda: ab_splits(args.experiments)),
        ):
            (work / name).mkdir()
            began = time.time()
            parts[name] = step()
            parts[f"{name}_s"] = time.time() - began
    loop = parts["loop"]
    print(f"{'step of the loop':<22}{'s after the alert':>18}")
    for step in loop["steps"]:
        print(f"{step['step']:<22}{step['at_s']:>18.1f}  {step['message'][:90]}")
    print(
        f"{'all devices serving':<22}{loop['alert_to_all_serving_s']:>18.1f}  digits v{loop['version']} on "
        f"{loop['devices_in_rollout']} devices"
    )
    print()
    found = checks(loop, parts["upload"], parts["cbpe"], parts["ab"], args)
    print_checks(found)
    machine = {"cpus": os.cpu_count(), "load_average": load, "load_average_after": os.getloadavg()}
    summary = {"seconds": time.time() - started, "machine": machine}
    steps = {name: parts[f"{name}_s"] for name in ("loop", "upload", "cbpe", "ab")}
    print_run(summary, quick=args.quick, how=f"{args.devices} emulated devices", steps=steps)
    write_json(
        args.json,
        found,
        **summary,
        settings=vars(args),
        loop=loop,
        upload=parts["upload"],
        cbpe=parts["cbpe"],
        ab=parts["ab"],
    )
    return 0 if all(ok for _, _, _, ok in found) else 1


if __name__ == "__main__":
    sys.exit(main())
