"""``edgekit demo``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ..demo import run_demo
from .common import EXIT_THRESHOLD, exit_with


def register(cli: click.Group) -> None:
    cli.add_command(demo)


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Where to write the models, keys and bundle (default: a new temporary directory).")
@click.option("--fixtures", type=click.Path(file_okay=False), default="fixtures", show_default=True, help="Use the fixtures here when they match this scikit-learn; else train anew.")
def demo(workdir, fixtures):
    """Run the loop on one machine: train, convert, quantize, validate, package, verify.

    Uses only scikit-learn's bundled digits dataset; nothing is downloaded.

    \b
    Example:
      edgekit demo --workdir /tmp/edgekit-demo
    """
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgekit-demo-"))
    result = run_demo(workdir, fixtures=fixtures if Path(fixtures).is_dir() else None, say=click.echo)
    click.echo(f"done: everything is in {result.workdir}")
    exit_with(0 if result.validation_passed else EXIT_THRESHOLD)
