"""The ``edgekit`` command. Each command parses options, calls one library function, and renders.

Exit codes: 0 success; 1 the work was done but a threshold failed (validate, the quantization
search); 2 the work could not be done (bad input, a tampered bundle, a missing dependency), with
one line saying what is wrong and what to do. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

from edgekit.cli.common import EdgekitGroup


def _build():
    import click

    from edgekit import __version__

    @click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    # The version is the package's own: no lookup of the distribution (edgekit-ml) in installed metadata.
    @click.version_option(version=__version__, prog_name="edgekit")
    @click.pass_context
    def cli(ctx: click.Context, debug: bool) -> None:
        """Convert, quantize, validate and package ML models for small devices.

        \b
        Example:
          edgekit convert model.joblib --quantize int8 --calibration train.npz -o model.int8.onnx
        """
        ctx.obj = {"debug": debug}

    from edgekit.cli import bundle, convert, demo, emulate, flash, fleet, promote, rollout, validate

    for module in (convert, validate, bundle, promote, emulate, flash, fleet, rollout, demo):
        module.register(cli)
    return cli


def main(argv: list[str] | None = None) -> int:
    try:
        import click  # noqa: F401
    except ImportError:
        print("edgekit: the CLI needs click; pip install 'edgekit-ml[host]'", file=sys.stderr)
        return 2
    return _build().main(args=argv, prog_name="edgekit", standalone_mode=True)


def cli_for_tests():
    """The click group, for ``CliRunner``."""
    return _build()
