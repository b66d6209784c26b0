"""``edgekit flash``."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit.fleet.config import read_token_file
from edgekit.local.flash import Flasher, FlashPlan


def register(cli: click.Group) -> None:
    cli.add_command(flash)


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option(
    "--target",
    required=True,
    help="ssh://user@host[:port][/install/root] (default root /opt/edgekit, ~/edgekit for a non-root user), "
    "dir:/path (an emulated device) or chroot:/rootfs (an emulated Pi root).",
)
@click.option("--device-id", required=True, help="The device's id (an MQTT topic level).")
@click.option("--fleet", default="default", show_default=True, help="Its fleet.")
@click.option("--broker", required=True, help="MQTT broker URL as the device reaches it.")
@click.option("--pubkey", required=True, type=click.Path(dir_okay=False), help="The trusted public key.")
@click.option("--identity", type=click.Path(dir_okay=False), help="SSH private key (passed to ssh -i).")
@click.option(
    "--ssh-option",
    "ssh_options",
    multiple=True,
    metavar="K=V",
    help="Extra ssh -o options, e.g. StrictHostKeyChecking=accept-new.",
)
@click.option(
    "--wheel-dir",
    type=click.Path(file_okay=False),
    help="Wheels to install from instead of the index (offline devices, e.g. aarch64 wheels).",
)
@click.option(
    "--credentials", type=click.Path(file_okay=False), help="The credentials/ directory of 'edgekit fleet provision'."
)
@click.option("--listen", default="127.0.0.1:8470", show_default=True, help="The agent's HTTP address on the device.")
@click.option("--python", "python_", default="python3", show_default=True, help="The device's Python for the venv.")
@click.option(
    "--system-site-packages",
    is_flag=True,
    help="Let the venv use the packages of --python (a virtualenv's own too; e.g. Debian's numpy).",
)
@click.option(
    "--device-token-file",
    type=click.Path(dir_okay=False),
    help="The collector's device token (its --device-token-file; or EDGEKIT_DEVICE_TOKEN), written to the device "
    "for bundle downloads and field-sample uploads. Without it, EDGEKIT_COLLECTOR_TOKEN is written, if set.",
)
@click.option("--start", is_flag=True, help="dir: targets: start the agent in the background too.")
@click.option("--wait", default=60.0, show_default=True, help="Seconds to wait for the device's first state message.")
@click.option("--dry-run", is_flag=True, help="Print every step instead of running it.")
def flash(
    bundle,
    target,
    device_id,
    fleet,
    broker,
    pubkey,
    identity,
    ssh_options,
    wheel_dir,
    credentials,
    listen,
    python_,
    system_site_packages,
    device_token_file,
    start,
    wait,
    dry_run,
):
    """Install the agent, the bundle and the device's credentials on a Raspberry Pi (SSH) or an emulated device (dir:).

    \b
    Example:
      edgekit flash digits-3.edgebundle --target ssh://pi@raspberrypi.local --device-id pi-kitchen-01 \\
          --broker mqtts://10.0.0.5:8883 --pubkey keys/edgekit.pub --credentials broker/credentials \\
          --device-token-file secrets/device.token
    """
    plan = FlashPlan(
        bundle=Path(bundle),
        device_id=device_id,
        fleet=fleet,
        broker=broker,
        pubkey=Path(pubkey),
        target=target,
        identity=identity,
        ssh_options=tuple(ssh_options),
        wheel_dir=Path(wheel_dir) if wheel_dir else None,
        credentials=Path(credentials) if credentials else None,
        listen=listen,
        python=python_,
        system_site_packages=system_site_packages,
        start=start,
        device_token=read_token_file(device_token_file, "--device-token-file") if device_token_file else None,
    )
    Flasher(plan, dry_run=dry_run, say=click.echo).run(wait_seconds=wait)
