"""``edgekit promote``: a retrained model replaces the champion only when it measurably wins.

Never push a retrained model straight to production. The candidate goes through ``edgekit
convert``'s own pipeline (``convert_model``: the export, the int8 search, its accuracy check), into
the champion's format, and is then run as the device would run it (the converted file in
onnxruntime or LiteRT, not the scikit-learn object) beside the champion, run from the champion
bundle's own bytes, on the same labelled data:

- every ``--data`` file is scored on both; none may get worse by more than ``max_regression``;
- the fresh data (files the champion was never gated on) must gain at least ``min_gain``, and
  more than nothing: an equal model is not worth a rollout;
- the data an earlier promotion gated the champion on is recorded in its lineage by sha256 and must
  be given again (``champion.py``), so no version forgets what an earlier one was held to.

Only a winner is packaged (``build_bundle``: same name, the next version, the champion's drift
thresholds), its lineage naming its parent, the code commit and every data file it was gated and
trained on, and its label-free accuracy estimate calibrated on the fresh files, as ``package --eval`` does.
The bundle format does not change: ``lineage`` is free-form and devices never read it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.outputs import CLASSIFICATION
from edgekit import tomlfile
from edgekit.build.convert import ConvertOutcome, QuantizeOptions, convert_model
from edgekit.bundle.calibration import LabelledRows
from edgekit.bundle.champion import (
    FRESH,
    Champion,
    GateData,
    check_candidate_fits,
    check_same_input,
    is_quantized,
    load_gate_data,
    open_champion,
    with_champion_names,
)
from edgekit.bundle.lineage import data_sha256
from edgekit.bundle.package import build_bundle
from edgekit.errors import DataError, PackageError
from edgekit.models import compare
from edgekit.models.latency import batches_from, measure
from edgekit.models.loading import load_model
from edgekit.models.targets import DEFAULT_MIN_RUNTIME, RuntimeTarget
from edgekit.models.tensor_data import in_layout
from edgekit.progress import NoProgress, Progress

QUANTIZE_CHOICES = ("auto", "int8", "none")
TIE = 1e-9  # metrics are means over rows: differences below this are float noise, not a gain or a loss


@dataclass(frozen=True)
class PromoteOptions:
    """The gate's limits, in the task metric's own terms: accuracy as a fraction (0.005 = half a point),
    a regressor's relative RMSE change (0.005 = 0.5 %)."""

    min_gain: float = 0.0
    max_regression: float = 0.0
    quantize: str = "auto"  # auto: int8 when the champion is int8
    label: str | None = None
    version: int | None = None  # default: the champion's + 1
    trained_on: tuple[str, ...] = ()
    baseline: str | None = None  # the new bundle's drift baseline; default: the first trained_on file
    calibration: str | None = None  # static int8's calibration rows; default: the baseline
    force: bool = False  # convert's --force: keep int8 even when it measures slower than float32 here
    pubkey: str | None = None  # checks the champion's signature; default: the public half of the key
    latency_budget: float = 1.0


@dataclass
class Score:
    """Both models on one data file; ``gain`` is how much better the candidate is (negative: worse)."""

    file: str
    sha256: str
    role: str
    rows: int
    champion: float
    candidate: float
    gain: float


@dataclass
class Promotion:
    promoted: bool
    reasons: list[str]
    metric: str
    champion: dict[str, Any]
    candidate: dict[str, Any]
    scores: list[Score]
    fresh: Score
    thresholds: dict[str, float]
    latency: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: int | None = None
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["decision"] = "promoted" if self.promoted else "kept the champion"
        doc["gain_meaning"] = GAIN_MEANING[self.metric]
        return doc


GAIN_MEANING = {
    "accuracy": "accuracy points gained, as a fraction (0.01 = one point)",
    "rmse": "relative RMSE decrease (0.01 = RMSE down 1 %)",
}


def promote(
    candidate: str,
    *,
    champion: str,
    data: Sequence[str],
    key_path: str,
    output: str | None = None,
    options: PromoteOptions = PromoteOptions(),
    progress: Progress = NoProgress(),
) -> Promotion:
    """Gate ``candidate`` (a model file ``edgekit convert`` reads) against the ``champion`` bundle on ``data``;
    write the next version of the bundle to ``output`` only when it wins. Bad input raises an ``EdgekitError``
    (or the bundle reader's ``AgentError``), all of it but a converted model's other input before the conversion."""
    _check_options(options)
    held = open_champion(champion, key_path=key_path, pubkey_path=options.pubkey)
    version = _next_version(options.version, held)
    output = output or f"{held.bundle.name}-{version}.edgebundle"
    if Path(output).resolve() == Path(champion).resolve():
        raise PackageError("-o is the champion bundle itself", "write the new version to a new file", path=output)
    baseline = _baseline(options)
    trained_on = {data_sha256(path): Path(path).name for path in options.trained_on}
    gate = load_gate_data(data, held, label=options.label, trained_on=trained_on)
    peek = load_model(candidate)
    check_candidate_fits(peek, held, source=candidate)
    with tempfile.TemporaryDirectory(prefix="edgekit-promote-") as work:
        converted, outcome = _convert(candidate, peek, held, gate, options, Path(work), progress)
        result = _judge(held, converted, outcome, gate, options)
        result.version = version
        if result.promoted:
            _package(
                converted,
                held,
                gate,
                options,
                key_path=key_path,
                baseline=baseline,
                version=version,
                output=output,
                result=result,
            )
            result.output = output
    return result


def _check_options(options: PromoteOptions) -> None:
    if options.quantize not in QUANTIZE_CHOICES:
        raise DataError(f"unknown --quantize {options.quantize!r}", f"use one of {', '.join(QUANTIZE_CHOICES)}")
    for name in ("min_gain", "max_regression"):
        value = getattr(options, name)
        if not 0 <= value <= 1:
            raise DataError(f"--{name.replace('_', '-')} {value} is outside 0..1", "give a fraction, e.g. 0.005")


def _next_version(version: int | None, champion: Champion) -> int:
    if version is None:
        return champion.bundle.version + 1
    if version <= champion.bundle.version:
        raise PackageError(
            f"--version {version} is not above {champion.label}'s",
            f"devices refuse to go down: give {champion.bundle.version + 1} or more (or leave --version out)",
        )
    return version


def _baseline(options: PromoteOptions) -> str:
    """The drift baseline of the new bundle: what the candidate was trained on, as ``edgekit package`` wants."""
    baseline = options.baseline or (options.trained_on[0] if options.trained_on else None)
    if baseline is None:
        raise DataError(
            "the new bundle needs a drift baseline: the data the candidate was trained on",
            "add --trained-on train.csv (or --baseline FILE)",
        )
    if not Path(baseline).exists():  # found here, not after the conversion and the judgement
        raise DataError("no such file or folder", "check the --baseline/--trained-on path", path=baseline)
    return baseline


# -- the candidate, through convert's pipeline -------------------------------------------------------------


def _convert(
    candidate: str,
    peek: Any,
    champion: Champion,
    gate: list[GateData],
    options: PromoteOptions,
    work: Path,
    progress: Progress,
) -> tuple[Any, ConvertOutcome]:
    """``candidate`` converted as ``edgekit convert`` would, into the champion's format and runtime, and
    loaded the way the device runs it. The int8 search (with ``--quantize int8``, or ``auto`` for an int8
    champion) scores its configurations on the first fresh data file, within convert's accuracy limit."""
    model_format = champion.bundle.model_format
    quantize = options.quantize == "int8" or (options.quantize == "auto" and is_quantized(champion))
    fresh = next(item.path for item in gate if item.role == FRESH)
    tensor = champion.model.input.tensor is not None
    calibration = (options.calibration or _baseline(options)) if quantize else None
    path = work / f"candidate.{model_format}"
    outcome = convert_model(
        candidate,
        str(path),
        quantize=QuantizeOptions(force=options.force) if quantize else None,
        calibration=calibration,
        evaluation=fresh if quantize else None,
        label=options.label,
        target=_target(champion),
        progress=progress,
        target_format=model_format,
        names_from=None if tensor else fresh,
        preprocess=_champion_preprocessing(peek, champion, work),
        task=champion.model.output.task if tensor else None,
    )
    converted = load_model(path)
    with_champion_names(converted, champion)
    check_same_input(converted, champion, source=candidate)
    return converted, outcome


def _target(champion: Champion) -> RuntimeTarget:
    """The oldest runtime the champion was built for: the candidate must load on every device it runs on."""
    runtime = champion.bundle.manifest["runtime"]
    return RuntimeTarget(min_runtime=runtime.get("min_runtime_version") or DEFAULT_MIN_RUNTIME)


def _champion_preprocessing(peek: Any, champion: Champion, work: Path) -> str | None:
    """A network that carries no preprocessing is given the champion's (as a TOML file, convert's way in);
    one that carries its own keeps it, and is refused later if it differs."""
    preprocess = champion.model.input.preprocess
    if peek.input.tensor is None or peek.input.preprocess is not None or not preprocess:
        return None
    # Settings left unset (None) are left out, which TOML cannot say otherwise.
    return str(tomlfile.write(work / "preprocess.toml", preprocess))


# -- the judgement -----------------------------------------------------------------------------------------


def _judge(
    champion: Champion, converted: Any, outcome: ConvertOutcome, gate: list[GateData], options: PromoteOptions
) -> Promotion:
    spec = champion.model.output
    metric = compare.metric_name(spec)
    scores = [_score(champion, converted, item) for item in gate]
    fresh = _pooled([s for s in scores if s.role == FRESH], spec)
    result = Promotion(
        promoted=False,
        reasons=[],
        metric=metric,
        champion=champion.describe(),
        candidate=_describe_candidate(converted, outcome),
        scores=scores,
        fresh=fresh,
        thresholds={"min_gain": options.min_gain, "max_regression": options.max_regression},
        latency=_latency(champion, converted, next(item for item in gate if item.role == FRESH), options),
        notes=list(outcome.notes) + ([f"int8 search: {outcome.search.verdict}"] if outcome.search else []),
    )
    result.reasons = _reasons(result, outcome, options)
    result.promoted = not result.reasons
    return result


def _score(champion: Champion, converted: Any, item: GateData) -> Score:
    spec = champion.model.output
    theirs = compare.task_metric(spec, champion.model.predict(item.X), item.y)
    ours = compare.task_metric(spec, converted.predict(_for(converted, champion, item.X)), item.y)
    gain = 0.0 - compare.metric_drop(spec, theirs, ours)  # 0.0 -: no "-0.0" in the JSON of a tie
    return Score(item.name, item.dataset.sha256, item.role, len(item.y), theirs, ours, gain)


def _for(converted: Any, champion: Champion, X: np.ndarray) -> np.ndarray:
    """Examples read in the champion's layout, in the candidate's (one format, so almost always the same)."""
    if converted.input.tensor is None:
        return X
    return in_layout(X, champion.model.input.tensor, converted.input.tensor)


def _pooled(scores: list[Score], spec: Any) -> Score:
    """The fresh files as one: accuracy over all their rows, or RMSE over all their squared errors."""
    rows = sum(s.rows for s in scores)

    def pool(values: list[float]) -> float:
        if spec.task == CLASSIFICATION:
            return sum(v * s.rows for v, s in zip(values, scores, strict=True)) / rows
        return float(np.sqrt(sum(v * v * s.rows for v, s in zip(values, scores, strict=True)) / rows))

    theirs, ours = pool([s.champion for s in scores]), pool([s.candidate for s in scores])
    gain = 0.0 - compare.metric_drop(spec, theirs, ours)
    return Score(" + ".join(s.file for s in scores), "", FRESH, rows, theirs, ours, gain)


def _reasons(result: Promotion, outcome: ConvertOutcome, options: PromoteOptions) -> list[str]:
    """Why the champion stays, one sentence each, in the metric's own terms; none means the candidate won."""
    reasons = []
    if not outcome.passed and outcome.search is not None:
        reasons.append(f"the int8 search kept no configuration within its limits: {outcome.search.verdict}")
    metric = result.metric
    for score in result.scores:
        if -score.gain > options.max_regression + TIE:
            reasons.append(
                f"regresses on {score.file} ({'data the champion was gated on' if score.role != FRESH else 'fresh'}): "
                f"{describe_gain(score.gain, metric)}, past --max-regression {options.max_regression}"
            )
    gain = result.fresh.gain
    if gain <= TIE or gain < options.min_gain - TIE:
        wanted = f"at least --min-gain {options.min_gain}" if options.min_gain > 0 else "a gain"
        reasons.append(
            f"{describe_gain(gain, metric)} on the fresh data ({result.fresh.file}); the gate needs {wanted}"
        )
    return reasons


def describe_gain(gain: float, metric: str) -> str:
    """``accuracy gain 1.20 points`` / ``accuracy drop …`` / ``RMSE decrease 3.00 %``: ``describe_drop``'s words."""
    if abs(gain) <= TIE:
        return "no change in accuracy" if metric == "accuracy" else "no change in RMSE"
    return compare.describe_drop(-gain, metric)


def _describe_candidate(converted: Any, outcome: ConvertOutcome) -> dict[str, Any]:
    search = outcome.search
    return {
        "source": outcome.source,
        "format": converted.kind,
        "quantization": search.chosen.name if search is not None else "float32",
        "size_bytes": converted.size_bytes,
        "sha256": converted.sha256,
        "conversion": outcome.to_dict(),
    }


def _latency(champion: Champion, converted: Any, item: GateData, options: PromoteOptions) -> dict[str, Any]:
    """p50/p99 of both, interleaved in one process (``latency.measure``) on the first fresh file's rows."""
    timed = {
        "champion": champion.model.timed_call,
        "candidate": lambda X: converted.timed_call(_for(converted, champion, X)),
    }
    timings = measure(timed, batches_from(item.X), budget_seconds=options.latency_budget, min_repeats=10)
    doc: dict[str, Any] = {side: {str(b): v for b, v in per.items()} for side, per in timings.items()}
    doc["method"] = "interleaved in one process, 1 intra-op thread"
    return doc


# -- the new bundle ----------------------------------------------------------------------------------------


def _package(
    converted: Any,
    champion: Champion,
    gate: list[GateData],
    options: PromoteOptions,
    *,
    key_path: str,
    baseline: str,
    version: int,
    output: str,
    result: Promotion,
) -> None:
    labels = None
    if converted.input.tensor is not None and converted.output.task == CLASSIFICATION:
        labels = Path(converted.path).with_name("labels.txt")  # the champion's class names, package's way in
        labels.write_text("\n".join(str(c) for c in champion.model.output.labels) + "\n", encoding="utf-8")
    build_bundle(
        converted.path,
        name=champion.bundle.name,
        version=version,
        baseline_path=baseline,
        key_path=key_path,
        output=output,
        label=options.label,
        drift=dict(champion.bundle.manifest.get("drift") or {}),
        target=_target(champion),
        labels=None if labels is None else str(labels),
        lineage=_lineage(champion, gate, options, result),
        eval_rows=_fresh_rows(converted, champion, gate),
    )


def _fresh_rows(converted: Any, champion: Champion, gate: list[GateData]) -> LabelledRows:
    """The fresh files the winner was just scored on (held out from its training), as read for the gate
    (labels as the champion's class names), calibrate its label-free accuracy estimate."""
    fresh = [item for item in gate if item.role == FRESH]
    X = np.concatenate([_for(converted, champion, item.X) for item in fresh])
    return LabelledRows(X, np.concatenate([item.y for item in fresh]), tuple(i.dataset.sha256 for i in fresh))


def _lineage(champion: Champion, gate: list[GateData], options: PromoteOptions, result: Promotion) -> dict[str, Any]:
    """What the new bundle's lineage adds to ``package``'s (commit, baseline and model hashes): its parent,
    the data it was gated on (with both scores: the next promotion requires the same files again) and
    the data it was trained on."""
    by_file = {s.sha256: s for s in result.scores}
    return {
        "parent": {"name": champion.bundle.name, "version": champion.bundle.version, "sha256": champion.sha256},
        "gated_on": [
            {
                **item.describe(),
                "champion": by_file[item.dataset.sha256].champion,
                "candidate": by_file[item.dataset.sha256].candidate,
            }
            for item in gate
        ],
        "trained_on": [{"file": Path(p).name, "sha256": data_sha256(p)} for p in options.trained_on],
        "promotion": {
            "metric": result.metric,
            "fresh_gain": result.fresh.gain,
            **result.thresholds,
            "quantization": result.candidate["quantization"],
        },
    }
