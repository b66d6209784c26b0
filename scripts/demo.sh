#!/usr/bin/env bash
# One command from a fresh clone to the demo: sets up .venv with edgekit-ml[all], then runs `edgekit demo`.
#   bash scripts/demo.sh [edgekit demo options, e.g. --workdir /tmp/demo]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh" all
cd "$REPO"
exec edgekit demo "$@"
