#!/usr/bin/env bash
# One command from a fresh clone to the test results: sets up .venv with edgekit[dev], then runs pytest
# on both cores. Extra arguments go to pytest (e.g. -k bundle, or -m "not slow").
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh" dev
cd "$REPO"
exec python -m pytest -n 2 --dist loadfile "$@"
