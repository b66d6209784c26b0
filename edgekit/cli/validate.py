"""``edgekit validate``."""

from __future__ import annotations

import click

from ..validate import Thresholds, validate
from .common import EXIT_THRESHOLD, emit_json, exit_with, fmt, json_option, table


def register(cli: click.Group) -> None:
    cli.add_command(validate_command)


@click.command("validate")
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--reference", required=True, type=click.Path(dir_okay=False), help="The model to compare against: scikit-learn (.joblib/.pkl) or ONNX.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Rows both models answer (.npz or .csv; labels give the task metric).")
@click.option("--label", help="Label column of CSV data (default: label, target or y).")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 1), help="Fail when accuracy falls by more than this fraction (0.01 = one point).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="Fail when fewer rows than this share get the same answer.")
@click.option("--max-size-ratio", type=click.FloatRange(0), help="Fail when candidate size / reference size is above this.")
@json_option
def validate_command(candidate, reference, data, label, max_accuracy_drop, min_agreement, max_size_ratio, as_json):
    """Compare a converted or quantized model with its reference on the same data.

    Reports the task metric of both, label agreement, max and mean |Δ| of outputs, file sizes and
    latency (p50/p99, batch 1 and 256, interleaved in one process with 1 thread). Exit 0 when every
    threshold holds, 1 when one fails, 2 on bad input.

    \b
    Example:
      edgekit validate model.int8.onnx --reference model.joblib --data test.npz --max-accuracy-drop 0.01 --min-agreement 0.99
    """
    report = validate(candidate, reference_path=reference, data_path=data, label=label,
                      thresholds=Thresholds(max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, max_size_ratio=max_size_ratio))
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
        ["size (bytes)", f"{ref['size_bytes']:,}", f"{cand['size_bytes']:,}", f"ratio {report['size_ratio']:.3f}"],
        [metric, fmt(ref["metric"]), fmt(cand["metric"]), "" if report["accuracy_drop"] is None else f"drop {report['accuracy_drop'] * 100:+.2f} pts" if metric == "accuracy" else f"change {report['accuracy_drop'] * 100:+.2f} %"],
    ]
    for batch in ("1", "256"):
        rows.append([f"latency b{batch} p50/p99 ms", f"{latency['reference'][batch]['p50_ms']:.3f} / {latency['reference'][batch]['p99_ms']:.3f}",
                     f"{latency['candidate'][batch]['p50_ms']:.3f} / {latency['candidate'][batch]['p99_ms']:.3f}", f"{report['speedup'][batch]:.2f}x"])
    click.echo(table(rows, ["", "reference", "candidate", ""]))
    click.echo(f"rows {report['rows']}, agreement {report['agreement']:.4f}, max |Δ| {fmt(report['max_abs_diff'])}, mean |Δ| {fmt(report['mean_abs_diff'], '.5f')}")
    click.echo(f"latency: {latency['method']}")
    for failure in report["failures"]:
        click.echo(f"FAILED: {failure['message']}")
    if report.get("layer_errors"):
        click.echo("per-layer error (SQNR, dB; lowest first — candidates to keep in float):")
        for layer in report["layer_errors"][:5]:
            click.echo(f"  {layer['sqnr_db']:7.2f}  {layer['op']:<10} {layer['node']}")
    click.echo("PASSED" if report["passed"] else "FAILED")
