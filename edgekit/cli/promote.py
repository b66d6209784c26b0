"""``edgekit promote``."""

from __future__ import annotations

import click

from edgekit.bundle.promote import GAIN_MEANING, QUANTIZE_CHOICES, PromoteOptions, describe_gain, promote
from edgekit.cli.common import EXIT_THRESHOLD, BarProgress, emit_json, exit_with, fmt, json_option
from edgekit.text import table


def register(cli: click.Group) -> None:
    cli.add_command(promote_command)


@click.command("promote")
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option(
    "--champion",
    required=True,
    type=click.Path(dir_okay=False),
    help="The bundle in production now (.edgebundle); the new bundle takes its name and next version.",
)
@click.option(
    "--data",
    "data",
    required=True,
    multiple=True,
    type=click.Path(),
    help="Labelled data both models answer (.npz/.csv/.parquet; a tensor model's .npz with y); repeat it. "
    "Files the champion was gated on before (its lineage keeps their sha256) must be given again.",
)
@click.option(
    "--min-gain",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Smallest gain on the fresh data (accuracy as a fraction, 0.005 = half a point; for regressors the "
    "relative RMSE decrease). An equal candidate never wins.",
)
@click.option(
    "--max-regression",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Largest loss allowed on any one data file, in the same terms.",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZE_CHOICES),
    default="auto",
    show_default=True,
    help="int8: convert's int8 search (scored on the first fresh --data file); none: float32; "
    "auto: int8 when the champion is int8.",
)
@click.option(
    "--force", is_flag=True, help="Keep int8 even when it measures slower than float32 here (as 'convert --force')."
)
@click.option(
    "--trained-on",
    "trained_on",
    multiple=True,
    type=click.Path(),
    help="Data the candidate was trained on (repeatable): recorded by sha256; the first is the new drift "
    "baseline and the int8 calibration data unless --baseline/--calibration say otherwise.",
)
@click.option(
    "--baseline", type=click.Path(), help="The new bundle's drift baseline (default: the first --trained-on)."
)
@click.option(
    "--calibration", type=click.Path(), help="Rows for static int8 calibration (default: the drift baseline)."
)
@click.option("--label", help="Label column of CSV data (default: a column named label, target or y).")
@click.option(
    "--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Private key from 'edgekit keygen'."
)
@click.option(
    "--pubkey",
    type=click.Path(dir_okay=False),
    help="Key to check the champion's signature with (default: the public half of --key).",
)
@click.option("--version", "version", type=int, help="Version of the new bundle (default: the champion's + 1).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Bundle path (default: <name>-<version>.edgebundle)."
)
@json_option
def promote_command(candidate, champion, data, key_path, output, as_json, **flags):
    """Package a retrained model only if it beats the champion bundle on the same labelled data.

    The candidate goes through 'edgekit convert' (the champion's format; int8 search with --quantize)
    and the converted file is run beside the champion's own model on every --data file. It wins when
    it gains at least --min-gain (and more than nothing) on the fresh data and loses no more than
    --max-regression on any file. Then the next version is written, its lineage naming the parent,
    the commit and the sha256 of every file it was gated and trained on. Exit 0 when promoted, 1 when
    the champion stays (nothing written), 2 on bad input.

    \b
    Example:
      edgekit promote retrained.joblib --champion digits-3.edgebundle --data field.csv --data test.csv \\
          --trained-on train.csv --min-gain 0.005 --key keys/edgekit.key -o digits-4.edgebundle
    """
    progress = BarProgress(enabled=not as_json)
    try:
        result = promote(
            candidate,
            champion=champion,
            data=data,
            key_path=key_path,
            output=output,
            options=PromoteOptions(**flags),
            progress=progress,
        )
    finally:
        progress.finish()
    if as_json:
        emit_json(result.to_dict())
    else:
        _render(result)
    exit_with(0 if result.promoted else EXIT_THRESHOLD)


def _render(result) -> None:
    champion, candidate, metric = result.champion, result.candidate, result.metric
    click.echo(
        f"champion   {champion['name']} v{champion['version']} ({champion['format']}, {champion['quantization']}, "
        f"{champion['size_bytes']:,} bytes)"
    )
    click.echo(
        f"candidate  {candidate['source']} -> {candidate['format']}, {candidate['quantization']} "
        f"({candidate['size_bytes']:,} bytes)"
    )
    rows = [_row(score, metric) for score in result.scores]
    if len([s for s in result.scores if s.role == "fresh"]) > 1:
        rows.append(_row(result.fresh, metric, "fresh, pooled"))
    for batch in result.latency.get("candidate", {}):
        rows.append(
            [
                f"latency b{batch} p50 ms",
                "",
                "",
                f"{result.latency['champion'][batch]['p50_ms']:.3f}",
                f"{result.latency['candidate'][batch]['p50_ms']:.3f}",
                "",
            ]
        )
    click.echo(table(rows, ["data", "role", "rows", f"champion {metric}", f"candidate {metric}", "change"]))
    click.echo(f"gain: {GAIN_MEANING[metric]}; latency: {result.latency.get('method')}")
    for note in result.notes:
        click.echo(f"note: {note}")
    for reason in result.reasons:
        click.echo(f"NOT PROMOTED: {reason}")
    if result.promoted:
        click.echo(
            f"PROMOTED: wrote {result.output} ({champion['name']} v{result.version}, parent v{champion['version']})"
        )
    else:
        click.echo(f"kept {champion['name']} v{champion['version']}; nothing written")


def _row(score, metric: str, role: str | None = None) -> list[str]:
    return [
        score.file,
        role or ("champion's gate" if score.role == "gated" else score.role),
        f"{score.rows:,}",
        fmt(score.champion),
        fmt(score.candidate),
        describe_gain(score.gain, metric),
    ]
