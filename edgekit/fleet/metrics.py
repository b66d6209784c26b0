"""The collector's /metrics, built with prometheus-client from the store and the ingest counters."""

from __future__ import annotations

from typing import Any, Protocol

from edgekit.fleet.store import SqlStore


class Observed(Protocol):
    """What /metrics reads: the store, the ingest counters, the alert engine (or None), and the collector's
    ``leader.Leadership`` (``holder``, ``leading()``)."""

    store: SqlStore
    ingestor: Any
    alerts: Any
    leader: Any


def render(collector: Observed) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Fleet:
        def collect(self):
            status = collector.store.status()
            devices = GaugeMetricFamily(
                "edgekit_fleet_devices", "Devices known to the collector, by state.", labels=["state"]
            )
            devices.add_metric(["online"], sum(1 for d in status if d["online"]))
            devices.add_metric(["offline"], sum(1 for d in status if not d["online"]))
            yield devices
            drifted = GaugeMetricFamily(
                "edgekit_device_drifted",
                "Latest window's drift verdict per device.",
                labels=["device", "fleet", "model"],
            )
            rows = CounterMetricFamily("edgekit_device_rows", "Rows summarised per device.", labels=["device", "fleet"])
            missing = GaugeMetricFamily(
                "edgekit_device_missing_windows", "Seq gaps still unfilled per device.", labels=["device"]
            )
            for d in status:
                drifted.add_metric([d["device"], d["fleet"], str(d["model"])], 1.0 if d["drifted"] else 0.0)
                rows.add_metric([d["device"], d["fleet"]], d["rows"])
                missing.add_metric([d["device"]], d["missing_seqs"])
            yield drifted
            yield rows
            yield missing
            ingest = CounterMetricFamily(
                "edgekit_collector_messages", "Messages handled by outcome.", labels=["outcome"]
            )
            for outcome, count in sorted(collector.ingestor.counters.items()):
                ingest.add_metric([outcome], count)
            yield ingest
            rejected = CounterMetricFamily(
                "edgekit_collector_rejected",
                "Payloads rejected, by reason (all collectors on this store).",
                labels=["reason"],
            )
            for reason, count in sorted(collector.store.rejects().items()):
                rejected.add_metric([reason], count)
            yield rejected
            yield from _leader(collector)
            yield from _rollout_errors(collector)
            from edgekit.fleet.samples import sample_metrics  # field-sample uploads and rows (samples.py)

            yield from sample_metrics(collector.store)
            if collector.alerts is not None:
                alerts = GaugeMetricFamily("edgekit_alerts_open", "Open alerts by rule.", labels=["rule"])
                for rule, count in collector.alerts.open_counts().items():
                    alerts.add_metric([rule], count)
                yield alerts

    registry = CollectorRegistry()
    registry.register(_Fleet())
    return generate_latest(registry)


def _leader(collector: Observed) -> Any:
    """1 on the collector that holds the fleet database's lease (and runs alerts, gap requests and rollouts),
    0 on the others: summed over the collectors, anything but 1 for long is worth an alert."""
    from prometheus_client.core import GaugeMetricFamily

    leader = getattr(collector, "leader", None)
    if leader is None:
        return
    gauge = GaugeMetricFamily(
        "edgekit_collector_leader",
        "1 when this collector holds the leader lease (alerts, gap requests, rollouts), else 0.",
        labels=["collector"],
    )
    gauge.add_metric([leader.holder], 1.0 if leader.leading() else 0.0)
    yield gauge


def _rollout_errors(collector: Observed) -> Any:
    """Rollout steps that raised on this collector (each rollout is advanced apart, so one broken rollout
    never stops the others; ``rollouts.RolloutController.tick``): anything but 0 is worth a look at its logs."""
    from prometheus_client.core import CounterMetricFamily

    rollouts = getattr(collector, "rollouts", None)
    if rollouts is None:
        return
    errors = CounterMetricFamily(
        "edgekit_collector_rollout_step_errors", "Rollout steps that raised on this collector, since it started."
    )
    errors.add_metric([], getattr(rollouts, "tick_errors", 0))
    yield errors
