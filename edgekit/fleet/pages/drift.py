"""``/drift``: fleet-wide merged drift, and one feature's distribution over the fleet against its baseline."""

from __future__ import annotations

import html
from typing import Any

from edgekit.fleet.pages import page
from edgekit.fleet.pages.columns import category_chart


def render_fleet_drift(reports: list[dict[str, Any]], feature: str | None) -> bytes:
    """Per model version: merged drift of every feature, and the chosen (or worst) feature's
    distribution over the whole selection drawn against its baseline."""
    sections = []
    for report in reports:
        versions = ", ".join(f"v{v}" for v in report["model_versions"])
        counts = f"{report['windows']} windows, {report['rows']:,} rows, {len(report['devices'])} device(s)"
        title = f"{html.escape(report['model'])} {versions}: {counts}"
        title += f"<br><small class='muted'>{html.escape(resolutions(report))}</small>"
        if report["drift"] is None:
            sections.append(f"<h2>{title}</h2><p class='muted'>{html.escape(report['note'])}</p>")
            continue
        features = report["drift"]["features"]
        chosen = feature if feature in features else report["drift"]["worst_feature"]
        rows = "".join(
            f"<tr><td><a href='?model={html.escape(report['model'])}&version={report['model_version']}"
            f"&feature={html.escape(name)}'>{html.escape(name)}</a></td>"
            f"<td>{v['psi']:.4f}</td><td>{v['ks']:.4f}</td><td>{v['js']:.4f}</td>"
            f"<td class='{'bad' if v['drifted'] else 'ok'}'>{'yes' if v['drifted'] else 'no'}</td></tr>"
            for name, v in sorted(features.items(), key=lambda kv: -kv[1]["psi"])[:12]
        )
        categories = report.get("categories") or {}
        if chosen in categories:  # bars per category, not per bin between a minimum and a maximum
            chart = category_chart(categories[chosen])
        else:
            chart = distribution_chart(chosen, report["feature_distributions"][chosen]) if chosen else ""
        sections.append(
            f"<h2>{title}</h2><p>merged verdict: <b class='{'bad' if report['drift']['drifted'] else 'ok'}'>"
            f"{'drifted' if report['drift']['drifted'] else 'no drift'}</b></p>{chart}"
            f"<table><tr><th>feature</th><th>PSI</th><th>KS</th><th>JS</th><th>drifted</th></tr>{rows}</table>"
        )
    body = "<p><a href='/'>fleet</a></p><h1>Fleet-wide drift</h1>" + (
        "".join(sections) or "<p class='muted'>no windows stored yet</p>"
    )
    return page("fleet drift", body)


def resolutions(report: dict[str, Any]) -> str:
    """Which resolutions the merged report read: past the retention period, windows are kept as hourly and
    daily buckets of merged windows (``edgekit fleet retention``), and a range starting there starts on
    the bucket's hour or day."""
    names = {"raw": "raw windows", "hour": "hourly buckets", "day": "daily buckets"}
    parts = [f"{names.get(k, k)} ({n:,} windows)" for k, n in (report.get("resolutions") or {}).items()]
    return "from " + (", ".join(parts) or "raw windows")


def distribution_chart(feature: str, counts: dict[str, list[int]], width: int = 720, height: int = 240) -> str:
    """Bars of the baseline's and the fleet's share per bin (underflow first, overflow last), side by side."""
    baseline, window = counts["baseline"], counts["window"]
    shares = [[c / max(1, sum(series)) for c in series] for series in (baseline, window)]
    top = max(max(s) for s in shares) or 1.0
    pad, bins = 36, len(baseline)
    slot = (width - 2 * pad) / bins
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        f"aria-label='distribution of {html.escape(feature)}'>",
        f"<text x='{pad}' y='16' font-size='12'>"
        f"{html.escape(feature)}: share of rows per bin (grey: baseline, blue: fleet)</text>",
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#999'/>",
    ]
    for index in range(bins):
        for series, (color, offset) in enumerate((("#bbbbbb", 0.1), ("#1f77b4", 0.5))):
            value = shares[series][index]
            bar = (height - 2 * pad - 10) * value / top
            x, y = pad + slot * (index + offset), height - pad - bar
            parts.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{slot * 0.38:.1f}' height='{bar:.1f}' fill='{color}'/>")
    parts.append(f"<text x='{pad}' y='{height - 12}' font-size='10'>below baseline min</text>")
    parts.append(
        f"<text x='{width - pad}' y='{height - 12}' font-size='10' text-anchor='end'>above baseline max</text></svg>"
    )
    return "".join(parts)
