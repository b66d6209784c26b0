"""Choosing an int8 configuration by measured accuracy and speed, not by hope.

Each candidate configuration is quantized, scored on labelled evaluation rows, and timed against
float32 interleaved in one process (batch 1 and 256, one thread). The fastest candidate within the
accuracy limit wins, but only if it is not slower than float32 at either batch size: int8 is not
always faster (Q/DQ overhead dominates small layers), and then float32 is kept unless forced.
Nor, by default, may it be larger than float32: on a device bytes cost flash, download and RAM, and
Q/DQ nodes make a small model grow; ``prefer="speed"`` lets a faster but larger candidate win.
When no candidate is within the limit, the nodes with the worst quantization error are kept in
float and the best static configuration is tried again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.build.layer_error import layer_errors, worst_nodes
from edgekit.build.onnx_export import serialize, stamp_metadata
from edgekit.build.quantize import QuantConfig, calibration_steps, quantize
from edgekit.errors import NotQuantizableError, QuantizationError
from edgekit.models import compare
from edgekit.models.latency import batches_from, measure
from edgekit.models.loading import METADATA_QUANTIZATION, OnnxModel
from edgekit.models.targets import RuntimeTarget
from edgekit.progress import NoProgress, Progress

FLOAT32 = "float32"
FLOAT_NODE_ROUNDS = (1, 2, 4)
PREFER = ("size", "speed")


@dataclass
class Trial:
    name: str
    config: QuantConfig | None
    proto: Any = field(default=None, repr=False)
    size_bytes: int = 0
    metric: float | None = None
    drop: float | None = None
    agreement: float | None = None
    latency: dict[int, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    within: bool | None = None
    note: str | None = None  # why the choice passed this trial over, when it was not for its limits

    def size_ratio(self, baseline: Trial) -> float | None:
        return self.size_bytes / baseline.size_bytes if self.size_bytes and baseline.size_bytes else None

    def larger_than(self, baseline: Trial) -> bool:
        return self.size_bytes > baseline.size_bytes

    def speedup(self, baseline: Trial, batch: int) -> float | None:
        mine, theirs = self.latency.get(batch), baseline.latency.get(batch)
        if not mine or not theirs:
            return None
        return theirs["p50_ms"] / mine["p50_ms"]

    def speed_score(self, baseline: Trial) -> float:
        speedups = [self.speedup(baseline, b) for b in self.latency]
        speedups = [s for s in speedups if s]
        return math.exp(sum(math.log(s) for s in speedups) / len(speedups)) if speedups else 0.0

    def not_slower(self, baseline: Trial) -> bool:
        return all((self.speedup(baseline, b) or 0.0) >= 1.0 for b in baseline.latency)

    def to_dict(self, baseline: Trial) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config.to_dict() if self.config else None,
            "size_bytes": self.size_bytes,
            "size_ratio": self.size_ratio(baseline),
            "metric": self.metric,
            "accuracy_drop": self.drop,
            "agreement": self.agreement,
            "within_limit": self.within,
            "latency": {str(b): v for b, v in self.latency.items()},
            "speedup": {str(b): self.speedup(baseline, b) for b in self.latency},
            "error": self.error,
            "note": self.note,
        }


@dataclass
class SearchOutcome:
    chosen: Trial
    baseline: Trial
    trials: list[Trial]
    passed: bool
    verdict: str
    metric_name: str
    limits: Limits
    prefer: str = "size"

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.name,
            "quantized": self.chosen.config is not None,
            "passed": self.passed,
            "verdict": self.verdict,
            "metric": self.metric_name,
            "max_accuracy_drop": self.limits.max_drop,
            "accuracy_drop_meaning": compare.DROP_MEANING[self.metric_name],
            "agreement_meaning": compare.AGREEMENT_MEANING[
                "classification" if self.metric_name == "accuracy" else "regression"
            ],
            "min_agreement": self.limits.min_agreement,
            "prefer": self.prefer,
            "size_ratio_of": FLOAT32,
            "latency_method": "interleaved in one process, 1 intra-op thread, p50 of repeated calls",
            "trials": [t.to_dict(self.baseline) for t in [self.baseline, *self.trials]],
        }


def candidate_configs(
    *,
    calibrated: bool,
    calibration: str = "minmax",
    mode: str | None = None,
    per_channel: bool | None = None,
    activation_type: str | None = None,
    weight_type: str | None = None,
) -> list[QuantConfig]:
    """The configurations worth trying, narrowed by any choice the user made explicitly."""
    configs = [QuantConfig("dynamic")]
    if calibrated:
        configs += [
            QuantConfig("static", per_channel=pc, activation_type=act, weight_type="int8", calibration=calibration)
            for act in ("uint8", "int8")
            for pc in (False, True)
        ]
    return [
        c
        for c in configs
        if (mode is None or c.mode == mode)
        and (per_channel is None or c.per_channel == per_channel)
        and (activation_type is None or c.mode == "dynamic" or c.activation_type == activation_type)
        and (weight_type is None or c.weight_type == weight_type)
    ]


def search(
    fp32_proto: Any,
    configs: list[QuantConfig],
    *,
    rows: np.ndarray,
    labels: np.ndarray | None,
    calibration: np.ndarray | None,
    max_drop: float | None,
    min_agreement: float | None = None,
    force: bool = False,
    prefer: str = "size",
    target: RuntimeTarget = RuntimeTarget(),
    progress: Progress = NoProgress(),
    source: str = "model",
    latency_budget: float = 3.0,
) -> SearchOutcome:
    reference = OnnxModel.from_bytes(serialize(fp32_proto), path=source)
    spec = reference.output
    reference_prediction = reference.predict(rows)
    stamp_quantization(fp32_proto, None)
    baseline = Trial(
        FLOAT32,
        None,
        fp32_proto,
        len(serialize(fp32_proto)),
        compare.task_metric(spec, reference_prediction, labels),
        0.0,
        1.0,
        within=True,
    )
    steps_per_static = calibration_steps(len(calibration)) if calibration is not None else 0
    progress.start(sum(1 + (steps_per_static if c.mode == "static" else 0) for c in configs) + 1, "quantizing")
    limits = Limits(max_drop if labels is not None else None, min_agreement)
    context = _Context(
        fp32_proto, rows, labels, calibration, limits, target, progress, source, reference_prediction, baseline, spec
    )
    trials = [context.try_config(config) for config in configs]
    if limits.any and not any(t.within for t in trials):
        trials += context.keep_worst_in_float(trials)
    timed = [t for t in trials if t.error is None]
    latencies = measure(
        {t.name: _runner(t, source) for t in [baseline, *timed]}, batches_from(rows), budget_seconds=latency_budget
    )
    for trial in [baseline, *timed]:
        trial.latency = latencies[trial.name]
    progress.advance()
    progress.finish()
    return _choose(baseline, trials, limits=limits, force=force, metric_name=compare.metric_name(spec), prefer=prefer)


@dataclass(frozen=True)
class Limits:
    """What a candidate must meet: a largest accuracy drop (needs labels), a smallest agreement with float32."""

    max_drop: float | None = None
    min_agreement: float | None = None

    @property
    def any(self) -> bool:
        return self.max_drop is not None or self.min_agreement is not None

    def holds(self, trial: Trial) -> bool | None:
        if not self.any:
            return None
        drop_ok = self.max_drop is None or (trial.drop is not None and trial.drop <= self.max_drop)
        agreement_ok = self.min_agreement is None or (
            trial.agreement is not None and trial.agreement >= self.min_agreement
        )
        return drop_ok and agreement_ok

    def describe(self, metric_name: str = "accuracy") -> str:
        parts = []
        if self.max_drop is not None:
            parts.append(compare.describe_drop_limit(self.max_drop, metric_name))
        if self.min_agreement is not None:
            parts.append(f"agreement ≥ {self.min_agreement:.4f}")
        return " and ".join(parts)


@dataclass
class _Context:
    fp32_proto: Any
    rows: np.ndarray
    labels: np.ndarray | None
    calibration: np.ndarray | None
    limits: Limits
    target: RuntimeTarget
    progress: Progress
    source: str
    reference_prediction: Any
    baseline: Trial
    spec: Any

    def try_config(self, config: QuantConfig) -> Trial:
        trial = Trial(config.label, config)
        try:
            trial.proto = quantize(
                self.fp32_proto,
                config,
                calibration=self.calibration,
                target=self.target,
                progress=lambda n: self.progress.advance(n),
                source=self.source,
            )
            stamp_quantization(trial.proto, config)  # before measuring: the size in the table is the size written
        except NotQuantizableError:
            raise
        except QuantizationError as exc:
            trial.error = exc.problem
            self.progress.advance()
            return trial
        model = OnnxModel.from_bytes(serialize(trial.proto), path=f"{self.source} ({config.label})")
        prediction = model.predict(self.rows)
        trial.size_bytes = model.size_bytes
        trial.metric = compare.task_metric(self.spec, prediction, self.labels)
        trial.drop = compare.metric_drop(self.spec, self.baseline.metric, trial.metric)
        trial.agreement = compare.agreement(self.spec, self.reference_prediction, prediction)
        trial.within = self.limits.holds(trial)
        self.progress.advance()
        return trial

    def keep_worst_in_float(self, trials: list[Trial]) -> list[Trial]:
        """Retry the most accurate static candidate with its worst layers left in float."""
        static = [t for t in trials if t.error is None and t.config and t.config.mode == "static"]
        if not static:
            return []
        best = min(static, key=lambda t: (t.drop if t.drop is not None else 0.0, -(t.agreement or 0.0)))
        report = layer_errors(self.fp32_proto, best.proto, self.rows)
        retried: list[Trial] = []
        for count in FLOAT_NODE_ROUNDS:
            nodes = worst_nodes(report, count)
            if len(nodes) < count or (retried and retried[-1].config.exclude == nodes):
                break
            self.progress.start(calibration_steps(len(self.calibration)) + 1, f"keeping {count} node(s) in float")
            retried.append(self.try_config(best.config.excluding(nodes)))
            if retried[-1].within:
                break
        return retried


def _runner(trial: Trial, source: str):
    model = OnnxModel.from_bytes(serialize(trial.proto), path=f"{source} ({trial.name})")
    return model.raw


def _choose(
    baseline: Trial, trials: list[Trial], *, limits: Limits, force: bool, metric_name: str, prefer: str = "size"
) -> SearchOutcome:
    """The fastest candidate within the limits that is neither slower than float32 nor (unless
    ``prefer="speed"``) larger; float32 when there is none, int8 anyway with ``force``."""
    usable = [t for t in trials if t.error is None]

    def outcome(chosen: Trial, passed: bool, verdict: str) -> SearchOutcome:
        return SearchOutcome(chosen, baseline, trials, passed, verdict, metric_name, limits, prefer)

    if not usable:
        return outcome(baseline, False, "every int8 configuration failed to quantize; kept float32")
    within = [t for t in usable if t.within is not False]
    if not within:
        best = min(usable, key=lambda t: (t.drop if t.drop is not None else 0.0, -(t.agreement or 0.0)))
        return outcome(
            best,
            False,
            f"no int8 candidate meets {limits.describe(metric_name)}; kept the most accurate, {best.name} "
            f"({compare.describe_drop(best.drop, metric_name)}, agreement {best.agreement:.4f})",
        )
    eligible = _small_enough(within, baseline, prefer)
    faster = [t for t in eligible if t.not_slower(baseline)]
    if faster:
        chosen = max(faster, key=lambda t: t.speed_score(baseline))
        verdict = (
            f"chose {chosen.name}: {_speed(chosen, baseline)}, {_size(chosen, baseline)}"
            f"{_drop_text(chosen, metric_name)}"
        )
        return outcome(chosen, True, verdict)
    if force:
        chosen = max(eligible or within, key=lambda t: t.speed_score(baseline))
        chosen.note = None
        return outcome(
            chosen, True, f"kept {chosen.name} because of --force, though it is {_shortfall(chosen, baseline)}"
        )
    return outcome(baseline, True, _kept_float_verdict(within, baseline))


def _small_enough(within: list[Trial], baseline: Trial, prefer: str) -> list[Trial]:
    """The candidates whose size is allowed; the others get a note that says why they were passed over."""
    if prefer == "speed":
        return within
    for trial in within:
        if trial.larger_than(baseline):
            allows = "; --prefer speed allows it" if trial.not_slower(baseline) else ""
            trial.note = f"larger than float32 ({trial.size_ratio(baseline):.2f}x){allows}"
    return [t for t in within if not t.larger_than(baseline)]


def _kept_float_verdict(within: list[Trial], baseline: Trial) -> str:
    """Why float32 was kept: no faster int8 candidate, or only larger ones (say which, and the option)."""
    larger_faster = [t for t in within if t.note and t.not_slower(baseline)]
    if larger_faster:
        best = max(larger_faster, key=lambda t: t.speed_score(baseline))
        return (
            f"kept float32: the int8 candidates that are faster are larger than float32 "
            f"(best, {best.name}: {_speed(best, baseline)}, {_size(best, baseline)}); pass --prefer speed to keep it"
        )
    fastest = max(within, key=lambda t: t.speed_score(baseline))
    return (
        "kept float32: int8 is slower than float32 on this host "
        f"(best int8, {fastest.name}: {_speed(fastest, baseline)}); "
        "pass --force to keep int8 anyway"
    )


def _shortfall(trial: Trial, baseline: Trial) -> str:
    reasons = []
    if not trial.not_slower(baseline):
        reasons.append(f"slower than float32 on this host ({_speed(trial, baseline)})")
    if trial.larger_than(baseline):
        reasons.append(f"larger than float32 ({_size(trial, baseline)})")
    return " and ".join(reasons) or "no better than float32"


def _speed(trial: Trial, baseline: Trial) -> str:
    return ", ".join(f"{trial.speedup(baseline, b):.2f}x float32 speed at batch {b}" for b in sorted(trial.latency))


def _size(trial: Trial, baseline: Trial) -> str:
    return (
        f"{trial.size_ratio(baseline):.2f}x the size of float32 ({trial.size_bytes:,} B vs {baseline.size_bytes:,} B)"
    )


def _drop_text(trial: Trial, metric_name: str) -> str:
    return "" if trial.drop is None else f", {compare.describe_drop(trial.drop, metric_name)}"


def stamp_quantization(proto: Any, config: QuantConfig | None) -> None:
    """Record in the model how it was quantized (``{"mode": "none"}`` for float32)."""
    stamp_metadata(proto, METADATA_QUANTIZATION, json.dumps(config.to_dict() if config else {"mode": "none"}))
