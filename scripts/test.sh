#!/usr/bin/env bash
# One command from a fresh clone to the test results: sets up .venv with edgekit-ml[dev], then runs ruff and pytest
# on both cores. Extra arguments go to pytest (e.g. -k bundle, or -m "not slow").
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh" dev
# The network tests run a real Mosquitto and PostgreSQL, and the dashboard test headless Chromium (Debian packages);
# install them when missing and we are root.
missing=""
{ command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || missing="$missing mosquitto"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
{ command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; } || missing="$missing openssh-server"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"  # promtool checks both /metrics pages
# The PostgreSQL store's tests start a real server (initdb and pg_ctl, run by hand in a temporary directory).
{ command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; } || missing="$missing postgresql"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "edgekit: installing$missing (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "edgekit: the tests need$missing: sudo apt-get install$missing" >&2
    exit 2
  fi
fi
cd "$REPO"
# Lint and format first (ruff's settings are in pyproject.toml): a finding fails the run before the tests.
ruff check edgekit device_agent tests scripts
ruff format --check --quiet edgekit device_agent tests scripts || { echo "edgekit: run 'ruff format edgekit device_agent tests scripts'" >&2; exit 1; }
exec python -m pytest -n 2 --dist loadfile "$@"
