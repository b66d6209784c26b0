"""``edgekit validate``."""

from __future__ import annotations

import click

from edgekit.build.validate import Thresholds, validate
from edgekit.cli.common import EXIT_THRESHOLD, emit_json, exit_with, fmt, json_option
from edgekit.models.compare import AGREEMENT_HELP, DROP_HELP
from edgekit.text import table


def register(cli: click.Group) -> None:
    cli.add_command(validate_command)


@click.command("validate")
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option(
    "--reference",
    required=True,
    type=click.Path(dir_okay=False),
    help="The model to compare against: scikit-learn (.joblib/.pkl), ONNX, or an XGBoost/LightGBM file.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="Rows both models answer (.npz or .csv; labels give the task metric); for a tensor model an .npz "
    "(X, y) or a folder of images, WAV or .npy files read through its preprocessing (no labels: agreement only).",
)
@click.option("--label", help="Label column of CSV data (default: label, target or y).")
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(0, 1),
    help=f"Fail when the candidate loses more than this: {DROP_HELP}.",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    help=f"Fail when fewer rows than this share get the same answer: {AGREEMENT_HELP}.",
)
@click.option(
    "--max-size-ratio",
    type=click.FloatRange(0),
    help="Fail when candidate bytes / reference bytes is above this "
    "(the --reference file: a pickle is no float32 ONNX).",
)
@json_option
def validate_command(candidate, reference, data, label, max_accuracy_drop, min_agreement, max_size_ratio, as_json):
    """Compare a converted or quantized model with its reference on the same data.

    Reports the task metric of both (accuracy; RMSE and MAE for regressors), agreement (same label;
    for regressors, outputs within 1 % of the reference outputs' standard deviation), max and mean
    |Δ| of outputs, file sizes (the ratio is candidate / --reference file) and latency (p50/p99,
    batch 1 and 256, interleaved in one process with 1 thread). Exit 0 when every threshold holds,
    1 when one fails, 2 on bad input.

    \b
    Example:
      edgekit validate model.int8.onnx --reference model.joblib --data test.npz \\
          --max-accuracy-drop 0.01 --min-agreement 0.99
    """
    report = validate(
        candidate,
        reference_path=reference,
        data_path=data,
        label=label,
        thresholds=Thresholds(
            max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, max_size_ratio=max_size_ratio
        ),
    )
    if as_json:
        emit_json(report)
    else:
        _render(report)
    exit_with(0 if report["passed"] else EXIT_THRESHOLD)


def _render(report) -> None:
    ref, cand, latency = report["reference"], report["candidate"], report["latency"]
    metric = report["metric"]
    rows = [
        ["model", f"{ref['path']} ({ref['kind']})", f"{cand['path']} ({cand['kind']})", ""],
        ["size (bytes)", f"{ref['size_bytes']:,}", f"{cand['size_bytes']:,}", f"{report['size_ratio']:.3f}x the size"],
        [metric, fmt(ref["metric"]), fmt(cand["metric"]), _change(report)],
    ]
    if "mae" in ref:
        rows.append(["mae", fmt(ref["mae"]), fmt(cand["mae"]), ""])
    for batch in report["speedup"]:
        rows.append(
            [
                f"latency b{batch} p50/p99 ms",
                f"{latency['reference'][batch]['p50_ms']:.3f} / {latency['reference'][batch]['p99_ms']:.3f}",
                f"{latency['candidate'][batch]['p50_ms']:.3f} / {latency['candidate'][batch]['p99_ms']:.3f}",
                f"{report['speedup'][batch]:.2f}x the speed",
            ]
        )
    click.echo(table(rows, ["", "reference", "candidate", "candidate vs reference"]))
    click.echo(
        f"rows {report['rows']}, agreement {report['agreement']:.4f} ({report['agreement_meaning']}),"
        f" max |Δ| {fmt(report['max_abs_diff'])}, mean |Δ| {fmt(report['mean_abs_diff'], '.5f')}"
    )
    click.echo(f"latency: {latency['method']}")
    for failure in report["failures"]:
        click.echo(f"FAILED: {failure['message']}")
    if report.get("layer_errors"):
        click.echo("per-layer error (SQNR, dB; lowest first — candidates to keep in float):")
        for layer in report["layer_errors"][:5]:
            click.echo(f"  {layer['sqnr_db']:7.2f}  {layer['op']:<10} {layer['node']}")
    click.echo("PASSED" if report["passed"] else "FAILED")


def _change(report) -> str:
    """The metric's change in its own terms: accuracy points for classifiers, RMSE per cent for regressors."""
    drop = report["accuracy_drop"]
    if drop is None:
        return ""
    return f"drop {drop * 100:+.2f} pts" if report["metric"] == "accuracy" else f"RMSE change {drop * 100:+.2f} %"
