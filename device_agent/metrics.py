"""Prometheus text exposition for the agent, written by hand (a device need not carry a client library).

Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (text format 0.0.4). Every label
value goes through ``escape_label_value`` (a feature may be called ``size "cm"``), and names follow
the naming conventions ``promtool check metrics`` enforces: base units (seconds), counters ``_total``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from .serving import LATENCY_BUCKETS_MS


class Observed(Protocol):
    """What the exposition reads of an agent: its counters and state, never its internals."""

    model_info: dict[str, Any]
    stats: dict[str, Any]
    last_summary: dict[str, Any] | None
    spool: Any

    @property
    def rows_served(self) -> int: ...

    def status(self) -> dict[str, Any]: ...


def escape_label_value(value: object) -> str:
    """A label value as the text format wants it between its double quotes: ``\\``, ``"`` and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (double quotes are left alone there)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(labels: dict[str, object]) -> str:
    """``{a="x",b="y"}`` with every value escaped, or an empty string for no labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels.items()) + "}"


def format_value(value: float) -> str:
    """A sample value or ``le`` bound: Go-style ``+Inf``/``-Inf``/``NaN``, integers without a trailing ``.0``."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines += [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]


def _sample(lines: list[str], name: str, labels: dict[str, object], value: float) -> None:
    lines.append(f"{name}{format_labels(labels)} {format_value(value)}")


def render_metrics(agent: Observed) -> str:
    model = {"model": agent.model_info["name"], "version": agent.model_info["version"]}
    stats = agent.stats
    lines: list[str] = []
    _family(lines, "edgekit_predictions_total", "counter", "Rows scored.")
    _sample(lines, "edgekit_predictions_total", model, agent.rows_served)
    _family(lines, "edgekit_prediction_errors_total", "counter", "Requests refused or failed, by kind.")
    for kind, count in sorted(stats["errors"].items()):
        _sample(lines, "edgekit_prediction_errors_total", {**model, "kind": kind}, count)
    _family(lines, "edgekit_latency_seconds", "histogram", "Per-row inference latency over closed windows, in seconds.")
    cumulative = 0
    for bound_ms, count in zip([*LATENCY_BUCKETS_MS, math.inf], stats["latency_buckets"], strict=True):
        cumulative += count
        _sample(lines, "edgekit_latency_seconds_bucket", {**model, "le": format_value(bound_ms / 1000)}, cumulative)
    _sample(lines, "edgekit_latency_seconds_sum", model, round(stats["latency_sum_ms"] / 1000, 9))
    _sample(lines, "edgekit_latency_seconds_count", model, cumulative)
    _family(
        lines,
        "edgekit_unmonitored_rows_total",
        "counter",
        "Rows served but not sketched (monitoring backlog full, or left at a stop).",
    )
    status = agent.status()
    _sample(lines, "edgekit_unmonitored_rows_total", model, status["unmonitored_rows"])
    _family(
        lines,
        "edgekit_sampled_out_rows_total",
        "counter",
        "Rows served but left out of the sketches by the CPU budget's sample ([monitor] max_cpu_fraction).",
    )
    _sample(lines, "edgekit_sampled_out_rows_total", model, status["sampled_out_rows"])
    _family(lines, "edgekit_sketch_sample_rate", "gauge", "Share of the rows the monitor sketches now (1: every row).")
    _sample(lines, "edgekit_sketch_sample_rate", model, status["sample_rate"])
    _family(lines, "edgekit_windows_total", "counter", "Windows closed and spooled.")
    _sample(lines, "edgekit_windows_total", model, stats["windows"])
    _family(lines, "edgekit_spool_depth", "gauge", "Summaries waiting for the broker's acknowledgement.")
    _sample(lines, "edgekit_spool_depth", {}, agent.spool.depth())
    capture = getattr(agent, "capture", None)  # field samples (capture.py): kept, stored, dropped, uploaded
    for name, kind, help_text, samples in capture.metrics() if capture is not None else ():
        _family(lines, name, kind, help_text)
        for labels, value in samples:
            _sample(lines, name, labels, value)
    summary = agent.last_summary
    if summary is not None:
        drift = summary["drift"]
        _family(lines, "edgekit_drift_psi", "gauge", "PSI of each feature in the last closed window.")
        for name, values in drift["features"].items():
            _sample(lines, "edgekit_drift_psi", {**model, "feature": name}, values["psi"])
        _family(lines, "edgekit_drifted", "gauge", "Whether the last closed window was judged drifted.")
        _sample(lines, "edgekit_drifted", model, 1 if drift["drifted"] else 0)
    return "\n".join(lines) + "\n"
