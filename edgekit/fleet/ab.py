"""A/B rollouts: hold a split of the fleet, compare the arms' accuracy on delayed labels, and decide.

``rollout start --ab 50%`` makes 50% a wave boundary (``RolloutSpec.ab_wave``). Once that wave is done
the controller holds there and, on the leader's ticks, calls ``look`` at most every ``ab_check``
seconds. A look adds the labelled windows each arm sent since the previous look: the *candidate* arm
is the devices of the waves up to the split that moved (their windows on the new version), the
*champion* arm the devices of the later waves (their windows on the version they ran, from the rollout's
start on: ``begin`` marks where each one's windows stood). Its result, the *comparison*, is kept in the rollout's spec
under ``ab_comparison`` (no table changes; a new leader carries on from it) and shown by ``rollout
status`` and the rollout page, with each arm's label-free estimated accuracy beside it (the
``estimated_accuracy`` of its recent windows' facts, where the bundle has a calibration), which says
something while labels are still few.

The test. A two-proportion z-test is valid when it is run once, at a size planned in advance; run at
every look as labels accumulate, it finds a winner between two equal models far more often than its
alpha (``scripts/bench_ab.py`` measures it). So the decision is a mixture sequential probability ratio
test (mSPRT: Robbins 1970; the always-valid A/B p-values of Johari, Pekelis and Walsh 2017). The
difference of the two accuracies, d = p_candidate - p_champion, is weighed by the likelihood ratio of a
normal mixture of alternatives (d ~ N(0, tau^2)) against d = 0::

    L = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2))),   V = p (1 - p) (1/n_candidate + 1/n_champion)

with p the pooled accuracy. Under d = 0, L is (asymptotically) a martingale, so by Ville's inequality
P(L ever reaches 1/alpha) <= alpha: a look every minute for a week costs nothing in false winners,
and the p-value shown (the smallest 1/L seen) is valid whenever one stops. tau = 5 points is the size
of difference it is best at finding. The price of looking freely is some labels: at a 5-point
difference a median 801 per arm, where a fixed test planned for 80% power needs 683 (``bench_ab.py``).

The rule, at each look once each arm has ``ab_min_labels`` labels (the normal approximation needs
them): p <= alpha with the candidate ahead -> ``promote`` (the controller goes on with the waves);
p <= alpha with the champion ahead -> ``revert`` (the controller aborts: the candidate arm gets the
revert the operator signed at the start). At ``ab_max_duration`` without a significant result ->
``revert`` as well: the champion stays unless the candidate has shown it is better.

Known limits: labels reach the collector in the window in which they arrived, so the first window of
a device after its swap may carry labels of answers the champion gave (this pulls the arms together,
never apart); a window redelivered after a later one was counted is not counted.

Imports: ``rollout_spec`` and ``errors``; the store only through ``LabelStore``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgekit.errors import RolloutError
from edgekit.fleet.rollout_spec import RolloutSpec

KEY = "ab_comparison"  # where the comparison lives in the rollout's spec
MIXTURE_SD = 0.05  # tau: the accuracy difference (5 points) the test is tuned to find
LABEL_WINDOWS = 1000  # labelled windows read per device and look (looks are a minute apart by default)
ESTIMATE_WINDOWS = 20  # recent windows per device whose estimated accuracy is shown
TEST = f"mixture SPRT on the difference of two proportions (tau {MIXTURE_SD:g})"


class LabelStore(Protocol):
    """What a look reads of the fleet store."""

    def labelled_accuracy(
        self, device: str, model: str, version: int, *, limit: int = 50
    ) -> list[tuple[int, float, int]]: ...

    def recent_facts(self, device: str, count: int) -> list[dict[str, Any]]: ...


# -- the statistics ------------------------------------------------------------------------------------
def log_evidence(n_a: Any, correct_a: Any, n_b: Any, correct_b: Any, tau: float = MIXTURE_SD) -> tuple[Any, Any]:
    """log L and the z statistic of arm a against arm b, for counts or numpy arrays of them (the
    simulations run many experiments at once); -inf and 0 where an arm has no labels or both are perfect."""
    n_a, n_b = np.asarray(n_a, dtype=float), np.asarray(n_b, dtype=float)
    correct_a, correct_b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        difference = correct_a / n_a - correct_b / n_b
        pooled = (correct_a + correct_b) / (n_a + n_b)
        v = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
        t2 = tau * tau
        log_l = 0.5 * np.log(v / (v + t2)) + t2 * difference**2 / (2 * v * (v + t2))
        z = difference / np.sqrt(v)
    usable = (n_a > 0) & (n_b > 0) & (v > 0)
    return np.where(usable, log_l, -np.inf), np.where(usable, z, 0.0)


def first_decisions(
    n_a: np.ndarray, correct_a: np.ndarray, n_b: np.ndarray, correct_b: np.ndarray, *, alpha: float, min_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    """For experiments in rows of cumulative counts, one column per look: the first look at which the rule
    ``decide`` applies finds a winner (-1: none) and the winner then (+1: a, -1: b, 0: none)."""
    log_l, z = log_evidence(n_a, correct_a, n_b, correct_b)
    fires = (log_l >= math.log(1 / alpha)) & (np.asarray(n_a) >= min_labels) & (np.asarray(n_b) >= min_labels)
    first = np.where(fires.any(axis=1), fires.argmax(axis=1), -1)
    sign = np.sign(np.take_along_axis(z, np.maximum(first, 0)[:, None], axis=1)[:, 0])
    return first, np.where(first >= 0, sign, 0).astype(int)


@dataclass(frozen=True)
class Verdict:
    decision: str  # "hold", "promote" or "revert"
    basis: str  # "candidate better", "champion better", "time limit", "waiting"
    log_l: float
    z: float
    p_value: float  # always valid: the smallest 1/L of the looks with enough labels


def decide(
    candidate: tuple[int, int],
    champion: tuple[int, int],
    *,
    alpha: float,
    min_labels: int,
    p_before: float = 1.0,
    timed_out: bool = False,
) -> Verdict:
    """One look's decision on ``(labelled, correct)`` per arm; ``p_before`` is the p-value of earlier looks."""
    log_l, z = (float(v) for v in log_evidence(candidate[0], candidate[1], champion[0], champion[1]))
    enough = min(candidate[0], champion[0]) >= min_labels
    p_value = min(p_before, math.exp(-max(log_l, 0.0))) if enough else p_before
    if enough and p_value <= alpha:
        return Verdict(
            *(("promote", "candidate better") if z > 0 else ("revert", "champion better")), log_l, z, p_value
        )
    if timed_out:
        return Verdict("revert", "time limit", log_l, z, p_value)
    return Verdict("hold", "waiting", log_l, z, p_value)


# -- the controller's side -------------------------------------------------------------------------------
def begin(store: LabelStore, spec: RolloutSpec, model: str, targets: list[dict[str, Any]], waves: list[int]) -> dict:
    """What a rollout's spec gets at its start (nothing without a split): the champion arm's marks, so it
    counts the windows after the last labelled one each of its devices had sent by then, as the candidate
    arm counts every window on the new version. ``targets`` are the store's device rows, ``waves`` each
    one's wave; both arms must get a device."""
    if not spec.ab_share:
        return {}
    if not (any(w <= spec.ab_wave for w in waves) and any(w > spec.ab_wave for w in waves)):
        raise RolloutError(
            f"an A/B split at {spec.ab_share:.0%} of {len(waves)} device(s) leaves one arm empty",
            "target at least 2 devices, or pick a share that leaves devices on both sides",
        )
    marks = {}
    for device, wave in zip(targets, waves, strict=True):
        if wave > spec.ab_wave and device["model"] == model and device["model_version"] is not None:
            last = store.labelled_accuracy(device["device"], model, device["model_version"], limit=1)
            marks[device["device"]] = [last[-1][0] if last else 0, 0, 0]
    return {KEY: {"started_at": None, "checked_at": None, "p_value": 1.0, "devices": marks, "decision": "hold"}}


def look(
    store: LabelStore,
    rollout: dict[str, Any],
    spec: RolloutSpec,
    devices: list[dict[str, Any]],
    before: dict[str, Any] | None,
    now: float,
) -> dict[str, Any] | None:
    """The comparison after a look at the labels; None when there is nothing to do (the previous look
    is less than ``ab_check`` ago, or it decided)."""
    state = before or {"started_at": None, "checked_at": None, "p_value": 1.0, "devices": {}, "decision": "hold"}
    if state["checked_at"] is not None and (state["decision"] != "hold" or now - state["checked_at"] < spec.ab_check):
        return None
    started = state["started_at"] or now  # the hold's first look: the time limit counts from here
    marks = {k: list(v) for k, v in state["devices"].items()}
    arms = _arms(rollout, spec, devices)
    counts = [_count(store, rollout["name"], arm, marks) for arm in arms]
    verdict = decide(
        counts[0],
        counts[1],
        alpha=spec.ab_alpha,
        min_labels=spec.ab_min_labels,
        p_before=state["p_value"],
        timed_out=now - started >= spec.ab_max_duration,
    )
    shown = [_arm(store, rollout["name"], arm, count) for arm, count in zip(arms, counts, strict=True)]
    return {
        "started_at": started,
        "checked_at": now,
        "decided_at": None if verdict.decision == "hold" else now,
        "decision": verdict.decision,
        "why": _why(verdict, shown, spec),
        "candidate": shown[0],
        "champion": shown[1],
        "difference": _difference(shown),
        "z": round(verdict.z, 4),
        "log_likelihood_ratio": round(verdict.log_l, 4) if math.isfinite(verdict.log_l) else None,
        "p_value": verdict.p_value,
        "devices": marks,
    }


def summary(spec: dict[str, Any]) -> dict[str, Any] | None:
    """What ``rollout status`` shows of a rollout's split: its settings and the last comparison (without
    the per-device bookkeeping); None for a rollout without one."""
    if not spec.get("ab_share"):
        return None
    comparison = {k: v for k, v in (spec.get(KEY) or {}).items() if k != "devices"}
    if not comparison.get("checked_at"):  # no look yet: the candidate arm is still updating
        comparison = {}
    settings = {k: spec[k] for k in ("ab_share", "ab_min_labels", "ab_max_duration", "ab_alpha")}
    return {"test": TEST, **settings, "decision": "waiting for the split", **comparison}


def _arms(rollout: dict[str, Any], spec: RolloutSpec, devices: list[dict[str, Any]]) -> list[dict[str, int]]:
    """[candidate, champion]: device -> the version whose windows count for its arm."""
    candidate = {
        d["device"]: rollout["version"] for d in devices if d["wave"] <= spec.ab_wave and d["state"] == "succeeded"
    }
    champion = {
        d["device"]: d["from_version"] for d in devices if d["wave"] > spec.ab_wave and d["from_version"] is not None
    }
    return [candidate, champion]


def _count(store: LabelStore, model: str, arm: dict[str, int], marks: dict[str, list[int]]) -> tuple[int, int]:
    """(labelled, correct) of the arm, adding each device's windows past its mark (and moving the mark)."""
    labelled = correct = 0
    for device, version in arm.items():
        seq, n, c = marks.get(device, [0, 0, 0])
        for window, accuracy, count in store.labelled_accuracy(device, model, version, limit=LABEL_WINDOWS):
            if window > seq and accuracy is not None and count:
                seq, n, c = window, n + int(count), c + round(accuracy * count)
        marks[device] = [seq, n, c]
        labelled, correct = labelled + n, correct + c
    return labelled, correct


def _arm(store: LabelStore, model: str, arm: dict[str, int], count: tuple[int, int]) -> dict[str, Any]:
    rows = weighted = 0.0
    for device, version in arm.items():
        for facts in store.recent_facts(device, ESTIMATE_WINDOWS):
            value, identity = facts.get("estimated_accuracy"), facts.get("model") or {}
            if value is not None and (identity.get("name"), identity.get("version")) == (model, version):
                rows, weighted = rows + (facts.get("rows") or 0), weighted + (facts.get("rows") or 0) * value
    return {
        "versions": sorted(set(arm.values())),
        "devices": len(arm),
        "labelled": count[0],
        "correct": count[1],
        "accuracy": round(count[1] / count[0], 4) if count[0] else None,
        "estimated_accuracy": round(weighted / rows, 4) if rows else None,
    }


def _difference(arms: list[dict[str, Any]]) -> float | None:
    if arms[0]["accuracy"] is None or arms[1]["accuracy"] is None:
        return None
    return round(arms[0]["accuracy"] - arms[1]["accuracy"], 4)


def _why(verdict: Verdict, arms: list[dict[str, Any]], spec: RolloutSpec) -> str:
    def accuracy(arm: dict[str, Any]) -> str:
        return "-" if arm["accuracy"] is None else f"{arm['accuracy']:.1%}"

    labels = f"{accuracy(arms[0])} vs {accuracy(arms[1])} on {arms[0]['labelled']} and {arms[1]['labelled']} labels"
    if verdict.basis in ("candidate better", "champion better"):
        return (
            f"the {verdict.basis.split()[0]} is better: {labels}, p = {verdict.p_value:.3g} <= alpha {spec.ab_alpha:g}"
        )
    if verdict.basis == "time limit":
        enough = min(arms[0]["labelled"], arms[1]["labelled"]) >= spec.ab_min_labels
        found = "no significant difference" if enough else f"fewer than {spec.ab_min_labels} labels in an arm"
        return f"{found} within {_duration(spec.ab_max_duration)} ({labels}): the champion stays"
    return f"holding: {labels} (p = {verdict.p_value:.3g}; {spec.ab_min_labels} labels per arm needed)"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
