"""The dashboard's rollouts pages: each rollout's waves, its devices per state, and their reasons."""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import Any

from edgekit.fleet.pages import page

STATE_CLASS = {
    "succeeded": "ok",
    "failed": "bad",
    "rolled_back": "bad",
    "aborted": "bad",
    "running": "",
    "paused": "muted",
}
DEVICE_STATES = (
    "pending",
    "sent",
    "downloading",
    "verifying",
    "selftest",
    "shadow",
    "swapping",
    "watching",
    "retrying",
    "succeeded",
    "failed",
    "rolled_back",
    "aborted",
)


def render_rollouts(rollouts: list[dict[str, Any]]) -> bytes:
    rows = (
        "".join(
            f"<tr><td><a href='/rollouts/{html.escape(r['id'])}'>{html.escape(r['id'])}</a></td>"
            f"<td>{html.escape(r['kind'])}</td>"
            f"<td>{html.escape(r['fleet'])}</td><td>{html.escape(r['name'])} v{r['version']}</td>"
            f"<td class='{STATE_CLASS.get(r['state'], '')}'>{html.escape(r['state'])}</td>"
            f"<td>{r['wave']} of {len(r['waves'])}</td>"
            f"<td>{_counts(r['counts'])}</td><td>{html.escape(r['reason'] or '')}</td>"
            f"<td>{_when(r['created_at'])}</td></tr>"
            for r in rollouts
        )
        or "<tr><td colspan='9' class='muted'>"
        "no rollouts yet: start one with 'edgekit rollout start BUNDLE --fleet NAME'</td></tr>"
    )
    header = (
        "<tr><th>id</th><th>kind</th><th>fleet</th><th>model</th><th>state</th>"
        "<th>wave</th><th>devices</th><th>reason</th><th>started</th></tr>"
    )
    body = f"<p><a href='/'>fleet</a></p><h1>Rollouts</h1><table>{header}{rows}</table>"
    return page("rollouts", body)


def render_rollout(status: dict[str, Any]) -> bytes:
    waves = []
    for index, share in enumerate(status["waves"], start=1):
        members = [d for d in status["devices"] if d["wave"] == index]
        counts: dict[str, int] = {}
        for d in members:
            counts[d["state"]] = counts.get(d["state"], 0) + 1
        marker = " (current)" if index == status["wave"] and status["state"] in ("running", "paused") else ""
        waves.append(
            f"<tr><td>{index}{marker}</td><td>{html.escape(share)}</td><td>{len(members)}</td>"
            f"<td>{_counts(counts)}</td>"
            f"<td>{_bar(counts, len(members))}</td></tr>"
        )
    devices = "".join(
        f"<tr><td>{html.escape(d['device'])}</td><td>{d['wave']}</td>"
        f"<td class='{STATE_CLASS.get(d['state'], '')}'>{html.escape(d['state'])}</td>"
        f"<td>{_version(d['from_version'])} → {_version(d['version'])}</td><td>{_shadow(d.get('shadow'))}</td>"
        f"<td>{'' if d['online'] else '<span class=muted>offline</span>'}</td>"
        f"<td>{html.escape(d['reason'] or '')}</td></tr>"
        for d in status["devices"]
    )
    what = f"{html.escape(status['kind'])} of {html.escape(status['name'])} v{status['version']}"
    wave_header = "<tr><th>wave</th><th>up to</th><th>devices</th><th>states</th><th></th></tr>"
    device_header = (
        "<tr><th>device</th><th>wave</th><th>state</th><th>version</th><th>shadow</th><th></th><th>reason</th></tr>"
    )
    body = (
        f"<p><a href='/'>fleet</a> · <a href='/rollouts'>rollouts</a></p><h1>Rollout {html.escape(status['id'])}</h1>"
        f"<p>{what} to fleet {html.escape(status['fleet'])}: "
        f"<b class='{STATE_CLASS.get(status['state'], '')}'>{html.escape(status['state'])}</b>"
        f"{' — ' + html.escape(status['reason']) if status['reason'] else ''}</p>"
        f"<p class='muted'>abort on: {html.escape(', '.join(status['abort_on']) or 'nothing')}</p>"
        f"{_ab(status.get('ab'))}"
        f"<h2>Waves</h2><table>{wave_header}{''.join(waves)}</table>"
        f"<h2>Devices</h2><table>{device_header}{devices}</table>"
    )
    return page(f"rollout {status['id']}", body)


def _ab(split: dict[str, Any] | None) -> str:
    """The A/B comparison: per arm its labels, realized accuracy and the label-free estimate beside it (what
    there is to see while labels are few), then the test's statistic, p-value and decision."""
    if not split:
        return ""
    rows = "".join(
        f"<tr><td>{arm}</td><td>{', '.join(f'v{v}' for v in split[arm]['versions'])}</td>"
        f"<td>{split[arm]['devices']}</td><td>{split[arm]['labelled']}</td>"
        f"<td>{_share(split[arm]['accuracy'])}</td><td>{_share(split[arm]['estimated_accuracy'])}</td></tr>"
        for arm in ("candidate", "champion")
        if split.get(arm)
    )
    header = "<tr><th>arm</th><th>version</th><th>devices</th><th>labels</th><th>accuracy</th><th>estimated</th></tr>"
    facts = [f"decision: <b>{html.escape(split['decision'])}</b>"]
    if split.get("p_value") is not None:
        facts.append(f"p = {split['p_value']:.3g} (alpha {split['ab_alpha']:g}), z = {split['z']:.2f}")
    facts.append(f"{split['ab_min_labels']} labels per arm before deciding; {html.escape(split['test'])}")
    when = f" · decided {_when(split['decided_at'])}" if split.get("decided_at") else ""
    return (
        f"<h2>A/B split at {split['ab_share']:.0%}</h2><p>{' · '.join(facts)}{when}</p>"
        + (f"<p>{html.escape(split['why'])}</p>" if split.get("why") else "")
        + (f"<table>{header}{rows}</table>" if rows else "")
    )


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _counts(counts: dict[str, int]) -> str:
    ordered = sorted(counts.items(), key=lambda kv: DEVICE_STATES.index(kv[0]) if kv[0] in DEVICE_STATES else 99)
    return ", ".join(f"<span class='{STATE_CLASS.get(k, '')}'>{v} {html.escape(k)}</span>" for k, v in ordered) or "-"


def _bar(counts: dict[str, int], total: int, width: int = 200) -> str:
    """An inline SVG bar: green succeeded, red failed or rolled back, grey the rest."""
    if not total:
        return ""
    good = counts.get("succeeded", 0) / total * width
    bad = sum(counts.get(k, 0) for k in ("failed", "rolled_back", "aborted")) / total * width
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='12' role='img' aria-label='wave progress'>"
        f"<rect width='{width}' height='12' fill='#e0e0e0'/><rect width='{good:.1f}' height='12' fill='#2ca02c'/>"
        f"<rect x='{good:.1f}' width='{bad:.1f}' height='12' fill='#d62728'/></svg>"
    )


def _shadow(shadow: dict[str, Any] | None) -> str:
    if not shadow or shadow.get("agreement") is None:
        return "-"
    return f"{shadow['agreement']:.3f} on {shadow['rows']} rows, p99 {shadow.get('p99_ms')} ms"


def _version(value: Any) -> str:
    return "-" if value is None else f"v{value}"


def _when(timestamp: float | None) -> str:
    return "-" if not timestamp else datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
