"""``edgekit emulate``."""

from __future__ import annotations

import click

from edgekit.fleet.config import read_token_file
from edgekit.local.emulate import DriftSpec, prepare_devices, run_devices


def register(cli: click.Group) -> None:
    cli.add_command(emulate)


@click.command()
@click.option(
    "--devices", default=3, show_default=True, type=click.IntRange(1, 500), help="How many emulated devices to run."
)
@click.option("--bundle", required=True, type=click.Path(dir_okay=False), help="The bundle every device runs.")
@click.option("--pubkey", required=True, type=click.Path(dir_okay=False), help="The trusted public key.")
@click.option("--broker", help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883 (none: devices only serve and spool).")
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="Rows (.npz/.csv) each device is fed, shuffled per device; for a tensor model an .npz of tensors or a "
    "folder of images, WAV or .npy files.",
)
@click.option("--fleet", default="default", show_default=True, help="Fleet name (an MQTT topic level).")
@click.option(
    "--window-rows", default=1000, show_default=True, type=click.IntRange(1), help="Rows per monitoring window."
)
@click.option(
    "--window-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Longest window, in seconds.",
)
@click.option(
    "--rows-per-second",
    default=100.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Rows each device scores per second.",
)
@click.option(
    "--drift",
    help="Inject drift: feature=NAME|fN,shift=NUMBER[,after=ROWS][,devices=0-1]; for a tensor model "
    "feature=brightness,shift=0.3 scales every element by 1.3.",
)
@click.option(
    "--state-dir", required=True, type=click.Path(file_okay=False), help="Where each device's directory is made."
)
@click.option(
    "--http-port-base",
    type=int,
    help="Device i listens on this port + i (default: any free port; see <dir>/state/http.json).",
)
@click.option(
    "--device-token-file",
    type=click.Path(dir_okay=False),
    help="The collector's device token (or EDGEKIT_DEVICE_TOKEN), written for every device; without it, "
    "EDGEKIT_COLLECTOR_TOKEN is written, if set.",
)
@click.option(
    "--feedback",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of rows whose true label (the data file's y) each device sends back as a delayed label.",
)
@click.option(
    "--capture-rate",
    type=click.FloatRange(0, 1, min_open=True),
    help="Keep this share of rows as field samples ([capture] in agent.toml; for `fleet samples`).",
)
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    help="Stop after this many seconds (default: run until Ctrl-C).",
)
def emulate(
    devices,
    bundle,
    pubkey,
    broker,
    data,
    fleet,
    window_rows,
    window_seconds,
    rows_per_second,
    drift,
    state_dir,
    http_port_base,
    device_token_file,
    feedback,
    capture_rate,
    duration,
):
    """Run a fleet of emulated devices: real agent processes fed from a data file.

    \b
    Example:
      edgekit emulate --devices 5 --bundle digits-3.edgebundle --pubkey keys/edgekit.pub \\
          --broker mqtt://127.0.0.1:1883 --data test.npz --fleet lab --window-rows 200 --rows-per-second 100 \\
          --drift "feature=f20,shift=8,after=500,devices=0-1" --state-dir /tmp/fleet
    """
    configs = prepare_devices(
        devices=devices,
        bundle=bundle,
        pubkey=pubkey,
        broker=broker,
        data=data,
        fleet=fleet,
        window_rows=window_rows,
        window_seconds=window_seconds,
        rows_per_second=rows_per_second,
        drift=DriftSpec.parse(drift) if drift else None,
        state_dir=state_dir,
        http_port_base=http_port_base,
        device_token=read_token_file(device_token_file, "--device-token-file") if device_token_file else None,
        feedback=feedback,
        capture={"enabled": True, "rate": capture_rate} if capture_rate else None,
    )
    run_devices(configs, duration=duration, say=click.echo)
