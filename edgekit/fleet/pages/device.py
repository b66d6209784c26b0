"""``/devices/<device>``: one device's drift per feature over time, its windows, and its input columns
(categorical distributions against the baseline, data quality per column: ``columns.py``)."""

from __future__ import annotations

import html
from typing import Any

from edgekit.fleet.pages import PALETTE, page
from edgekit.fleet.pages.columns import render_columns


def render_device(
    device: str,
    summaries: list[dict[str, Any]],
    columns: dict[str, Any] | None = None,
    facts: list[dict[str, Any]] | None = None,
) -> bytes:
    """The page; ``columns`` is ``merge.device_columns`` of the same summaries (no column sections without it);
    ``facts`` are the stored alert facts of its recent windows (``recent_facts``), whose label-free estimates
    are shown beside the accuracy delayed labels gave (no section when no window has either)."""
    if not summaries:
        return page(
            device,
            f"<h1>{html.escape(device)}</h1><p class='muted'>no windows stored yet</p><p><a href='/'>fleet</a></p>",
        )
    summaries.sort(key=lambda s: s["seq"])
    features = list(summaries[-1]["drift"]["features"])
    # the features that ever moved the most, so the plot shows what matters
    # The features that drifted in most windows, then the highest PSI, so the plot shows what matters:
    # raw PSI alone puts near-constant pixels first (high PSI on few rows, which the verdict discounts).
    drifted = {f: sum(bool(s["drift"]["features"].get(f, {}).get("drifted")) for s in summaries) for f in features}
    peak = {f: max(s["drift"]["features"].get(f, {}).get("psi", 0.0) for s in summaries) for f in features}
    shown = sorted(features, key=lambda f: (-drifted[f], -peak[f]))[:6]
    chart = drift_chart(summaries, shown)
    latest = summaries[-1]
    # a window too small for a verdict (the stub an agent closes on shutdown) has PSIs but no verdict:
    # the table shows the last window that was tested, and says so
    tested = [s for s in summaries if s["drift"].get("tested", True)]
    judged = tested[-1] if tested else latest
    note = (
        f"<p class='muted'>the last window ({latest['rows']} rows) was too small for a drift verdict; "
        f"this is window {judged['seq']} ({judged['rows']} rows)</p>"
        if judged is not latest
        else ""
    )
    rows = "".join(
        f"<tr><td>{html.escape(f)}</td><td>{v['psi']:.4f}</td><td>{v['ks']:.4f}</td><td>{v['js']:.4f}</td>"
        f"<td class='{'bad' if v.get('drifted') else 'ok'}'>{'yes' if v.get('drifted') else 'no'}</td></tr>"
        for f, v in sorted(
            judged["drift"]["features"].items(), key=lambda kv: (not kv[1].get("drifted"), -kv[1]["psi"])
        )[:15]
    )
    model = f"model {html.escape(latest['model']['name'])} v{latest['model']['version']}"
    header = "<tr><th>feature</th><th>PSI</th><th>KS</th><th>JS</th><th>drifted</th></tr>"
    body = (
        f"<p><a href='/'>fleet</a></p><h1>{html.escape(device)}</h1>"
        f"<p class='muted'>{len(summaries)} windows, {model}, last window {html.escape(latest['window']['end'])}</p>"
        f"<h2>Drift per feature (PSI) over windows</h2>{chart}"
        f"<h2>Latest window</h2>{note}<table>{header}{rows}</table>"
        + render_estimates(facts or [])
        + (render_columns(columns) if columns else "")
    )
    return page(device, body)


def render_estimates(facts: list[dict[str, Any]], limit: int = 12) -> str:
    """Estimated (from confidence, no labels) beside realized (delayed labels) accuracy, newest window first;
    a regressor's estimate is its expected absolute error."""
    shown = [f for f in facts if any(f.get(k) is not None for k in ("estimated_accuracy", "estimated_mae", "accuracy"))]
    if not shown:
        return ""

    def cell(value: Any, digits: str = ".3f") -> str:
        return "<td class='muted'>–</td>" if value is None else f"<td>{value:{digits}}</td>"

    regression = any(f.get("estimated_mae") is not None for f in shown)
    metric = "MAE" if regression else "accuracy"
    rows = "".join(
        f"<tr><td>{f['seq']}</td><td>{html.escape(str(f['window'].get('end', '')))}</td><td>{f['rows']}</td>"
        + cell(f.get("estimated_mae" if regression else "estimated_accuracy"))
        + cell(f.get("expected_mae" if regression else "expected_accuracy"))
        + cell(f.get("accuracy"))
        + "</tr>"
        for f in shown[:limit]
    )
    header = (
        f"<tr><th>seq</th><th>window end</th><th>rows</th><th>estimated {metric}</th>"
        f"<th>expected (eval data)</th><th>realized accuracy (labels)</th></tr>"
    )
    return (
        f"<h2>Estimated vs realized accuracy</h2><p class='muted'>the estimate reads each window's confidence "
        f"histogram through the bundle's calibration (edgekit package --eval); labels arrive later, if ever</p>"
        f"<table>{header}{rows}</table>"
    )


def drift_chart(summaries: list[dict[str, Any]], features: list[str], width: int = 720, height: int = 260) -> str:
    """An inline SVG line chart of PSI per feature across windows, with a legend."""
    pad, legend = 40, 150
    plot_w, plot_h = width - pad - legend, height - 2 * pad
    top = max([0.05] + [s["drift"]["features"].get(f, {}).get("psi", 0.0) for s in summaries for f in features])
    count = max(1, len(summaries) - 1)
    x = lambda i: pad + plot_w * i / count  # noqa: E731
    y = lambda v: pad + plot_h * (1 - v / top)  # noqa: E731
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        "aria-label='drift per feature'>",
        f"<line x1='{pad}' y1='{pad + plot_h}' x2='{pad + plot_w}' y2='{pad + plot_h}' stroke='#999'/>",
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{pad + plot_h}' stroke='#999'/>",
        f"<text x='{pad - 4}' y='{pad + 4}' font-size='10' text-anchor='end'>{top:.2f}</text>",
        f"<text x='{pad - 4}' y='{pad + plot_h}' font-size='10' text-anchor='end'>0</text>",
        f"<text x='{pad + plot_w / 2}' y='{height - 8}' font-size='11' text-anchor='middle'>"
        f"window (seq {summaries[0]['seq']}…{summaries[-1]['seq']})</text>",
    ]
    for index, feature in enumerate(features):
        color = PALETTE[index % len(PALETTE)]
        points = " ".join(
            f"{x(i):.1f},{y(s['drift']['features'].get(feature, {}).get('psi', 0.0)):.1f}"
            for i, s in enumerate(summaries)
        )
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{points}'/>")
        parts.append(f"<rect x='{width - legend + 10}' y='{pad + 16 * index}' width='10' height='10' fill='{color}'/>")
        parts.append(
            f"<text x='{width - legend + 26}' y='{pad + 9 + 16 * index}' font-size='11'>{html.escape(feature)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
