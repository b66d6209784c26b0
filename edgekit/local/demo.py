"""``edgekit demo``: the whole loop on one machine, offline, on models made from scikit-learn's datasets.

Host: fixtures (or training anew), convert, the int8 search, validation against scikit-learn, a
signing key, bundles v1 and v2, verified as a device would. Fleet: a local broker (Mosquitto if
installed, otherwise the embedded amqtt), the collector with its dashboard, and N emulated devices
(real agent processes) scoring held-out digits, the first with drift injected, and one more device
serving a typed tabular model (churn: int, float and string columns with missing values) that starts
seeing a country it never saw, and a camera-like device serving an image model (a CNN on digit images
sent as PNG files, decoded and preprocessed on the device) whose pictures get brighter. Once the
fleet is up, v2 is rolled out over the air in two waves, each device shadow-testing it on live rows
before the swap. Then the loop closes (``demo_loop.py``): a hot pixel on emu-00 costs its answers ten
points, the drift alert opens, the collector's retrain sink (configured in the ``alerts.toml`` the demo
writes) has emu-00 upload its field samples, labelled by the emulated app's delayed feedback, runs the
example retraining command, gates the result with ``promote``, and rolls digits v3 out to emu-00 with
shadow; against v3's baseline its windows no longer drift and the alert closes. The fleet table, the
rollout and the retrain's steps are printed as they progress; at the end the final status, the drift,
the alerts, the rollout, the alert's timeline as the store recorded it, and the dashboard URL.
Every process is stopped on exit or Ctrl-C. Each step is the library call its CLI command makes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device_agent.bundle import read_bundle
from device_agent.signing import load_public_key
from edgekit.build.convert import QuantizeOptions, convert_model
from edgekit.build.validate import Thresholds, validate
from edgekit.bundle.keys import generate_keypair
from edgekit.bundle.package import build_bundle
from edgekit.local.broker import start_local_broker
from edgekit.local.emulate import DriftSpec, EmulatedFleet, interrupted, prepare_devices
from edgekit.local.fixtures import fixtures_usable, make_fixtures

Say = Callable[[str], None]
# emu-00: after 4,000 rows (20 s, once v2 is in) a hot pixel in the top row reads 8 levels brighter; v2 answers
# 10 points worse there (96.8 % -> 86.7 % on the held-out digits), so a model retrained on the field can win
DRIFT = DriftSpec(feature="pixel_0_1", shift=8.0, after=4000, devices=frozenset({0}))
FEEDBACK = 0.75  # the digits devices' app sends the true label of 3 rows in 4 back, later (delayed labels)
CAPTURE = {"enabled": True, "rate": 0.25}  # field samples kept on the digits devices, for the retrain sink
# the typed-tabular device: after 600 rows, 30 % of its rows name a country the model never saw
TABULAR_DRIFT = DriftSpec(feature="country", shift=0.3, after=600, devices=frozenset({0}))
# the camera: after 600 images, every picture 40 % brighter (an exposure gone wrong)
CAMERA_DRIFT = DriftSpec(feature="brightness", shift=0.4, after=600, devices=frozenset({0}))


@dataclass(frozen=True)
class DemoResult:
    workdir: Path
    bundle: Path
    validation_passed: bool
    devices: list[dict]
    alerts: list[dict]
    rollout: dict | None = None
    loop: dict | None = None  # the drift alert, its retrain timeline, the rollout, whether it closed (demo_loop)


def run_demo(
    workdir: str | Path,
    *,
    fixtures: str | Path | None = None,
    devices: int = 4,
    duration: float = 60.0,
    broker: str = "auto",
    keep_serving: bool = False,
    say: Say = print,
) -> DemoResult:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bundles, public, test_data, passed = _host_pipeline(workdir, fixtures, say)
    if devices <= 0:
        return DemoResult(workdir, bundles[0], passed, [], [])
    tabular = _tabular_bundle(workdir, public, say)
    camera = _camera_bundle(workdir, public, say)
    status, alerts, rollout, loop = _fleet(
        workdir,
        bundles,
        (tabular, camera),
        public,
        test_data,
        devices=devices,
        duration=duration,
        broker=broker,
        keep_serving=keep_serving,
        say=say,
    )
    return DemoResult(workdir, bundles[0], passed, status, alerts, rollout, loop)


def _host_pipeline(workdir: Path, fixtures: str | Path | None, say: Say) -> tuple[list[Path], Path, Path, bool]:
    data_dir = Path(fixtures) if fixtures and fixtures_usable(fixtures, ("digits",)) else workdir / "fixtures"
    if data_dir == workdir / "fixtures" and not fixtures_usable(data_dir, ("digits",)):
        say(f"[1/8] training the digits model (StandardScaler + MLP) from scikit-learn's bundled dataset -> {data_dir}")
        make_fixtures(data_dir, ("digits",))
    else:
        say(f"[1/8] using the digits fixtures in {data_dir}")
    model, train, test = data_dir / "digits.joblib", data_dir / "digits_train.npz", data_dir / "digits_test.npz"
    fp32, int8 = workdir / "digits.onnx", workdir / "digits.int8.onnx"
    convert_model(str(model), str(fp32), names_from=str(train))
    outcome = convert_model(
        str(model),
        str(int8),
        quantize=QuantizeOptions(max_accuracy_drop=0.01),
        calibration=str(train),
        evaluation=str(test),
    )
    say(f"[2/8] converted {model.name} to ONNX ({fp32.stat().st_size:,} bytes); int8 search: {outcome.search.verdict}")
    report = validate(
        str(int8),
        reference_path=str(model),
        data_path=str(test),
        thresholds=Thresholds(max_accuracy_drop=0.01, min_agreement=0.99),
    )
    report_path = workdir / "validation.json"
    report_path.write_text(json.dumps(report, indent=1, default=str))
    say(
        f"[3/8] validated against scikit-learn on {report['rows']} held-out rows: "
        f"accuracy {report['reference']['metric']:.4f} -> {report['candidate']['metric']:.4f}, "
        f"agreement {report['agreement']:.4f}, {'PASSED' if report['passed'] else 'FAILED'}"
    )
    private, public, key_id = generate_keypair(workdir / "keys", force=True)
    bundles = []
    for version, source in ((1, int8), (2, fp32)):
        bundle = workdir / f"digits-{version}.edgebundle"
        build_bundle(
            str(source),
            name="digits",
            version=version,
            baseline_path=str(train),
            key_path=str(private),
            output=str(bundle),
            report_path=str(report_path) if source == int8 else None,
        )
        bundles.append(bundle)
    opened = read_bundle(bundles[0], load_public_key(public))
    say(
        f"[4/8] packaged and signed digits v1 ({bundles[0].stat().st_size:,} B) "
        f"and v2 ({bundles[1].stat().st_size:,} B) with key {key_id}; "
        f"v1 verified as a device would: {len(opened.members)} members match their sha256"
    )
    return bundles, public, test, bool(report["passed"])


def _tabular_bundle(workdir: Path, public: Path, say: Say) -> tuple[Path, Path]:
    """churn v1: a DataFrame pipeline (7 number columns, 3 string columns, missing values) in front of
    HistGradientBoosting, converted, checked against scikit-learn and packaged: ``(bundle, test.csv)``."""
    from edgekit.local.churn import make_churn

    paths = make_churn(workdir / "churn")
    onnx = workdir / "churn.onnx"
    convert_model(paths["churn_hgb"], str(onnx))
    report = validate(str(onnx), reference_path=paths["churn_hgb"], data_path=paths["test_csv"])
    bundle = workdir / "churn-1.edgebundle"
    build_bundle(
        str(onnx),
        name="churn",
        version=1,
        baseline_path=paths["train_csv"],
        label="label",
        key_path=str(public.with_suffix(".key")),
        output=str(bundle),
    )
    say(
        f"      and churn v1, a typed table (ints, floats, strings, missing values) in front of "
        f"HistGradientBoosting: agreement with scikit-learn {report['agreement']:.4f}, "
        f"max |Δp| {report['max_abs_diff']:.1e} on {report['rows']} rows"
    )
    return bundle, Path(paths["test_csv"])


def _camera_bundle(workdir: Path, public: Path, say: Say) -> tuple[Path, Path]:
    """cam v1: a CNN trained on the digits' 8x8 images, fed PNG files that the device decodes and
    preprocesses itself (the TOML stored in the bundle), drift sketched on its pixels and embedding."""
    from edgekit.local.tensor_fixtures import make_digits_cnn

    paths = make_digits_cnn(workdir / "camera")
    onnx = workdir / "cam.onnx"
    convert_model(paths["model"], str(onnx), preprocess=paths["preprocess"])
    report = validate(str(onnx), reference_path=paths["model"], data_path=paths["test"])
    bundle = workdir / "cam-1.edgebundle"
    build_bundle(
        str(onnx),
        name="cam",
        version=1,
        baseline_path=paths["images"],
        labels=paths["labels"],
        key_path=str(public.with_suffix(".key")),
        output=str(bundle),
    )
    say(
        f"      and cam v1, a CNN on digit images (PNG decoded and preprocessed on the device, "
        f"{paths['parameters']:,} parameters): accuracy {report['candidate']['metric']:.4f} on "
        f"{report['rows']} held-out images"
    )
    return bundle, Path(paths["images"])


def _fleet(
    workdir: Path,
    bundles: list[Path],
    extra: tuple[tuple[Path, Path], tuple[Path, Path]],
    public: Path,
    test_data: Path,
    *,
    devices: int,
    duration: float,
    broker: str,
    keep_serving: bool,
    say: Say,
) -> tuple[list[dict], list[dict], dict | None, dict | None]:
    from edgekit.local.demo_loop import LoopWatch

    local = start_local_broker(workdir / "broker", prefer="amqtt" if broker == "amqtt" else "mosquitto")
    collector = fleet = None
    try:
        say(f"[5/8] broker: {local.kind} at {local.url}")
        collector = _fleet_service(workdir, public, local.url, local.port, bundles[1], test_data).start()
        dashboard = f"http://127.0.0.1:{collector.server.server_address[1]}/"
        configs = _device_configs(workdir, bundles[0], extra, public, local.url, test_data, devices)
        fleet = EmulatedFleet(configs, say=lambda _: None).start()
        say(
            f"[6/8] collector and dashboard at {dashboard}; {devices} emulated devices scoring 200 rows/s each, "
            f"{DRIFT.feature} shifted by {DRIFT.shift:g} on emu-00 after {DRIFT.after} rows, "
            f"{FEEDBACK:.0%} of the digits rows labelled later by their app; "
            f"tab-00 serves churn, {TABULAR_DRIFT.shift:.0%} of its rows naming an unseen country "
            f"after {TABULAR_DRIFT.after}; cam-00 serves cam, its images {CAMERA_DRIFT.shift:.0%} brighter "
            f"after {CAMERA_DRIFT.after}; "
            f"running {duration:.0f} s (Ctrl-C stops early)"
        )
        loop = LoopWatch("emu-00", say)
        with interrupted() as stop:
            rollout = _run_fleet(
                collector, fleet, bundles[1], loop, devices=devices + 2, duration=duration, stop=stop, say=say
            )
            fleet.stop()
            fleet = None
            collector.drain()
            time.sleep(1.0)
            collector.drain()
            collector.alerts.evaluate()
            status, alerts = collector.store.status(), collector.store.alerts(open_only=True)
            closed = loop.result(collector)
            _final_report(status, alerts, rollout, closed, dashboard, keep_serving, say)
            if keep_serving:
                say("serving the dashboard until Ctrl-C")
                stop.wait()
            return status, alerts, rollout, closed
    finally:
        if fleet is not None:
            fleet.stop()
        if collector is not None:
            collector.stop()
        local.stop()


def _device_configs(
    workdir: Path,
    bundle: Path,
    extra: tuple[tuple[Path, Path], tuple[Path, Path]],
    public: Path,
    broker: str,
    test_data: Path,
    devices: int,
) -> list[Path]:
    """The emulated devices: ``devices`` scoring digits (fleet "demo"), tab-00 scoring churn and cam-00
    scoring digit images, each in its own fleet (the digits rollout is not for them)."""
    tabular, camera = extra
    common = {
        "pubkey": str(public),
        "broker": broker,
        "window_rows": 200,
        "window_seconds": 10,
        "rows_per_second": 200,
        "state_dir": str(workdir / "fleet"),
        "http_port_base": None,
    }
    digits = prepare_devices(
        devices=devices,
        bundle=str(bundle),
        data=str(test_data),
        fleet="demo",
        drift=DRIFT,
        feedback=FEEDBACK,
        capture=CAPTURE,
        **common,
    )
    churn = prepare_devices(
        devices=1,
        bundle=str(tabular[0]),
        data=str(tabular[1]),
        fleet="demo-tabular",  # its own fleet: the digits rollout is not for it
        drift=TABULAR_DRIFT,
        prefix="tab",
        **common,
    )
    cam = prepare_devices(
        devices=1,
        bundle=str(camera[0]),
        data=str(camera[1]),
        fleet="demo-camera",
        drift=CAMERA_DRIFT,
        prefix="cam",
        **{**common, "rows_per_second": 50},  # a camera's frame rate, not a table's
    )
    return digits + churn + cam


def _fleet_service(workdir: Path, public: Path, broker_url: str, broker_port: int, champion: Path, test_data: Path):
    """The demo's collector: its dashboard on a free port, the demo key trusted, the rules and the retrain sink of
    the ``alerts.toml`` the demo writes (read as ``fleet collect --alerts`` reads it): alerts after 3 drifted
    windows, the retrain sink's champion digits v2, gated on ``test_data``."""
    from edgekit.fleet.alerts import load_alert_config
    from edgekit.fleet.config import CollectorConfig
    from edgekit.fleet.service import FleetService
    from edgekit.local.demo_loop import write_alerts

    train, key = test_data.with_name("digits_train.npz"), public.with_suffix(".key")
    alerts_toml = write_alerts(workdir, champion=champion, gate=test_data, train=train, key=key)
    config = CollectorConfig(
        broker=broker_url,
        db=str(workdir / "fleet.db"),
        http="127.0.0.1:0",
        client_id=f"edgekit-demo-{broker_port}",
        trust=str(public),
    )
    rules, sinks = load_alert_config(alerts_toml)
    return FleetService(config, alert_rules=rules, alert_sinks=sinks)


def _final_report(
    status: list[dict],
    alerts: list[dict],
    rollout: dict | None,
    loop: dict | None,
    dashboard: str,
    keep_serving: bool,
    say: Say,
) -> None:
    from edgekit.fleet.timeline_text import timeline_lines
    from edgekit.text import table

    say("[8/8] final fleet status: (the emulated devices were stopped first, so their last windows are in)")
    say(
        table(
            [
                [
                    d["device"],
                    "online" if d["online"] else "stopped",
                    f"{d['model']} v{d['model_version']}",
                    d["windows"],
                    d["rows"],
                    "DRIFTED" if d["drifted"] else "no",
                    d["worst_feature"] or "-",
                    d["missing_seqs"],
                ]
                for d in status
            ],
            ["device", "state", "model", "windows", "rows", "drift", "worst feature", "missing"],
        )
    )
    say("open alerts: " + (_alerts_text(alerts) or "none"))
    if rollout is not None:
        say(
            f"rollout {rollout['id']}: {rollout['state']} ({rollout['reason']}); "
            f"see {dashboard}rollouts/{rollout['id']}"
        )
    if loop is not None:
        for line in timeline_lines(loop, f"; also at {dashboard}alerts/{loop['alert']['id']}/timeline"):
            say(line)
    else:
        say("the loop: no retrain ran (the drift alert on emu-00 did not open before the demo ended)")
    say(
        f"dashboard: {dashboard} (fleet table, per-device drift, fleet-wide drift at {dashboard}drift, "
        f"rollouts at {dashboard}rollouts, retrains at {dashboard}retrains); "
        + (
            "it stays up until Ctrl-C"
            if keep_serving
            else "it closes with the demo: pass --keep-serving to browse it afterwards"
        )
    )


def _alerts_text(alerts: list[dict]) -> str:
    """Open alerts, one clause per rule and device: a camera whose pictures got brighter drifts on a
    dozen of its signals at once, and one line per signal would bury the other devices."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for alert in alerts:
        grouped.setdefault((alert["rule"], alert["device"]), []).append(alert)
    clauses = []
    for (rule, device), group in grouped.items():
        if len(group) == 1:
            clauses.append(f"{rule} {device} {group[0]['subject']}: {group[0]['message']}")
        else:
            names = ", ".join(a["subject"] for a in group[:6]) + (", …" if len(group) > 6 else "")
            clauses.append(f"{rule} {device} on {len(group)} features ({names})")
    return "; ".join(clauses)


ROLLOUT_SETTINGS = {
    "waves": "50%,100%",
    "shadow_rows": 200,
    "health_seconds": 3,
    "abort_on": "failed>20%,agreement<0.95",
}
LOOP_GRACE = 150.0  # past --duration, the demo waits this long at most for v2's rollout and the loop to finish


def _run_fleet(
    collector, fleet, bundle_v2: Path, loop, *, devices: int, duration: float, stop, say: Say
) -> dict | None:
    """Run the fleet for ``duration`` at least, and until v2's rollout has finished and the loop has closed (or
    cannot: ``LoopWatch.done``), for ``LOOP_GRACE`` more at most. v2 is rolled out (what 'edgekit rollout start'
    asks the collector to do) as soon as every device is online, before emu-00's drift begins: the retrain
    sink's rollout waits for a fleet's running rollout, but a drifted device would shadow-test v2 on rows v1
    and v2 both get wrong."""
    started = time.monotonic()
    deadline, next_line, rollout_id, last_line = started + duration, started + 5, None, ""
    while not stop.is_set():
        now = time.monotonic()
        rollout = collector.rollouts.status(rollout_id) if rollout_id else None
        finished = rollout is not None and rollout["state"] not in ("running", "paused")
        if now >= deadline and ((finished and loop.done(collector)) or now >= deadline + LOOP_GRACE):
            return rollout
        fleet.check()
        stop.wait(0.5)
        if rollout_id is None and _all_online(collector, devices):
            rollout_id = _start_v2(collector, bundle_v2, say)
        if rollout is not None:
            line = f"      rollout: {rollout['state']}, wave {rollout['wave']}/{len(rollout['waves'])}: " + ", ".join(
                f"{d['device']} {d['state']}" for d in rollout["devices"]
            )
            if line != last_line:
                say(line)
                last_line = line
        loop.poll(collector)
        if time.monotonic() >= next_line:
            next_line += 5
            say(
                "      "
                + "  ".join(
                    f"{d['device']}: v{d['model_version']} {d['windows']} windows{' DRIFTED' if d['drifted'] else ''}"
                    for d in collector.store.status()
                )
            )
    return collector.rollouts.status(rollout_id) if rollout_id else None


def _all_online(collector, devices: int) -> bool:
    status = collector.store.status()
    return len(status) == devices and all(d["online"] for d in status)


def _start_v2(collector, bundle_v2: Path, say: Say) -> str:
    from edgekit.fleet.rollouts import start_from_request

    uploaded = collector.rollouts.add_bundle(bundle_v2.read_bytes())
    rollout_id = start_from_request(
        collector.rollouts, {"sha256": uploaded["sha256"], "fleet": "demo", **ROLLOUT_SETTINGS}
    )
    say(
        f"[7/8] rolling out digits v2 ({rollout_id}): waves {ROLLOUT_SETTINGS['waves']}, "
        f"each device scores {ROLLOUT_SETTINGS['shadow_rows']} live rows with v2 beside v1 before swapping, "
        f"then watches its health for {ROLLOUT_SETTINGS['health_seconds']} s; then the drift on emu-00 "
        "starts, and the collector's retrain sink answers its alert (steps below as they are recorded)"
    )
    return rollout_id
