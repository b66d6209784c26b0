"""``edgekit demo``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from edgekit.cli.common import EXIT_THRESHOLD, exit_with
from edgekit.local.demo import run_demo


def register(cli: click.Group) -> None:
    cli.add_command(demo)


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Where to write the models, keys and bundle (default: a new temporary directory).",
)
@click.option(
    "--fixtures",
    type=click.Path(file_okay=False),
    default="fixtures",
    show_default=True,
    help="Use the fixtures here when they match this scikit-learn; else train anew.",
)
@click.option(
    "--devices",
    default=4,
    show_default=True,
    type=click.IntRange(0, 50),
    help="Emulated devices (0: the host pipeline only).",
)
@click.option(
    "--duration",
    default=60.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds the fleet runs at least (then until the v2 rollout and the loop are done, 150 s more at most).",
)
@click.option(
    "--broker",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="auto: Mosquitto if installed, else the embedded amqtt.",
)
@click.option("--keep-serving", is_flag=True, help="Keep the dashboard up after the run, until Ctrl-C.")
def demo(workdir, fixtures, devices, duration, broker, keep_serving):
    """Run the whole loop on one machine: convert, quantize, validate, package, then a fleet of
    emulated devices reporting drift to a collector with a dashboard: --devices digits devices (the
    first drifting, all rolled out to v2), a typed-table device (tab-00) seeing an unseen country, and
    a camera-like device (cam-00) whose PNG pictures get brighter. Then the loop closes: the first
    device's drift alert has the collector's retrain sink fetch its labelled field samples, retrain,
    promote and roll digits v3 out to it with shadow, and the alert closes; its timeline is printed.

    Uses only scikit-learn's bundled datasets and local processes; nothing is downloaded.

    \b
    Example:
      edgekit demo --devices 4 --duration 60
    """
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgekit-demo-"))
    result = run_demo(
        workdir,
        fixtures=fixtures if Path(fixtures).is_dir() else None,
        devices=devices,
        duration=duration,
        broker=broker,
        keep_serving=keep_serving,
        say=click.echo,
    )
    database = result.workdir / "fleet.db"
    again = (
        f"; look again with '{_edgekit_command()} fleet status --db {database}'"
        " (or fleet drift, fleet alerts, fleet timeline ID)"
        if database.exists()
        else ""
    )
    click.echo(f"done: everything is in {result.workdir}{again}")
    rollout_ok = result.rollout is None or result.rollout["state"] == "succeeded"
    loop_ok = result.loop is None or result.loop["closed"]
    exit_with(0 if result.validation_passed and rollout_ok and loop_ok else EXIT_THRESHOLD)


def _edgekit_command() -> str:
    """``edgekit`` as a fresh shell can run it: the full path when it lives in a virtualenv that is not activated.

    scripts/demo.sh puts .venv/bin on its own PATH only, so "on this PATH" says nothing about the
    user's shell; an activated virtualenv (``VIRTUAL_ENV``) is what a fresh shell of theirs has.
    """
    import os
    import sys

    beside = Path(sys.executable).parent / "edgekit"
    in_venv = sys.prefix != sys.base_prefix
    activated = (
        os.environ.get("VIRTUAL_ENV") and Path(os.environ["VIRTUAL_ENV"]).resolve() == Path(sys.prefix).resolve()
    )
    if beside.exists() and in_venv and not activated:
        return str(beside)
    return "edgekit"
