"""Prometheus text exposition for the agent, written by hand (a device need not carry a client library)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agent import Agent


def render_metrics(agent: Agent) -> str:
    from .agent import LATENCY_BUCKETS_MS

    labels = f'model="{agent.model_info["name"]}",version="{agent.model_info["version"]}"'
    stats = agent.stats
    lines = [
        "# HELP edgekit_predictions_total Rows scored.",
        "# TYPE edgekit_predictions_total counter",
        f"edgekit_predictions_total{{{labels}}} {agent._counter}",
        "# HELP edgekit_prediction_errors_total Requests refused or failed, by kind.",
        "# TYPE edgekit_prediction_errors_total counter",
    ]
    lines += [f'edgekit_prediction_errors_total{{{labels},kind="{kind}"}} {count}' for kind, count in sorted(stats["errors"].items())]
    lines += ["# HELP edgekit_latency_ms Per-row inference latency over closed windows.", "# TYPE edgekit_latency_ms histogram"]
    cumulative = 0
    for bound, count in zip([*LATENCY_BUCKETS_MS, "+Inf"], stats["latency_buckets"]):
        cumulative += count
        lines.append(f'edgekit_latency_ms_bucket{{{labels},le="{bound}"}} {cumulative}')
    lines += [f"edgekit_latency_ms_sum{{{labels}}} {stats['latency_sum_ms']:.6f}", f"edgekit_latency_ms_count{{{labels}}} {cumulative}"]
    lines += ["# HELP edgekit_windows_total Windows closed and spooled.", "# TYPE edgekit_windows_total counter", f"edgekit_windows_total{{{labels}}} {stats['windows']}"]
    lines += ["# HELP edgekit_spool_depth Summaries waiting for the broker's acknowledgement.", "# TYPE edgekit_spool_depth gauge", f"edgekit_spool_depth {agent.spool.depth()}"]
    summary = agent.last_summary
    if summary is not None:
        drift = summary["drift"]
        lines += ["# HELP edgekit_drift_psi PSI of each feature in the last closed window.", "# TYPE edgekit_drift_psi gauge"]
        lines += [f'edgekit_drift_psi{{{labels},feature="{name}"}} {values["psi"]}' for name, values in drift["features"].items()]
        lines += ["# HELP edgekit_drifted Whether the last closed window was judged drifted.", "# TYPE edgekit_drifted gauge",
                  f"edgekit_drifted{{{labels}}} {1 if drift['drifted'] else 0}"]
    return "\n".join(lines) + "\n"
