#!/usr/bin/env bash
# Create (or reuse) .venv in the repository and install edgekit into it with the given extras.
#   source scripts/setup_env.sh dev      # or: host, agent, all
# Installs from the package index only; nothing else is downloaded.
set -euo pipefail
EXTRAS="${1:-host}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEKIT_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "edgekit: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.edgekit-installed-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$REPO/pyproject.toml" -nt "$STAMP" ]; then
  echo "edgekit: installing edgekit-ml[$EXTRAS] into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip "setuptools>=77" wheel  # flash builds the edgekit wheel offline with these
  # The distribution was called "edgekit" before it became edgekit-ml (that name is someone else's on the index).
  "$VENV/bin/python" -m pip uninstall --quiet --yes edgekit >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet -e "$REPO[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
