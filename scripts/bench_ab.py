#!/usr/bin/env python3
"""Measure the A/B rollout's decision rule on simulated label streams: its false-winner rate, power and time.

The rule is the collector's own (``edgekit.fleet.ab``: a mixture SPRT on the difference of the arms'
accuracies, a look every ``--check`` minutes once each arm has ``--min-labels`` labels, the champion
kept at ``--max-days``); no broker or device is needed, as the controller only feeds it counts. Each
experiment is one split: per look, each arm receives Poisson(``--labels-per-hour`` x check / 60)
delayed labels, each correct with the arm's true accuracy. ``--experiments`` (200) experiments per
scenario, a fixed seed:

- equal: both arms 90% (and 60%, 97%): how often a winner is declared (the false-winner rate, to be at
  most alpha), when the split ends (mostly at the time limit: nothing to find), and, on the same
  streams, how often a z-test repeated at every look would have declared one (why it is not used);
- a 5-point difference either way (90% vs 85%): how often the right arm wins, the wrong one, how long
  it takes and how many labels per arm it used, beside the labels per arm a fixed-sample z-test planned
  for 80% power at that difference needs (the price of being free to look at any time).

    python scripts/bench_ab.py [--experiments 200] [--labels-per-hour 600] [--json PATH | --out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import print_checks, print_run, write_json

from edgekit.fleet.ab import first_decisions, log_evidence

Z_975, Z_80 = 1.959964, 0.841621


def simulate(rng, args, accuracy_candidate: float, accuracy_champion: float) -> dict:
    """One scenario: the experiments' first decisions under the rule and under repeated z-tests."""
    looks = int(args.max_days * 24 * 60 / args.check)
    rate = args.labels_per_hour * args.check / 60
    shape = (args.experiments, looks)
    n_a, n_b = rng.poisson(rate, shape), rng.poisson(rate, shape)
    streams = (
        n_a.cumsum(axis=1),
        rng.binomial(n_a, accuracy_candidate).cumsum(axis=1),
        n_b.cumsum(axis=1),
        rng.binomial(n_b, accuracy_champion).cumsum(axis=1),
    )
    first, winner = first_decisions(*streams, alpha=args.alpha, min_labels=args.min_labels)
    _, z = log_evidence(*streams)
    enough = (streams[0] >= args.min_labels) & (streams[2] >= args.min_labels)
    peeking = ((np.abs(z) >= Z_975) & enough).any(axis=1)
    decided = first >= 0
    hours = np.where(decided, (first + 1) * args.check / 60, args.max_days * 24)
    labels = np.take_along_axis(streams[0], np.maximum(first, 0)[:, None], axis=1)[:, 0]
    return {
        "candidate": accuracy_candidate,
        "champion": accuracy_champion,
        "promoted": float((winner > 0).mean()),
        "reverted_as_worse": float((winner < 0).mean()),
        "time_limit": float((~decided).mean()),
        "median_hours": float(np.median(hours)),
        "p90_hours": float(np.percentile(hours, 90)),
        "median_labels_per_arm": float(np.median(labels[decided])) if decided.any() else None,
        "peeking_z_test_winner_rate": float(peeking.mean()),
    }


def planned_labels(p_a: float, p_b: float) -> int:
    """Labels per arm a fixed-sample two-sided z-test at alpha 0.05 needs for 80% power at p_a vs p_b."""
    return int(np.ceil((Z_975 + Z_80) ** 2 * (p_a * (1 - p_a) + p_b * (1 - p_b)) / (p_a - p_b) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=200, help="simulated splits per scenario")
    parser.add_argument("--labels-per-hour", type=float, default=600, help="delayed labels per arm and hour")
    parser.add_argument("--check", type=float, default=1.0, help="minutes between looks (--ab-check)")
    parser.add_argument("--min-labels", type=int, default=500, help="labels per arm before deciding")
    parser.add_argument("--max-days", type=float, default=7.0, help="the split's time limit")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--json", help="where to write the JSON (default: --out/bench_ab.json)")
    parser.add_argument("--out", default="bench-results", help="directory for the JSON")
    args = parser.parse_args()
    started, load = time.time(), _load()
    rng = np.random.default_rng(args.seed)
    scenarios = {
        "equal 90%": simulate(rng, args, 0.90, 0.90),
        "equal 60%": simulate(rng, args, 0.60, 0.60),
        "equal 97%": simulate(rng, args, 0.97, 0.97),
        "candidate +5 points": simulate(rng, args, 0.90, 0.85),
        "candidate -5 points": simulate(rng, args, 0.85, 0.90),
    }
    print_table(scenarios)
    found = checks(scenarios, args)
    print()
    print_checks(found)
    machine = {"cpus": os.cpu_count() or 1, "load_average": load, "load_average_after": _load()}
    summary = {"seconds": time.time() - started, "machine": {**machine, "python": platform.python_version()}}
    print_run(summary, quick=False, how=f"{args.experiments} experiments per scenario, seed {args.seed}")
    write_json(
        args.json or Path(args.out) / "bench_ab.json", found, **summary, settings=vars(args), scenarios=scenarios
    )


def print_table(scenarios: dict[str, dict]) -> None:
    head = f"{'scenario':<22}{'promoted':>9}{'reverted':>9}{'limit':>7}{'median h':>9}{'labels':>8}{'peeking z':>10}"
    print(head)
    for name, s in scenarios.items():
        labels = "-" if s["median_labels_per_arm"] is None else f"{s['median_labels_per_arm']:.0f}"
        print(
            f"{name:<22}{s['promoted']:>9.3f}{s['reverted_as_worse']:>9.3f}{s['time_limit']:>7.3f}"
            f"{s['median_hours']:>9.1f}{labels:>8}{s['peeking_z_test_winner_rate']:>10.3f}"
        )


def checks(scenarios: dict[str, dict], args) -> list:
    equal, better, worse = scenarios["equal 90%"], scenarios["candidate +5 points"], scenarios["candidate -5 points"]
    false_winners = [s["promoted"] + s["reverted_as_worse"] for k, s in scenarios.items() if k.startswith("equal")]
    alpha, pooled = f"<= {args.alpha:g}", sum(false_winners) / len(false_winners)
    return [
        ("A/B false-winner rate, two equal models (90%)", false_winners[0], alpha, false_winners[0] <= args.alpha),
        ("A/B false-winner rate, two equal models (60%)", false_winners[1], alpha, false_winners[1] <= args.alpha),
        ("A/B false-winner rate, two equal models (97%)", false_winners[2], alpha, false_winners[2] <= args.alpha),
        ("A/B false-winner rate, the three pooled (600 experiments)", pooled, alpha, pooled <= args.alpha),
        ("A/B decision time, equal models (median h)", equal["median_hours"], "info", True),
        ("z-test at every look, equal models: winner rate", equal["peeking_z_test_winner_rate"], "info", True),
        ("A/B power, candidate +5 points (promoted)", better["promoted"], ">= 0.9", better["promoted"] >= 0.9),
        (
            "A/B power, candidate -5 points (reverted)",
            worse["reverted_as_worse"],
            ">= 0.9",
            worse["reverted_as_worse"] >= 0.9,
        ),
        ("A/B wrong winner, 5-point difference", better["reverted_as_worse"] + worse["promoted"], "info", True),
        ("A/B decision time, +5 points (median h)", better["median_hours"], "info", True),
        ("A/B labels per arm at decision, +5 points (median)", better["median_labels_per_arm"], "info", True),
        ("fixed z-test planned for 80% power: labels per arm", planned_labels(0.90, 0.85), "info", True),
    ]


def _load() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return [0.0, 0.0, 0.0]


if __name__ == "__main__":
    main()
