"""The figures table every bench script prints, and the JSON file it writes beside it.

A check is ``(figure, measured value or None, target text, ok)``; a target of ``info`` is shown
without a verdict. The JSON holds the bench's own sections plus the checks, so a run can be compared
with the README's figures later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Check = tuple[str, Any, str, bool]


def print_checks(checks: list[Check]) -> None:
    width = max(len(c[0]) for c in checks)
    target_width = max(8, *(len(c[2]) for c in checks))
    print(f"{'figure'.ljust(width)}  {'measured':>10}  target")
    for name, value, target, ok in checks:
        shown = "n/a" if value is None else f"{value:.4g}"
        verdict = "" if target == "info" else "ok" if ok else "MISS"
        print(f"{name.ljust(width)}  {shown:>10}  {target:<{target_width}} {verdict}")


def print_run(results: dict[str, Any], *, quick: bool, how: str = "", steps: dict[str, float] | None = None) -> None:
    """The last line of a bench run: its wall time (by step), the machine's CPUs and load before and
    after (these machines are shared: a figure means little without them), and how it timed."""
    load = results["machine"]["load_average"][0], results["machine"]["load_average_after"][0]
    by_step = f" ({', '.join(f'{k} {v:.0f}' for k, v in steps.items())})" if steps else ""
    print(
        f"\n{'quick (smoke test, not figures): ' if quick else ''}{results['seconds']:.0f} s{by_step} on "
        f"{results['machine']['cpus']} CPUs, load average {load[0]:.1f} before, {load[1]:.1f} after"
        + (f"; {how}" if how else "")
    )


def write_json(out: str | Path, checks: list[Check], **sections: Any) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **sections,
        "checks": [{"figure": c[0].strip(), "value": c[1], "target": c[2], "ok": c[3]} for c in checks],
    }
    out.write_text(json.dumps(document, indent=1, default=str))
    print(f"wrote {out}")
    return out
