"""What a rollout is asked to do: its waves, soak times and abort rules, parsed from what the operator typed.

Plain values and their parsers, apart from the controller that acts on them (``rollouts.py``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

from edgekit.errors import RolloutError

DEFAULT_ABORT_ON = "failed>20%"
AB_MIN_LABELS, AB_MAX_DURATION, AB_ALPHA, AB_CHECK = 500, 7 * 86400.0, 0.05, 60.0
_RULE = re.compile(r"^\s*(failed|agreement|p99_ms|drift)\s*([<>])\s*([0-9.]+)\s*(%?)\s*$")


@dataclass(frozen=True)
class AbortRule:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        shown = f"{self.value:.0%}" if self.metric in ("failed", "drift") else f"{self.value:g}"
        return f"{self.metric}{self.op}{shown}"

    def tripped(self, observed: float | None) -> bool:
        return observed is not None and (observed > self.value if self.op == ">" else observed < self.value)


def parse_abort_rules(text: str | None) -> tuple[AbortRule, ...]:
    """``failed>20%,agreement<0.98,p99_ms>50,drift>30%`` -> rules; a clear error for anything else."""
    rules = []
    for part in filter(str.strip, (text or "").split(",")):
        match = _RULE.match(part)
        if not match:
            raise RolloutError(
                f"abort rule {part.strip()!r} is not understood",
                "write rules like failed>20%,agreement<0.98,p99_ms>50,drift>30% (metric, < or >, number)",
            )
        metric, op, number, percent = match.groups()
        value = float(number) / (100 if percent else 1)
        expected_op = "<" if metric == "agreement" else ">"
        if op != expected_op:
            raise RolloutError(
                f"abort rule {part.strip()!r} points the wrong way",
                f"{metric} aborts when it is {'below' if expected_op == '<' else 'above'} a limit: "
                f"{metric}{expected_op}…",
            )
        if metric in ("failed", "drift", "agreement") and not 0 <= value <= 1:
            raise RolloutError(
                f"abort rule {part.strip()!r} is not a share between 0 and 1", "e.g. failed>20% or agreement<0.98"
            )
        rules.append(AbortRule(metric, op, value))
    return tuple(rules)


def parse_waves(text: str) -> tuple[float, ...]:
    """``10%,50%,100%`` -> (0.1, 0.5, 1.0): cumulative shares of the target devices, rising to 100%."""
    try:
        waves = tuple(float(p.strip().rstrip("%")) / 100 for p in text.split(",") if p.strip())
    except ValueError:
        raise RolloutError(f"waves {text!r} are not percentages", "e.g. --waves 10%,50%,100%") from None
    if (
        not waves
        or any(b <= a for a, b in zip(waves, waves[1:], strict=False))
        or waves[0] <= 0
        or abs(waves[-1] - 1.0) > 1e-9
    ):
        raise RolloutError(f"waves {text!r} must rise and end at 100%", "e.g. --waves 10%,50%,100%")
    return waves


def parse_duration(text: str | float | int) -> float:
    """``90``, ``90s``, ``5m``, ``1h``, ``7d`` -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([smhd]?)\s*", str(text))
    if not match:
        raise RolloutError(f"duration {text!r} is not understood", "e.g. 30s, 5m, 1h or 7d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def parse_share(text: str | float) -> float:
    """``--ab 50%`` -> 0.5: the share of the target devices on the candidate during an A/B split."""
    try:
        share = float(str(text).strip().rstrip("%")) / 100
    except ValueError:
        raise RolloutError(f"A/B share {text!r} is not a percentage", "e.g. --ab 50%") from None
    if not 0 < share < 1:
        raise RolloutError(f"A/B share {text!r} must be above 0% and below 100%", "e.g. --ab 50%")
    return share


def ab_settings(doc: dict) -> dict:
    """The A/B fields of a ``POST /api/rollouts`` body as ``RolloutSpec`` keywords; none without ``ab``."""
    if not doc.get("ab"):
        return {}
    return {
        "ab_share": parse_share(doc["ab"]),
        "ab_min_labels": int(doc.get("ab_min_labels") or AB_MIN_LABELS),
        "ab_max_duration": parse_duration(doc.get("ab_max_duration") or AB_MAX_DURATION),
        "ab_alpha": float(doc.get("ab_alpha") or AB_ALPHA),
        "ab_check": parse_duration(doc.get("ab_check") or AB_CHECK),
    }


@dataclass(frozen=True)
class RolloutSpec:
    """How a rollout proceeds; serialised into the store as JSON."""

    waves: tuple[float, ...] = (1.0,)
    wave_wait: float = 0.0
    abort_on: tuple[AbortRule, ...] = ()
    shadow_rows: int = 0
    shadow_timeout: float = 300.0
    health_seconds: float = 10.0
    device_timeout: float = 900.0
    devices: str = "*"
    # An A/B split (``ab.py``): ``ab_share`` of the devices get the candidate, and the rollout holds there
    # until delayed labels decide between the arms or ``ab_max_duration`` passes; 0 for no split.
    ab_share: float = 0.0
    ab_min_labels: int = AB_MIN_LABELS  # labels each arm needs before the test may decide
    ab_max_duration: float = AB_MAX_DURATION  # then the champion stays unless the candidate won
    ab_alpha: float = AB_ALPHA  # the test's false-winner rate
    ab_check: float = AB_CHECK  # seconds between looks at the labels

    def __post_init__(self) -> None:
        """The split is a wave boundary: ``--ab 50% --waves 10%,100%`` runs waves 10%, 50% (then holds), 100%."""
        if not self.ab_share:
            return
        if not 0 < self.ab_share < 1:
            raise RolloutError(f"A/B share {self.ab_share:.0%} must be above 0% and below 100%", "e.g. --ab 50%")
        if self.ab_min_labels < 1 or not 0 < self.ab_alpha < 0.5 or self.ab_max_duration <= 0 or self.ab_check <= 0:
            raise RolloutError(
                "A/B settings out of range",
                "--ab-min-labels 1 or more, --ab-alpha above 0 and below 0.5, --ab-max-duration above 0",
            )
        if self.ab_share not in self.waves:
            object.__setattr__(self, "waves", tuple(sorted({*self.waves, self.ab_share})))

    @property
    def ab_wave(self) -> int:
        """The index of the wave after which an A/B split holds; -1 without a split."""
        return self.waves.index(self.ab_share) if self.ab_share else -1

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "abort_on": [str(r) for r in self.abort_on]})

    @classmethod
    def from_json(cls, text: str) -> RolloutSpec:
        doc = json.loads(text)
        return cls(**{**doc, "waves": tuple(doc["waves"]), "abort_on": parse_abort_rules(",".join(doc["abort_on"]))})

    def rule(self, metric: str) -> AbortRule | None:
        return next((r for r in self.abort_on if r.metric == metric), None)


def _assign_waves(count: int, waves: tuple[float, ...]) -> list[int]:
    """Wave index per device: wave k ends at ceil(share_k × count), and every wave gets a device while
    devices remain."""
    assignment, start = [], 0
    for index, share in enumerate(waves):
        end = count if index == len(waves) - 1 else min(count, max(start + 1, math.ceil(share * count)))
        assignment += [index] * (end - start)
        start = end
    return assignment
