"""``edgekit convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgekit.build.convert import QuantizeOptions, convert_model
from edgekit.build.quant_search import PREFER
from edgekit.cli.common import EXIT_THRESHOLD, BarProgress, CommandError, emit_json, exit_with, fmt, json_option
from edgekit.models.compare import AGREEMENT_HELP, DROP_HELP
from edgekit.models.targets import DEFAULT_MIN_RUNTIME, DEFAULT_OPSET, RuntimeTarget
from edgekit.text import table


def register(cli: click.Group) -> None:
    cli.add_command(convert)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the model (.onnx, or .tflite with --target tflite).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="Quantize float32 to int8 (onnxruntime.quantization; full-integer int8 for --target tflite).",
)
@click.option(
    "--calibration",
    type=click.Path(),
    help="Representative data for static quantization: rows (.npz/.csv), or for a tensor model an .npz of "
    "tensors or a folder of images, WAV files or .npy tensors (read through --preprocess; at most 512).",
)
@click.option(
    "--eval",
    "evaluation",
    type=click.Path(dir_okay=False),
    help="Labelled rows: try every configuration, keep the fastest within --max-accuracy-drop.",
)
@click.option(
    "--names-from",
    type=click.Path(dir_okay=False),
    help="A data file whose header (or .npz feature_names) names the model's columns in training order, "
    "for a model that knows none; a .parquet file also types a DataFrame pipeline's integer and flag columns.",
)
@click.option("--label", help="Label column of CSV data (default: a column named label, target or y).")
@click.option(
    "--preprocess",
    type=click.Path(dir_okay=False),
    help="A tensor model's preprocessing (TOML: an [image], [audio] or [sensor] table): how images or WAV "
    "files become its input. Stored in the model, run the same way on the host and the device.",
)
@click.option(
    "--task",
    type=click.Choice(["classification", "regression"]),
    help="What the outputs are, when edgekit reads them otherwise: a network ending in one float output "
    "wider than 1 and no softmax is read as a classifier's scores; --task regression serves them as values.",
)
@click.option(
    "--embedding",
    default=None,
    metavar="NODE",
    help="A tensor model's layer to expose as its embedding for drift (default: the input of the last "
    "Gemm/MatMul; 'none' to expose nothing).",
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(0, 1),
    help=f"Largest loss accepted: {DROP_HELP}. Default with --eval: 0.01.",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    help=f"Smallest share of rows on which int8 must answer like float32 (no labels needed): {AGREEMENT_HELP}.",
)
@click.option(
    "--mode",
    type=click.Choice(["dynamic", "static"]),
    help="Only this quantization mode (default: static with --calibration, else dynamic).",
)
@click.option(
    "--per-channel/--per-tensor",
    default=None,
    help="Per-channel or per-tensor weight scales (default: per-tensor, or both with --eval).",
)
@click.option(
    "--activation-type", type=click.Choice(["uint8", "int8"]), help="Activation type for static quantization."
)
@click.option("--weight-type", type=click.Choice(["int8", "uint8"]), help="Weight type.")
@click.option(
    "--calibrate-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="minmax",
    show_default=True,
    help="How static quantization sets activation ranges.",
)
@click.option(
    "--force", is_flag=True, help="Keep int8 even when it measures slower (or is larger) than float32 on this host."
)
@click.option(
    "--prefer",
    type=click.Choice(PREFER),
    default=None,
    help="size (default): never keep an int8 model larger than float32 (Q/DQ nodes can double a small model); "
    "speed: keep a faster one even when it is larger.",
)
@click.option(
    "--target",
    "target_format",
    type=click.Choice(["onnx", "tflite"]),
    default="onnx",
    show_default=True,
    help="Output format: ONNX, or TFLite (LiteRT) written without TensorFlow (dense and convolutional networks).",
)
@click.option(
    "--min-runtime",
    default=DEFAULT_MIN_RUNTIME,
    show_default=True,
    help="Oldest onnxruntime the model must load on (pins IR version and opsets).",
)
@click.option(
    "--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ai.onnx opset for scikit-learn conversion."
)
@json_option
def convert(model, output, quantize, target_format, as_json, **flags):
    """Convert a scikit-learn model or ONNX file to ONNX or TFLite, optionally int8.

    A scikit-learn estimator or Pipeline (joblib or pickle: loading one runs its code, so load only
    files you trust) is converted whole with skl2onnx; an XGBoost or LightGBM booster saved with
    save_model (.json, .ubj, .txt) through onnxmltools. With --quantize int8 the int8 model is kept
    only if it is not slower than float32 here (unless --force) and not larger than float32 (unless
    --prefer speed); with --eval, every configuration is
    tried and the fastest within --max-accuracy-drop (and --min-agreement) is kept; when none is, the
    layers with the worst quantization error are kept in float and tried again. Exit 1 when still none is.

    \b
    Examples:
      edgekit convert model.joblib -o model.onnx
      edgekit convert model.xgb.json -o model.onnx
      edgekit convert model.joblib --quantize int8 --calibration train.npz -o model.int8.onnx
      edgekit convert model.onnx --quantize int8 --calibration train.csv --label target \\
          --eval test.csv --max-accuracy-drop 0.01 -o model.int8.onnx
      edgekit convert model.joblib --target tflite --quantize int8 --calibration train.npz -o model.tflite
      edgekit convert cnn.onnx --quantize int8 --calibration images/ --preprocess image.toml \\
          --eval eval.npz -o cnn.int8.onnx
    """
    _check_extension(output, target_format)
    options = _quantize_options(quantize, **{key: flags[key] for key in QUANTIZE_FIELDS})
    progress = BarProgress(enabled=not as_json)
    try:
        outcome = convert_model(
            model,
            output,
            quantize=options,
            calibration=flags["calibration"],
            evaluation=flags["evaluation"],
            label=flags["label"],
            target=RuntimeTarget(min_runtime=flags["min_runtime"], opset=flags["opset"]),
            progress=progress,
            target_format=target_format,
            names_from=flags["names_from"],
            preprocess=flags["preprocess"],
            embedding=_embedding(flags["embedding"]),
            task=flags["task"],
        )
    finally:
        progress.finish()
    if as_json:
        emit_json(outcome.to_dict())
    else:
        _render(outcome)
    exit_with(0 if outcome.passed else EXIT_THRESHOLD)


def _embedding(value: str | None) -> str | bool:
    if value is None:
        return True
    return False if value.lower() == "none" else value


def _check_extension(output: str, target_format: str) -> None:
    suffix = Path(output).suffix.lower()
    if suffix in (".onnx", ".tflite") and suffix != f".{target_format}":
        raise CommandError(
            f"-o {output} ends in {suffix} but --target is {target_format}; "
            f"end it in .{target_format}, or pass --target {suffix[1:]}"
        )


def _quantize_options(quantize: str | None, **flags: Any) -> QuantizeOptions | None:
    """The search's options from the flags; a flag that only means something with --quantize is refused without it."""
    needs_quantize = [flag for key, flag in _ONLY_WITH_QUANTIZE.items() if flags[key] not in (None, False)]
    if needs_quantize and not quantize:
        raise CommandError(f"{', '.join(needs_quantize)} only apply with --quantize int8; add it, or drop them")
    if not quantize:
        return None
    fields = {QUANTIZE_FIELDS[key]: value for key, value in flags.items()}
    return QuantizeOptions(**{**fields, "prefer": flags["prefer"] or "size"})


# The click parameters of the int8 search, and the QuantizeOptions field each one sets.
QUANTIZE_FIELDS = {
    "mode": "mode",
    "per_channel": "per_channel",
    "activation_type": "activation_type",
    "weight_type": "weight_type",
    "calibrate_method": "calibration_method",
    "max_accuracy_drop": "max_accuracy_drop",
    "min_agreement": "min_agreement",
    "force": "force",
    "prefer": "prefer",
}
# Those that mean something only with --quantize, as the user types them (in this order in the message).
_ONLY_WITH_QUANTIZE = {
    "max_accuracy_drop": "--max-accuracy-drop",
    "min_agreement": "--min-agreement",
    "mode": "--mode",
    "force": "--force",
    "per_channel": "--per-channel/--per-tensor",
    "prefer": "--prefer",
}


def _render(outcome) -> None:
    if outcome.search is None:
        click.echo(
            f"wrote {outcome.output} ({outcome.size_bytes:,} bytes{', ' + outcome.notes[0] if outcome.notes else ''})"
        )
        return
    search = outcome.search
    rows = [_row(trial, search) for trial in [search.baseline, *search.trials]]
    drop = "drop(pts)" if search.metric_name == "accuracy" else "rmse(+%)"
    headers = [
        "configuration",
        "bytes",
        "size/float32",
        search.metric_name,
        drop,
        "agreement",
        *[f"speed b{b}" for b in _batches(search)],
        "note",
    ]
    click.echo(table(rows, headers))
    click.echo(f"latency: {search.to_dict()['latency_method']}; sizes and speeds are relative to float32")
    for note in outcome.notes:
        click.echo(f"note: {note}")
    click.echo(("" if search.passed else "FAILED: ") + search.verdict)
    click.echo(f"wrote {outcome.output} ({outcome.size_bytes:,} bytes)")


def _batches(search) -> list[int]:
    """The batch sizes latency was measured at: 1 and 256 rows of a table, 1 and 16 tensors."""
    return sorted(search.baseline.latency) or [1, 256]


def _row(trial, search) -> list[str]:
    """One trial: its size and speed against float32, and why it was passed over (limits, size, error)."""
    baseline = search.baseline
    ratio = trial.size_ratio(baseline)
    return [
        ("* " if trial is search.chosen else "  ") + trial.name,
        f"{trial.size_bytes:,}" if trial.size_bytes else "-",
        "-" if ratio is None else f"{ratio:.2f}x",
        fmt(trial.metric),
        "-" if trial.drop is None else f"{trial.drop * 100:+.2f}",
        fmt(trial.agreement),
        *[fmt(trial.speedup(baseline, b), ".2f") + "x" if trial.latency else "-" for b in _batches(search)],
        trial.error or ("outside the limits" if trial.within is False else trial.note or ""),
    ]
