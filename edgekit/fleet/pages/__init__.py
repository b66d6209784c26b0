"""The dashboard's pages: server-rendered HTML and inline SVG from plain data (no JavaScript, no build step).

One module a page; each renders from what the store or the rollout controller returns and never
queries anything itself, so ``web.py`` only routes. Imports: the standard library only.
"""

from __future__ import annotations

import html

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

STYLE = (
    "\n"
    "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222} h1{font-size:1.4rem} "
    "table{border-collapse:collapse;margin:.5rem 0 1.5rem}\n"
    "th,td{padding:.3rem .7rem;border-bottom:1px solid #ddd;text-align:left;font-size:.9rem} th{background:#f4f4f4}\n"
    ".bad{color:#b00020;font-weight:600} .ok{color:#137333} .muted{color:#888} "
    "svg{background:#fafafa;border:1px solid #ddd}\n"
)


def page(title: str, body: str) -> bytes:
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>".encode()
