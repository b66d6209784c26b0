#!/usr/bin/env python3
"""Regenerate fixtures/ from datasets scikit-learn ships (nothing is downloaded).

python scripts/make_fixtures.py [--out fixtures] [--only digits,cancer,wide,xgb_cancer,lgb_wine]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.local.fixtures import ALL_FIXTURES, make_fixtures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures"))
    parser.add_argument(
        "--only", default=",".join(ALL_FIXTURES), help="comma-separated subset of " + ", ".join(ALL_FIXTURES)
    )
    args = parser.parse_args()
    names = tuple(n for n in args.only.split(",") if n)
    unknown = set(names) - set(ALL_FIXTURES)
    if unknown:
        parser.error(f"unknown fixtures {sorted(unknown)}")
    start = time.perf_counter()
    written = make_fixtures(args.out, names)
    for name, paths in written.items():
        print(f"{name}: " + ", ".join(Path(p).name for p in paths.values()))
    print(f"done in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
