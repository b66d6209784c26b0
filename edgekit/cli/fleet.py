"""``edgekit fleet``: collect, status, drift, retention, alerts, samples."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

from edgekit.cli.common import emit_json, fmt, json_option
from edgekit.cli.rollout import COLLECTOR_OPTION
from edgekit.fleet.alerts import load_alert_config
from edgekit.fleet.config import CollectorConfig, read_token_file
from edgekit.fleet.leader import LEADER_LEASE, describe_lease
from edgekit.fleet.merge import MERGED_MIN_PSI, merged_drift, since_timestamp
from edgekit.fleet.pages.drift import resolutions
from edgekit.fleet.service import FleetService
from edgekit.fleet.store import SqlStore, StoreError, is_postgres_url, open_store
from edgekit.text import table

DB_OPTION = click.option(
    "--db",
    default="fleet.db",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The fleet database: a SQLite file, or postgresql://user@host/db (postgres extra).",
)


def register(cli: click.Group) -> None:
    cli.add_command(fleet)


@click.group()
def fleet():
    """Collect device summaries, and show the fleet, its drift and its alerts.

    \b
    Example:
      edgekit fleet collect --broker mqtt://127.0.0.1:1883 --db fleet.db --http 127.0.0.1:8480
    """


@fleet.command()
@click.option(
    "--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="MQTT broker URL (mqtt:// or mqtts://)."
)
@DB_OPTION
@click.option(
    "--http",
    default="127.0.0.1:8480",
    show_default=True,
    help="Dashboard, JSON API and /metrics address ('' to disable).",
)
@click.option(
    "--alerts",
    "alerts_file",
    type=click.Path(dir_okay=False),
    help="alerts.toml: rule thresholds and sinks (webhook, command).",
)
@click.option(
    "--group",
    default="edgekit",
    show_default=True,
    help="Shared-subscription group: collectors in one group split the fleet.",
)
@click.option(
    "--client-id",
    default="edgekit-collector",
    show_default=True,
    help="MQTT client id; keep it stable so the broker keeps the session. It names this collector as leader too.",
)
@click.option(
    "--devices-file",
    type=click.Path(dir_okay=False),
    help="Known device ids, one per line; others are rejected as unknown-device.",
)
@click.option(
    "--trust",
    type=click.Path(exists=True, dir_okay=False),
    help="The fleet's public key: rollout bundles must verify against it.",
)
@click.option(
    "--bundle-dir", type=click.Path(file_okay=False), help="Where uploaded bundles are kept (default: beside --db)."
)
@click.option("--public-url", help="Base URL devices download bundles from (default: the --http address).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes storing summaries (MQTT 5 brokers): one takes about 3,500 a second; 3 took 6,000+ on 2 cores.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM certificate: serve the dashboard and API over HTTPS (with --tls-key).",
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="The certificate's unencrypted PEM key.")
@click.option(
    "--http-limit",
    "http_limits",
    multiple=True,
    metavar="NAME=VALUE",
    help="An HTTP limit, as in agent.toml's [server]: header_timeout (10 s), body_timeout (600 s), "
    "idle_timeout (30 s), max_connections (100), max_body_bytes (1 GiB), max_header_bytes (64 KiB), threads (4). "
    "Repeatable.",
)
@click.option(
    "--retention",
    metavar="raw=7d,hourly=90d,daily=forever",
    help="Bounded history, applied by the leader (default: what 'edgekit fleet retention' stored, else keep all).",
)
@click.option(
    "--session-expiry",
    type=click.IntRange(0, 0xFFFFFFFE),
    default=120,
    show_default=True,
    help="Seconds the broker keeps this collector's session after it disconnects: a restart within it loses "
    "nothing queued; a collector gone for good stops taking a share of the group after it.",
)
@click.option(
    "--gap-retry",
    type=click.FloatRange(min=1.0),
    default=30.0,
    show_default=True,
    help="Seconds between requests for a missing window, until it arrives.",
)
@click.option(
    "--device-token-file",
    type=click.Path(dir_okay=False),
    help="A file holding the devices' token (or EDGEKIT_DEVICE_TOKEN): taken only on bundle downloads and "
    "field-sample uploads, so a device never holds the operators' EDGEKIT_COLLECTOR_TOKEN. Needs that set too.",
)
@click.option("--duration", type=float, help="Stop after this many seconds (default: until Ctrl-C).")
def collect(
    broker,
    db,
    http,
    alerts_file,
    group,
    client_id,
    devices_file,
    trust,
    bundle_dir,
    public_url,
    workers,
    tls_cert,
    tls_key,
    http_limits,
    retention,
    session_expiry,
    gap_retry,
    device_token_file,
    duration,
):
    """Run the collector: ingest, store, request missing windows, alert, serve the dashboard.

    \b
    Example:
      edgekit fleet collect --broker mqtt://127.0.0.1:1883 --db fleet.db --http 127.0.0.1:8480 \\
          --alerts alerts.toml --trust keys/edgekit.pub
    """
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together: give both PEM files to serve HTTPS, or neither")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rules, sinks = load_alert_config(alerts_file)
    config = CollectorConfig(
        broker=broker,
        db=db,
        http=http or None,
        group=group,
        client_id=client_id,
        allowed_devices=_known_devices(devices_file),
        trust=trust,
        bundle_dir=bundle_dir,
        public_url=public_url,
        api_token=os.environ.get("EDGEKIT_COLLECTOR_TOKEN"),
        device_token=_device_token(device_token_file),
        workers=workers,
        http_limits=_http_limits(http_limits),
        tls_cert=tls_cert,
        tls_key=tls_key,
        retention=retention,
        session_expiry_seconds=session_expiry,
        gap_retry_seconds=gap_retry,
    )
    collector = FleetService(config, alert_rules=rules, alert_sinks=sinks).start()
    stop = _stopped_by_signals()
    click.echo(_collecting_line(broker, db, workers, collector.server))
    stop.wait(duration)
    collector.stop()


def _collecting_line(broker: str, db: str, workers: int, server) -> str:
    return (
        f"collecting from {broker} into {_redacted(db)}"
        + (f" with {workers} processes" if workers > 1 else "")
        + (f"; dashboard at {server.scheme}://{server.server_address[0]}:{server.server_address[1]}/" if server else "")
    )


def _device_token(token_file: str | None) -> str | None:
    """The token devices use on the routes they call: ``--device-token-file``, else ``EDGEKIT_DEVICE_TOKEN``."""
    if token_file:
        return read_token_file(token_file, "--device-token-file")
    return os.environ.get("EDGEKIT_DEVICE_TOKEN") or None


@fleet.command()
@click.option("--fleet", "fleet_name", default="default", show_default=True, help="The fleet the devices belong to.")
@click.option("--devices", required=True, help="Comma-separated device ids.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for passwd, acl, mosquitto.conf and credentials/.",
)
@click.option("--rotate", is_flag=True, help="New passwords for every user, not only new devices.")
def provision(fleet_name, devices, out, rotate):
    """Per-device MQTT credentials (Mosquitto password file) and an ACL confining each device to its topics.

    \b
    Example:
      edgekit fleet provision --fleet default --devices pi-kitchen-01,pi-hall-02 --out broker/
    """
    from edgekit.fleet.provision import provision as run

    result = run(out, fleet=fleet_name, devices=[d.strip() for d in devices.split(",") if d.strip()], rotate=rotate)
    click.echo(
        f"wrote {result.directory}/passwd, acl and mosquitto.conf for {len(result.devices)} device(s) "
        f"and the collector; new passwords for: {', '.join(result.created) or 'none'} "
        f"(in {result.directory}/credentials/, mode 0600)"
    )
    click.echo(f"add to the broker's config: include_dir or the lines of {result.directory}/mosquitto.conf")


@fleet.command()
@DB_OPTION
@json_option
def status(db, as_json):
    """One row per device: online, model, windows, rows, latest drift verdict, worst feature.

    \b
    Example:
      edgekit fleet status --db fleet.db --json
    """
    with _existing_store(db) as store:
        devices = store.status()
        rejects = store.rejects()
        lease = store.lease(LEADER_LEASE)
    if as_json:
        emit_json(devices)
        return
    rows = [
        [
            d["device"],
            d["fleet"],
            "online" if d["online"] else "offline" if d["online"] is False else "?",
            f"{d['model']} v{d['model_version']}",
            _ago(d["last_seen"]),
            d["windows"],
            d["rows"],
            "DRIFTED" if d["drifted"] else "no" if d["drifted"] is False else "-",
            d["worst_feature"] or "-",
            d["missing_seqs"],
            d["rejected"],
        ]
        for d in devices
    ]
    click.echo(
        table(
            rows,
            [
                "device",
                "fleet",
                "state",
                "model",
                "last seen",
                "windows",
                "rows",
                "drift",
                "worst feature",
                "missing",
                "rejected",
            ],
        )
    )
    if rejects:
        click.echo("rejected payloads: " + ", ".join(f"{reason} {count}" for reason, count in sorted(rejects.items())))
    click.echo(_leader_line(describe_lease(lease)))


@fleet.command()
@DB_OPTION
@json_option
def leader(db, as_json):
    """Which collector leads (runs alerts, gap requests and rollouts), since when, and its lease.

    Every collector on the database ingests; one holds the leader lease. JSON: holder, held, token (the
    fencing token, raised at every change of leader), since, expires_in (seconds, by the database's clock).

    \b
    Example:
      edgekit fleet leader --db postgresql://edgekit@db.internal/fleet --json
    """
    with _existing_store(db) as store:
        found = describe_lease(store.lease(LEADER_LEASE))
    if as_json:
        emit_json(found)
        return
    click.echo(_leader_line(found))


def _leader_line(lease: dict) -> str:
    if lease["holder"] is None:
        return "leader: none yet (no collector has run on this database)"
    since = datetime.fromtimestamp(lease["since"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if not lease["held"]:
        return (
            f"leader: none (the lease of {lease['holder']} ran out {-lease['expires_in']:.0f} s ago); "
            "alerts, gap requests and rollouts wait for a collector to take it"
        )
    return (
        f"leader: {lease['holder']} since {since} ({_ago(lease['since'])}; "
        f"lease token {lease['token']}, {lease['expires_in']:.0f} s left)"
    )


@fleet.command()
@DB_OPTION
@click.option("--device", help="Only this device.")
@click.option("--model", help="Only this model name.")
@click.option("--version", type=int, help="Only this model version.")
@click.option("--since", help="Only windows ending within this long ago: 30m, 1h, 2d.")
@json_option
def drift(db, device, model, version, since, as_json):
    """Drift of merged windows against their baseline: per device, model version, fleet, time range.

    \b
    Example:
      edgekit fleet drift --model digits --version 3 --since 1h
    """
    with _existing_store(db) as store:
        reports = merged_drift(store, device=device, model=model, version=version, since=since_timestamp(since))
    if as_json:
        emit_json([{k: v for k, v in r.items() if k != "feature_distributions"} for r in reports])
        return
    if not reports:
        click.echo("no windows match")
    for report in reports:
        versions = ", ".join(f"v{v}" for v in report["model_versions"])
        header = (
            f"{report['model']} {versions}: {report['windows']} windows, {report['rows']:,} rows "
            f"from {len(report['devices'])} device(s), {report['first']} … {report['last']}"
        )
        click.echo(header)
        click.echo(f"  {resolutions(report)}")
        if report["drift"] is None:
            click.echo(f"  {report['note']}")
            continue
        features = sorted(report["drift"]["features"].items(), key=lambda kv: -kv[1]["psi"])[:10]
        rows = [
            [name, fmt(v["psi"]), fmt(v["ks"]), fmt(v["js"]), "DRIFTED" if v["drifted"] else "no"]
            for name, v in features
        ]
        if report["drift"].get("prediction"):
            p = report["drift"]["prediction"]
            rows.append(
                ["(prediction)", fmt(p["psi"]), fmt(p["ks"]), fmt(p["js"]), "DRIFTED" if p["drifted"] else "no"]
            )
        click.echo(table(rows, ["feature", "psi", "ks", "js", "verdict"]))
        click.echo(
            f"  merged verdict: {'DRIFTED' if report['drift']['drifted'] else 'no drift'} "
            f"(significant at family-wise alpha {report['drift']['alpha']} and PSI >= {MERGED_MIN_PSI}: "
            "merged windows make every difference significant)\n"
        )


@fleet.command()
@DB_OPTION
@click.option("--raw", help="Keep raw windows this long (default 7d; at least 1h): 36h, 7d, 2w, or forever.")
@click.option("--hourly", help="Then hourly merged buckets this long (default 90d), or forever.")
@click.option("--daily", help="Then daily merged buckets this long (default forever).")
@json_option
def retention(db, raw, hourly, daily, as_json):
    """Bound the history: roll raw windows into hourly, then daily, merged profiles, now and from now on.

    Stores the policy in the database (the collector's leader applies it every few minutes) and runs one
    pass now. Without --raw/--hourly/--daily, runs the stored policy. Merged drift over any range stays
    exact: windows of one baseline add.

    \b
    Example:
      edgekit fleet retention --db fleet.db --raw 7d --hourly 90d --daily forever
    """
    from edgekit.fleet.retention import RetentionPolicy, run_pass

    with _existing_store(db) as store:
        now = time.time()
        if raw is None and hourly is None and daily is None:
            stored = store.retention_policy()
            if stored is None:
                raise StoreError("no retention policy is stored", "give --raw, --hourly and --daily (e.g. --raw 7d)")
            policy = RetentionPolicy.from_dict(stored)
        else:
            policy = RetentionPolicy.parse(raw, hourly, daily)
            store.set_retention_policy(policy.to_dict(), now)
        result = run_pass(store, policy, now)
        sizes = store.history_sizes()
    if as_json:
        emit_json({**vars(result), "kept": sizes})
        return
    click.echo(f"retention {policy.describe()} (stored: the collector's leader applies it)")
    click.echo(result.describe())
    click.echo(f"kept: {sizes['raw']} raw window(s), {sizes['hour']} hourly and {sizes['day']} daily bucket(s)")


@fleet.command()
@DB_OPTION
@click.option("--all", "show_all", is_flag=True, help="Closed alerts too.")
@json_option
def alerts(db, show_all, as_json):
    """Open alerts (drift, prediction shift, null rate, latency, errors, offline, accuracy).

    \b
    Example:
      edgekit fleet alerts --db fleet.db --json
    """
    with _existing_store(db) as store:
        found = store.alerts(open_only=not show_all)
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no open alerts" if not show_all else "no alerts")
        return
    click.echo(
        table(
            [
                [a["id"], a["state"], a["rule"], a["device"], a["subject"], _ago(a["opened_at"]), a["message"]]
                for a in found
            ],
            ["id", "state", "rule", "device", "subject", "opened", "message"],
        )
    )


@fleet.command()
@click.argument("alert_id", type=int)
@DB_OPTION
@json_option
def timeline(alert_id, db, as_json):
    """One alert's loop: its retrain run's steps (samples, training, promote, rollout), the rollout's end and
    the alert's closing, as the fleet store recorded them (ids: `edgekit fleet alerts --all`).

    \b
    Example:
      edgekit fleet timeline 4 --db fleet.db
    """
    from edgekit.fleet.timeline_text import alert_loop, timeline_lines

    with _existing_store(db) as store:
        loop = alert_loop(store, alert_id)
    if loop is None:
        raise click.BadParameter(f"no alert {alert_id}; 'edgekit fleet alerts --all' lists them", param_hint="ALERT_ID")
    if as_json:
        emit_json(loop)
        return
    if loop["run"] is None:
        click.echo(f"alert {alert_id} ({loop['alert']['rule']} on {loop['alert']['device']}): no retrain ran for it")
        return
    click.echo("\n".join(timeline_lines(loop, "")))


@fleet.command()
@click.option("--device", required=True, help="The device whose kept rows to fetch.")
@click.option("--since", help="Only rows answered within this long ago: 30m, 2h, 7d (default: all it kept).")
@click.option("--drifted-only", is_flag=True, help="Only rows of windows judged drifted.")
@click.option(
    "--labelled-only",
    is_flag=True,
    help="Only rows whose label has arrived: the file for promote --data, validate --data and convert --eval "
    "(a --baseline counts unlabelled rows too, so leave it off there).",
)
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="A .csv, .npz or .parquet file."
)
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the upload.")
@COLLECTOR_OPTION
@json_option
def samples(device, since, drifted_only, labelled_only, out, timeout, collector, as_json):
    """Fetch the field rows a device kept ([capture] in its agent.toml), with the delayed labels it got, through
    a running collector, and write them to a file. Every command that reads data (promote, validate, package
    --baseline, convert --eval) reads this file as it is: its features and label, never its metadata columns.

    \b
    Example:
      edgekit fleet samples --device pi-kitchen-01 --since 2h --drifted-only --labelled-only -o field.csv
    """
    from edgekit.fleet.client import CollectorClient
    from edgekit.fleet.samples import check_export_path, collect_samples, export_samples

    check_export_path(out)  # a path that cannot be written is refused before the device is asked
    doc = collect_samples(
        CollectorClient(collector),
        device=device,
        since=since,
        drifted_only=drifted_only,
        timeout=timeout,
        say=(lambda line: None) if as_json else lambda line: click.echo(line, err=True),
    )
    written = export_samples(doc, out, labelled_only=labelled_only)
    if as_json:
        emit_json({**written, "upload": doc["upload"]["id"], "capture": (doc.get("header") or {}).get("capture")})
        return
    left_out = f" ({written['left_out']} without one left out)" if labelled_only else ""
    click.echo(f"wrote {written['rows']} row(s) of {device}, {written['labelled']} with a label{left_out}, to {out}")
    if (doc.get("header") or {}).get("capture") is False:
        click.echo(f"{device} keeps no field rows: set [capture] enabled = true in its agent.toml", err=True)


def _stopped_by_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set: the collector stops cleanly on either."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _ago(timestamp) -> str:
    if not timestamp:
        return "-"
    seconds = time.time() - timestamp
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _redacted(db: str) -> str:
    """A database URL fit to print: without its password."""
    if not is_postgres_url(db):
        return db
    parsed = urlsplit(db)
    if parsed.password is None:
        return db
    return urlunsplit(parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)))


def _existing_store(db: str) -> SqlStore:
    """The reading commands open a database a collector made; a mistyped path must not look like an empty fleet."""
    if not is_postgres_url(db) and (not Path(db).is_file() or Path(db).stat().st_size == 0):
        raise StoreError("no fleet database here", "pass the --db that 'edgekit fleet collect' writes to", path=db)
    return open_store(db)


def _http_limits(pairs: tuple[str, ...]) -> dict[str, float]:
    """``--http-limit NAME=VALUE`` options, checked against the limits there are."""
    from device_agent.config import HttpLimits

    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE, e.g. header_timeout=5", param_hint="--http-limit")
        values[name.strip()] = value.strip()
    try:
        HttpLimits().with_values(values)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--http-limit") from None
    return {name: float(value) for name, value in values.items()}


def _known_devices(path: str | None) -> frozenset[str] | None:
    """``--devices-file``: one device id a line, ``#`` comments; None without the option (any device)."""
    if not path:
        return None
    with open(path) as handle:
        return frozenset(line.strip() for line in handle if line.strip() and not line.startswith("#"))
