#!/usr/bin/env python3
"""Regenerate fixtures/ from datasets scikit-learn ships (nothing is downloaded).

python scripts/make_fixtures.py [--out fixtures] [--only digits,cancer,wide,xgb_cancer,lgb_wine]
python scripts/make_fixtures.py --tensor [--out fixtures] [--only digits_cnn,mobilenet96,kws_cnn,sensor_cnn]

--tensor makes the tensor fixtures (edgekit/local/tensor_fixtures.py: ONNX models trained with numpy,
their PNG/JPEG/WAV/.npy files and preprocessing tables) instead of the tabular ones, and prints what
each measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.local.fixtures import ALL_FIXTURES, make_fixtures
from edgekit.local.tensor_fixtures import TENSOR_FIXTURES, make_tensor_fixtures

FACTS = ("accuracy", "mean_margin", "max_abs_diff", "train_seconds", "parameters", "macs", "latency_ms_fp32", "seconds")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures"))
    parser.add_argument("--tensor", action="store_true", help="make the tensor fixtures: " + ", ".join(TENSOR_FIXTURES))
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated subset of " + ", ".join(ALL_FIXTURES) + " (with --tensor: of those)",
    )
    args = parser.parse_args()
    known = tuple(TENSOR_FIXTURES) if args.tensor else ALL_FIXTURES
    names = tuple(n for n in (args.only or ",".join(known)).split(",") if n)
    unknown = set(names) - set(known)
    if unknown:
        parser.error(f"unknown fixtures {sorted(unknown)}")
    start = time.perf_counter()
    if args.tensor:
        for name, written in make_tensor_fixtures(args.out, names).items():
            files = ", ".join(Path(v).name for v in written.values() if isinstance(v, str))
            facts = ", ".join(f"{k} {_number(written[k])}" for k in FACTS if k in written)
            print(f"{name}: {files}\n  {facts}")
    else:
        written = make_fixtures(args.out, names)
        for name, paths in written.items():
            print(f"{name}: " + ", ".join(Path(p).name for p in paths.values()))
    print(f"done in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
