"""``edgekit convert``: model file in, checked (and optionally int8) ONNX file out.

Without ``--quantize`` the float32 model is written. With it, the candidates are tried and the
choice is made by ``quant_search``: with labelled ``--eval`` data every sensible configuration is
tried against the accuracy limit; without, the one configuration the options describe (static if
calibration data was given, else dynamic) is checked only for speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.outputs import REGRESSION, OutputSpec
from edgekit.build.booster_export import precision_notes
from edgekit.build.embedding import EMBEDDING_OUTPUT, default_embedding_tensor, expose_embedding
from edgekit.build.onnx_export import check, sample_rows, serialize, stamp, to_onnx
from edgekit.build.quant_search import PREFER, SearchOutcome, candidate_configs, search
from edgekit.build.quantize import MAX_CALIBRATION_ROWS, ensure_quantizable
from edgekit.errors import DataError
from edgekit.fsutil import write_bytes_atomic
from edgekit.models import compare
from edgekit.models.data import Dataset, adopt_feature_names, load_dataset
from edgekit.models.loading import METADATA_SOURCE, load_model
from edgekit.models.targets import RuntimeTarget
from edgekit.models.tensor_data import with_preprocess
from edgekit.progress import NoProgress, Progress

DEFAULT_MAX_DROP = 0.01
MAX_CALIBRATION_TENSORS = 512


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str | None = None  # None: static with calibration data, else dynamic
    per_channel: bool | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    calibration_method: str = "minmax"
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    force: bool = False
    prefer: str = "size"  # "speed" lets a faster int8 model win even when it is larger than float32


@dataclass
class ConvertOutcome:
    source: str
    output: str
    size_bytes: int
    search: SearchOutcome | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.search is None or self.search.passed

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "source": self.source,
            "output": self.output,
            "size_bytes": self.size_bytes,
            "passed": self.passed,
            "notes": self.notes,
        }
        if self.search is not None:
            doc["quantization"] = self.search.to_dict()
        doc.update(self.extra)
        return doc


def convert_model(
    source: str,
    output: str,
    *,
    quantize: QuantizeOptions | None = None,
    calibration: str | None = None,
    evaluation: str | None = None,
    label: str | None = None,
    target: RuntimeTarget = RuntimeTarget(),
    progress: Progress = NoProgress(),
    target_format: str = "onnx",
    names_from: str | None = None,
    preprocess: str | None = None,
    embedding: str | bool = True,
    task: str | None = None,
) -> ConvertOutcome:
    """Convert ``source`` to ONNX or TFLite, optionally searching int8 configurations.

    For a tensor model, ``preprocess`` (a TOML file) is how encoded items become its input (it reads
    folders of images or WAVs for calibration and travels in the model's metadata), and ``embedding``
    exposes the classifier head's input (True), a named tensor, or nothing (False) for drift. ``task``
    overrides what the outputs were read as (a network whose last layer is wider than one output reads
    as a classifier's scores; ``regression`` says they are values)."""
    if target_format not in ("onnx", "tflite"):
        raise DataError(f"unknown --target {target_format!r}", "use onnx or tflite")
    if quantize is not None and quantize.prefer not in PREFER:
        raise DataError(f"unknown --prefer {quantize.prefer!r}", "use size or speed")
    if quantize is None and (calibration or evaluation):
        raise DataError(
            "--calibration and --eval are used only with --quantize int8", "add --quantize int8, or drop them"
        )
    model = load_model(source, pin_to=target)
    _types_from_parquet(model, names_from)
    model.input = with_preprocess(model.input, preprocess)
    model.output = with_task(model.output, task, source)
    calibration_set, eval_set = _read_data(model, calibration, evaluation, names_from, label, progress)
    fp32 = to_onnx(model, target=target)
    if model.input.tensor is not None and embedding is not False and target_format == "onnx":
        fp32 = _with_embedding(fp32, model, None if embedding is True else str(embedding), source)
    if target_format == "tflite":
        return _convert_tflite(fp32, source, output, model, quantize, calibration_set, eval_set, progress)
    if quantize is not None:
        ensure_quantizable(fp32, source=source)
    if quantize is None:
        data = serialize(fp32)
        write_bytes_atomic(output, data)
        return ConvertOutcome(source, output, len(data), notes=precision_notes(fp32))  # booster_export.py
    return _quantized(fp32, model, source, output, quantize, calibration_set, eval_set, evaluation, target, progress)


def _quantized(
    fp32: Any,
    model: Any,
    source: str,
    output: str,
    quantize: QuantizeOptions,
    calibration_set: Dataset | None,
    eval_set: Dataset | None,
    evaluation: str | None,
    target: RuntimeTarget,
    progress: Progress,
) -> ConvertOutcome:
    """The int8 search over ``fp32`` and the model it chose, written to ``output``."""
    calibration_rows = _rows(calibration_set, model) if calibration_set else None
    plan = _search_plan(model, quantize, calibration_rows, eval_set, evaluation)
    outcome = search(
        fp32,
        plan.configs,
        rows=plan.rows,
        labels=plan.labels,
        calibration=calibration_rows,
        max_drop=plan.max_drop,
        min_agreement=quantize.min_agreement,
        force=quantize.force,
        prefer=quantize.prefer,
        target=target,
        progress=progress,
        source=source,
    )
    chosen = outcome.chosen
    data = serialize(chosen.proto)  # stamped with its quantization by the search
    write_bytes_atomic(output, data)
    return ConvertOutcome(source, output, len(data), outcome, plan.notes)


def _read_data(
    model: Any,
    calibration: str | None,
    evaluation: str | None,
    names_from: str | None,
    label: str | None,
    progress: Any,
) -> tuple[Dataset | None, Dataset | None]:
    """The calibration and evaluation data, read as the model's columns or tensors; the model takes its
    feature names from them (or from ``names_from``) when it knows none."""
    columns = model.input.columns
    # MinMax ranges of a CNN settle within a few hundred images; each static candidate calibrates on all of them
    limit = MAX_CALIBRATION_TENSORS if model.input.tensor is not None else MAX_CALIBRATION_ROWS
    calibration_set = (
        load_dataset(calibration, label=label, columns=columns, schema=model.input, limit=limit, progress=progress)
        if calibration
        else None
    )
    eval_set = load_dataset(evaluation, label=label, columns=columns, schema=model.input) if evaluation else None
    names_set = load_dataset(names_from, label=label, columns=columns) if names_from else None
    for dataset in (names_set, calibration_set, eval_set):
        model.input = adopt_feature_names(model.input, dataset)
    if names_set is not None:
        names_set.aligned_to(model.input.feature_names)  # a model that knows other names refuses them here
    return calibration_set, eval_set


@dataclass
class _SearchPlan:
    rows: Any  # what candidates are scored on: labelled --eval rows, else calibration or synthetic rows
    labels: Any
    max_drop: float | None
    configs: list[Any]
    notes: list[str]


def _types_from_parquet(model: Any, names_from: str | None) -> None:
    """A DataFrame pipeline's integer and flag columns, from a Parquet file's types (scikit-learn does
    not record whether a numeric column held integers; a CSV cannot say)."""
    if not names_from or Path(names_from).suffix.lower() not in (".parquet", ".pq") or not hasattr(model, "retyped"):
        return
    from device_agent.tabular import TableError, parquet_column_types

    try:
        model.retyped(parquet_column_types(names_from))
    except TableError as exc:
        raise DataError(exc.problem, exc.fix, path=names_from) from exc


def _search_plan(
    model: Any, quantize: QuantizeOptions, calibration_rows: Any, eval_set: Dataset | None, evaluation: str | None
) -> _SearchPlan:
    """What the int8 search tries and scores on: every sensible configuration with labelled --eval data,
    else only the one the options describe (agreement with float32 is measured, accuracy cannot be)."""
    eval_set = eval_set.aligned_to(model.input.feature_names) if eval_set else None
    notes = []
    if eval_set is not None:
        labels = eval_set.require_labels("--eval")
        compare.check_labels(model.output, labels, source=evaluation)
        rows = model.input.check(eval_set.X, source=evaluation)
        max_drop = quantize.max_accuracy_drop if quantize.max_accuracy_drop is not None else DEFAULT_MAX_DROP
        configs = candidate_configs(
            calibrated=calibration_rows is not None,
            calibration=quantize.calibration_method,
            mode=quantize.mode,
            per_channel=quantize.per_channel,
            activation_type=quantize.activation_type,
            weight_type=quantize.weight_type,
        )
        if calibration_rows is None:
            notes.append(
                "no --calibration data: only dynamic quantization was tried (static needs representative rows)"
            )
    else:
        if quantize.max_accuracy_drop is not None:
            raise DataError(
                "--max-accuracy-drop needs labelled --eval data to measure accuracy on",
                "add --eval test.csv (or .npz with y)",
            )
        labels, max_drop = None, None
        rows = calibration_rows if calibration_rows is not None else sample_rows(model)
        mode = quantize.mode or ("static" if calibration_rows is not None else "dynamic")
        configs = candidate_configs(
            calibrated=calibration_rows is not None,
            calibration=quantize.calibration_method,
            mode=mode,
            per_channel=bool(quantize.per_channel),
            activation_type=quantize.activation_type or "uint8",
            weight_type=quantize.weight_type or "int8",
        )[:1]
        notes.append(
            "no --eval data: accuracy was not checked; agreement is measured against float32 on "
            + ("the calibration rows" if calibration_rows is not None else "synthetic rows")
        )
    if not configs:
        raise DataError(
            "the options leave no quantization configuration to try",
            "static quantization needs --calibration; relax --mode/--per-channel",
        )
    return _SearchPlan(rows, labels, max_drop, configs, notes)


def _convert_tflite(
    fp32: Any,
    source: str,
    output: str,
    model: Any,
    quantize: QuantizeOptions | None,
    calibration_set: Dataset | None,
    eval_set: Dataset | None,
    progress: Progress,
) -> ConvertOutcome:
    from edgekit.build.quant_search import Limits
    from edgekit.build.tflite.export import FLOAT, build, choose

    if quantize is None:
        data = build(fp32, calibration=None, source=source)[FLOAT]
        write_bytes_atomic(output, data)
        return ConvertOutcome(source, output, len(data), notes=["float32 .tflite"])
    if calibration_set is None:
        raise DataError(
            "--target tflite --quantize int8 makes a full-integer model and needs --calibration rows",
            "add --calibration train.npz",
        )
    calibration_rows = _rows(calibration_set, model)
    labels = None
    rows = calibration_rows
    if eval_set is not None:
        eval_set = eval_set.aligned_to(model.input.feature_names)
        labels = eval_set.require_labels("--eval")
        compare.check_labels(model.output, labels, source=eval_set.source)
        rows = model.input.check(eval_set.X, source=eval_set.source)
    max_drop = (
        quantize.max_accuracy_drop
        if quantize.max_accuracy_drop is not None
        else (DEFAULT_MAX_DROP if labels is not None else None)
    )
    outcome, data, extra = choose(
        fp32,
        rows=rows,
        labels=labels,
        calibration=calibration_rows,
        limits=Limits(max_drop, quantize.min_agreement),
        force=quantize.force,
        prefer=quantize.prefer,
        source=source,
        progress=progress,
    )
    write_bytes_atomic(output, data)
    notes = [
        "speed of each .tflite against float32 onnxruntime on the same rows (by batch size): "
        + "; ".join(  # the batches are 1 and 256 rows of a table, 1 and 16 examples of a tensor
            f"{name}: " + ", ".join(f"b{b} {x:.2f}x" for b, x in v.items())
            for name, v in extra["speedup_vs_onnxruntime_fp32"].items()
        )
    ]
    result = ConvertOutcome(source, output, len(data), outcome, notes)
    result.extra = extra
    return result


def _with_embedding(fp32: Any, model: Any, tensor: str | None, source: str) -> Any:
    """The float model with its embedding exposed (``embedding``); a graph with no classifier head
    keeps its outputs unless the user named a tensor."""
    exposed = any(o.name == EMBEDDING_OUTPUT for o in fp32.graph.output)
    if tensor is None and default_embedding_tensor(fp32) is None and not exposed:
        return fp32
    fp32, model.output = expose_embedding(fp32, model.output, tensor, source=source)
    stamp(fp32, model.input.to_dict(), model.output.to_dict(), _source_of(fp32))
    check(fp32, source=source)
    return fp32


def with_task(spec: Any, task: str | None, source: str) -> Any:
    """``spec`` read as ``task``: a classifier's single scores output read as a regressor's values."""
    if task is None or task == spec.task:
        return spec
    if task != "regression" or spec.label_output is not None or spec.probabilities_output is None:
        raise DataError(
            f"the model's outputs cannot be read as {task}",
            "use --task regression only for a network with one float output read as class scores",
            path=source,
        )
    return OutputSpec(REGRESSION, value_output=spec.probabilities_output, embedding_output=spec.embedding_output)


def _source_of(proto: Any) -> str:
    return next((p.value for p in proto.metadata_props if p.key == METADATA_SOURCE), "onnx")


def _rows(dataset: Dataset, model: Any) -> np.ndarray:
    return model.input.check(dataset.aligned_to(model.input.feature_names).X, source=dataset.source)
