"""The per-column parts of the device page (and of ``/drift`` for a categorical feature).

A categorical column is drawn as bars, one pair per category: the baseline's share of rows beside
the recent windows' share, then "other", "unseen" and "missing", so a category losing rows to
another, or values the model never saw, show at a glance. Data quality is a table of each
column's null, unseen and out-of-range shares over the same windows. Both render from plain data
(``merge.device_columns``: the windows merged on their baseline).
"""

from __future__ import annotations

import html
from typing import Any

SLOTS = ("other", "unseen", "missing")  # the last parts of every categorical column, after its categories
MAX_QUALITY_ROWS = 20
BASELINE_COLOR, RECENT_COLOR, UNSEEN_COLOR = "#bbbbbb", "#1f77b4", "#d62728"


def render_columns(columns: dict[str, Any]) -> str:
    """The device page's sections on its inputs: categorical distributions, then data quality."""
    if columns["note"]:
        return f"<h2>Input columns</h2><p class='muted'>{html.escape(columns['note'])}</p>"
    if not columns["windows"]:
        return ""
    parts = []
    if columns["categories"]:
        parts.append(
            f"<h2>Categorical columns: last {columns['windows']} windows against the baseline</h2>"
            "<p class='muted'>share of rows per category (grey: baseline, blue: recent windows, red: unseen). "
            "other: a value the baseline saw outside its top categories; unseen: a value it never saw; "
            "missing: no value</p>"
        )
        parts += [category_chart(column) for column in columns["categories"]]
    parts.append(quality_table(columns))
    return "".join(parts)


def category_chart(column: dict[str, Any], height: int = 220, slot: int = 44) -> str:
    """Bars of the baseline's and the recent windows' share of rows per part, side by side."""
    labels, name = column["labels"], column["column"]
    series = (column["baseline"], column["recent"])
    rows = [sum(counts) for counts in series]
    shares = [[c / max(1, total) for c in counts] for counts, total in zip(series, rows, strict=True)]
    top = max(max(share) for share in shares) or 1.0
    pad = 36
    width = max(420, 2 * pad + slot * len(labels))
    floor, scale = height - pad, (height - 2 * pad - 14) / top
    unseen, missing = shares[1][-2], shares[1][-1]
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        f"aria-label='categories of {html.escape(name)}'>",
        f"<text x='{pad}' y='16' font-size='12'>{html.escape(name)}: {rows[1]:,} recent rows; "
        f"unseen {unseen:.1%}, missing {missing:.1%}</text>",
        f"<line x1='{pad}' y1='{floor}' x2='{width - pad}' y2='{floor}' stroke='#999'/>",
        f"<text x='{pad - 4}' y='{floor - scale * top + 4:.1f}' font-size='10' text-anchor='end'>{top:.0%}</text>",
        f"<text x='{pad - 4}' y='{floor}' font-size='10' text-anchor='end'>0</text>",
    ]
    for index, label in enumerate(labels):
        special = index >= len(labels) - len(SLOTS)
        recent_color = UNSEEN_COLOR if index == len(labels) - 2 else RECENT_COLOR
        for share, (color, offset, which) in zip(
            shares, ((BASELINE_COLOR, 0.1, "baseline"), (recent_color, 0.5, "recent")), strict=True
        ):
            value = share[index]
            x, bar = pad + slot * (index + offset), scale * value
            parts.append(
                f"<rect x='{x:.1f}' y='{floor - bar:.1f}' width='{slot * 0.38:.1f}' height='{bar:.1f}' "
                f"fill='{color}'><title>{html.escape(label)}: {which} {value:.1%}</title></rect>"
            )
        style = " font-style='italic'" if special else ""
        parts.append(
            f"<text x='{pad + slot * (index + 0.45):.1f}' y='{floor + 14}' font-size='10' text-anchor='middle'"
            f"{style}>{html.escape(label[:7])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def quality_table(columns: dict[str, Any]) -> str:
    """Each column's null, unseen and out-of-range shares over the recent windows, worst first."""
    head = f"<h2>Data quality per column: last {columns['windows']} windows, {columns['rows']:,} rows</h2>"
    quality, kinds = columns["quality"], columns["kinds"]
    ordered = sorted(quality.items(), key=lambda kv: (-max(kv[1].values(), default=0.0), kv[0]))
    rows = "".join(_quality_row(name, shares, kinds.get(name, "?")) for name, shares in ordered[:MAX_QUALITY_ROWS])
    clean = sum(1 for name in kinds if name not in quality)
    footer = (
        f"<p class='muted'>{len(ordered) - MAX_QUALITY_ROWS} more columns not shown</p>"
        if len(ordered) > MAX_QUALITY_ROWS
        else ""
    ) + (f"<p class='muted'>{clean} other columns: no missing, unseen or out-of-range values</p>" if clean else "")
    header = "<tr><th>column</th><th>kind</th><th>null rate</th><th>unseen rate</th><th>out-of-range rate</th></tr>"
    rows = rows or "<tr><td colspan='5' class='muted'>no missing, unseen or out-of-range values</td></tr>"
    return f"{head}<table>{header}{rows}</table>{footer}"


def _quality_row(name: str, shares: dict[str, float], kind: str) -> str:
    return (
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(kind)}</td><td>{_rate(shares, 'null_rate', True)}</td>"
        f"<td>{_rate(shares, 'unseen_rate', kind == 'categorical')}</td>"
        f"<td>{_rate(shares, 'out_of_range_rate', kind == 'numeric')}</td></tr>"
    )


def _rate(shares: dict[str, float], key: str, applies: bool) -> str:
    """A share as a percentage; '-' where it cannot apply (no unseen numbers, no out-of-range categories)."""
    return f"{shares.get(key, 0.0):.2%}" if applies else "<span class='muted'>-</span>"
