"""``edgekit rollout``: start, watch, pause, resume, abort and roll back OTA rollouts (via the collector)."""

from __future__ import annotations

import time

import click

from edgekit.cli.common import EXIT_THRESHOLD, emit_json, exit_with, json_option
from edgekit.fleet.client import DEFAULT_COLLECTOR, CollectorClient
from edgekit.fleet.rollout_spec import AB_ALPHA, AB_MIN_LABELS, DEFAULT_ABORT_ON
from edgekit.text import table

COLLECTOR_OPTION = click.option(
    "--collector",
    default=DEFAULT_COLLECTOR,
    show_default=True,
    envvar="EDGEKIT_COLLECTOR",
    help="The collector's HTTP address (EDGEKIT_COLLECTOR_TOKEN holds its API token, if any).",
)
FINISHED = ("succeeded", "aborted", "failed")


def register(cli: click.Group) -> None:
    cli.add_command(rollout)


@click.group()
def rollout():
    """Roll a signed bundle out to a fleet in waves, gated on self-test, shadow agreement and health.

    \b
    Example:
      edgekit rollout start digits-4.edgebundle --fleet default --waves 10%,50%,100% --shadow-rows 500
    """


AB_OPTIONS = (
    click.option(
        "--ab",
        metavar="P%",
        help="A/B split: hold with P% of the devices on the new bundle until delayed labels show a significant "
        "winner (promote it to the rest) or the champion wins or --ab-max-duration passes (revert).",
    ),
    click.option(
        "--ab-min-labels",
        default=AB_MIN_LABELS,
        show_default=True,
        type=click.IntRange(min=1),
        help="Labels each arm needs before the test may decide.",
    ),
    click.option(
        "--ab-max-duration",
        default="7d",
        show_default=True,
        help="How long the split may hold; then the champion stays unless the candidate won (30m, 12h, 7d).",
    ),
    click.option(
        "--ab-alpha",
        default=AB_ALPHA,
        show_default=True,
        type=click.FloatRange(0, 0.5, min_open=True, max_open=True),
        help="The test's false-winner rate (a sequential test: valid however long the split holds).",
    ),
)


def _ab_options(command):
    for option in reversed(AB_OPTIONS):
        command = option(command)
    return command


@rollout.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--fleet", default="default", show_default=True, help="The fleet to update.")
@click.option("--devices", default="*", show_default=True, help="Only devices whose id matches this glob, e.g. 'pi-*'.")
@click.option(
    "--waves", default="10%,50%,100%", show_default=True, help="Cumulative shares of the devices, one wave each."
)
@click.option(
    "--wave-wait",
    default="0",
    show_default=True,
    help="Soak time after a wave finishes before the next starts (30s, 5m).",
)
@click.option(
    "--abort-on",
    default=DEFAULT_ABORT_ON,
    show_default=True,
    help="Abort and revert when any rule trips: failed>20%, agreement<0.98, p99_ms>50, drift>30% ('' for none).",
)
@click.option(
    "--shadow-rows",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Live rows each device scores with the candidate beside the serving model before swapping "
    "(0: no shadow phase).",
)
@click.option(
    "--health-seconds",
    default="10",
    show_default=True,
    metavar="SECONDS",
    help="How long each device watches the new model before committing.",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False),
    help="The fleet's signing key: it signs the revert an abort sends the devices that moved (devices refuse "
    "an unsigned one). Stays on this machine.",
)
@click.option(
    "--no-revert",
    is_flag=True,
    help="Start without a signed revert: an abort then leaves the devices that moved on the new version.",
)
@_ab_options
@COLLECTOR_OPTION
@click.option("--wait", "wait_", is_flag=True, help="Follow the rollout until it ends; exit 1 unless it succeeded.")
@json_option
def start(
    bundle,
    fleet,
    devices,
    waves,
    wave_wait,
    abort_on,
    shadow_rows,
    health_seconds,
    key_path,
    no_revert,
    ab,
    ab_min_labels,
    ab_max_duration,
    ab_alpha,
    collector,
    wait_,
    as_json,
):
    """Upload BUNDLE to the collector (it verifies the signature) and start a rollout; --key signs the revert
    an abort sends.

    \b
    Example:
      edgekit rollout start digits-4.edgebundle --fleet default --devices 'pi-*' --waves 10%,50%,100% \\
          --wave-wait 5m --abort-on 'failed>20%,agreement<0.98,p99_ms>50' --shadow-rows 500 --key keys/edgekit.key
      edgekit rollout start digits-4.edgebundle --fleet default --ab 50% --ab-min-labels 500 --waves 10%,100% \\
          --key keys/edgekit.key
    """
    revert = _signed_revert(bundle, fleet, key_path, no_revert)
    split = {"ab": ab, "ab_min_labels": ab_min_labels, "ab_max_duration": ab_max_duration, "ab_alpha": ab_alpha}
    client = CollectorClient(collector)
    started = client.start(
        bundle,
        fleet=fleet,
        devices=devices,
        waves=waves,
        wave_wait=wave_wait,
        abort_on=abort_on,
        shadow_rows=shadow_rows,
        health_seconds=health_seconds,
        **({"revert": revert} if revert else {}),
        **(split if ab else {}),
    )
    if not wait_:
        if as_json:
            emit_json({"id": started["id"]})
        else:
            click.echo(
                f"rollout {started['id']} started: {started['bundle']['name']} v{started['bundle']['version']} "
                f"to fleet {fleet} in waves {waves}{f', A/B split at {ab}' if ab else ''}; "
                f"follow it with 'edgekit rollout status {started['id']}'"
            )
        return
    _follow(client, started["id"], as_json)


def _signed_revert(bundle: str, fleet: str, key_path: str | None, no_revert: bool) -> dict | None:
    """The revert this rollout's abort would send, signed here so the key never leaves this machine."""
    from edgekit.errors import RolloutError

    if no_revert:
        if key_path:
            raise RolloutError("--key and --no-revert contradict each other", "pass one of them")
        return None
    if not key_path:
        raise RolloutError(
            "rollout start needs --key (the fleet's signing key): devices undo an aborted rollout only on a revert "
            "signed by it",
            "pass --key keys/edgekit.key, or --no-revert to start one whose abort leaves moved devices where they are",
        )
    from edgekit.bundle.keys import load_private_key
    from edgekit.fleet.signed import sign_revert

    return sign_revert(bundle, fleet=fleet, key=load_private_key(key_path))


@rollout.command()
@click.argument("rollout_id", required=False)
@COLLECTOR_OPTION
@json_option
def status(rollout_id, collector, as_json):
    """One rollout in detail (devices, states, reasons), or all of them.

    \b
    Example:
      edgekit rollout status r-20261121-101500-3fa2c1 --json
    """
    doc = CollectorClient(collector).status(rollout_id)
    if as_json:
        emit_json(doc)
    elif rollout_id:
        click.echo(_describe(doc))
    else:
        click.echo(
            table(
                [
                    [
                        r["id"],
                        r["kind"],
                        r["fleet"],
                        f"{r['name']} v{r['version']}",
                        r["state"],
                        f"{r['wave']}/{len(r['waves'])}",
                        ", ".join(f"{v} {k}" for k, v in sorted(r["counts"].items())),
                    ]
                    for r in doc
                ],
                ["id", "kind", "fleet", "model", "state", "wave", "devices"],
            )
            if doc
            else "no rollouts yet"
        )


def _action(verb: str, summary: str):
    @rollout.command(name=verb, help=f"{summary}\n\n\b\nExample:\n  edgekit rollout {verb} r-20261121-101500-3fa2c1")
    @click.argument("rollout_id")
    @COLLECTOR_OPTION
    @json_option
    def command(rollout_id, collector, as_json):
        doc = CollectorClient(collector).act(rollout_id, verb)
        emit_json(doc) if as_json else click.echo(
            f"rollout {doc['id']} is {doc['state']}" + (f": {doc['reason']}" if doc["reason"] else "")
        )

    return command


_action("pause", "Stop starting new waves (devices already updating finish).")
_action("resume", "Continue a paused rollout.")
_action(
    "abort",
    "Stop the rollout and send every device that moved back to the version it came from (with the revert "
    "'rollout start --key' signed).",
)


@rollout.command()
@click.option("--fleet", default="default", show_default=True, help="The fleet to roll back.")
@click.option("--to", "version", required=True, type=click.IntRange(min=1), help="The version to go back to.")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The fleet's signing key (devices require its signature to go down).",
)
@click.option("--name", help="The model name (default: the one the stored bundle of that version has).")
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Upload this bundle first (if the collector does not have that version).",
)
@click.option("--devices", default="*", show_default=True, help="Only devices whose id matches this glob.")
@COLLECTOR_OPTION
@click.option("--wait", "wait_", is_flag=True, help="Follow the rollback until it ends; exit 1 unless it succeeded.")
@json_option
def rollback(fleet, version, key_path, name, bundle_path, devices, collector, wait_, as_json):
    """Take a fleet back to an earlier version, with an instruction signed by the fleet key.

    \b
    Example:
      edgekit rollout rollback --fleet default --to 3 --key keys/edgekit.key
    """
    from edgekit.bundle.keys import load_private_key
    from edgekit.errors import RolloutError
    from edgekit.fleet.signed import sign_rollback

    client = CollectorClient(collector)
    if bundle_path:
        client.upload_bundle(bundle_path)
    stored = [b for b in client.bundles() if b["version"] == version and (name is None or b["name"] == name)]
    if len(stored) != 1:
        found = (
            "several models have it; pass --name"
            if stored
            else "the collector has no bundle of that version; pass --bundle FILE"
        )
        raise RolloutError(f"cannot pick the v{version} bundle: {found}")
    target = stored[0]
    instruction, signature = sign_rollback(
        fleet=fleet, name=target["name"], version=version, sha256=target["sha256"], key=load_private_key(key_path)
    )
    started = client.rollback(instruction, signature, devices)
    if wait_:
        return _follow(client, started["id"], as_json)
    emit_json({"id": started["id"]}) if as_json else click.echo(
        f"rollback {started['id']} started: fleet {fleet} to {target['name']} v{version}"
    )


def _follow(client: CollectorClient, rollout_id: str, as_json: bool) -> None:
    last = None
    while True:
        doc = client.status(rollout_id)
        line = f"{doc['state']}, wave {doc['wave']}/{len(doc['waves'])}: " + ", ".join(
            f"{v} {k}" for k, v in sorted(doc["counts"].items())
        )
        if line != last and not as_json:
            click.echo(line)
            last = line
        if doc["state"] in FINISHED:
            break
        time.sleep(1.0)
    emit_json(doc) if as_json else click.echo(_describe(doc))
    exit_with(0 if doc["state"] == "succeeded" else EXIT_THRESHOLD)


def _describe(doc: dict) -> str:
    head = (
        f"rollout {doc['id']} ({doc['kind']} {doc['name']} v{doc['version']}, fleet {doc['fleet']}): {doc['state']}"
        + (f" — {doc['reason']}" if doc["reason"] else "")
    )
    rows = [
        [
            d["device"],
            d["wave"],
            d["state"],
            f"v{d['from_version']} -> v{d['version']}",
            f"{d['shadow']['agreement']:.4f}" if (d.get("shadow") or {}).get("agreement") is not None else "-",
            d["reason"],
        ]
        for d in doc["devices"]
    ]
    return head + _describe_ab(doc.get("ab")) + "\n" + table(rows, HEADERS)


HEADERS = ["device", "wave", "state", "version", "shadow agreement", "reason"]


def _describe_ab(split: dict | None) -> str:
    """The A/B comparison under the rollout's line: each arm's labels and accuracy, its label-free estimate
    beside it (which says something while labels are few), the test and the decision."""
    if not split:
        return ""

    def share(value) -> str:
        return "-" if value is None else f"{value:.1%}"

    rows = [
        [
            arm,
            ", ".join(f"v{v}" for v in split[arm]["versions"]),
            split[arm]["devices"],
            split[arm]["labelled"],
            share(split[arm]["accuracy"]),
            share(split[arm]["estimated_accuracy"]),
        ]
        for arm in ("candidate", "champion")
        if split.get(arm)
    ]
    p_value = f", p = {split['p_value']:.3g}" if split.get("p_value") is not None else ""
    head = (
        f"\nA/B split at {split['ab_share']:.0%}: {split['decision']}{p_value} (alpha {split['ab_alpha']:g}, "
        f"{split['ab_min_labels']} labels per arm; {split['test']})"
        + (f"\n  {split['why']}" if split.get("why") else "")
    )
    arms = table(rows, ["arm", "version", "devices", "labels", "accuracy", "estimated"]) if rows else ""
    return head + ("\n" + arms if arms else "") + "\n"
