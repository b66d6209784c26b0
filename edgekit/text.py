"""Plain-text tables for the terminal: the CLI's reports and the demo's summary print the same way."""

from __future__ import annotations


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Columns padded to their widest cell, a rule under the headers, no trailing spaces."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
