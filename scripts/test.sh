#!/usr/bin/env bash
# One command from a fresh clone to the test results: sets up .venv with edgekit[dev], then runs pytest
# on both cores. Extra arguments go to pytest (e.g. -k bundle, or -m "not slow").
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh" dev
# The MQTT tests run a real Mosquitto (Debian package); install it when missing and we are root.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "edgekit: installing mosquitto (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "edgekit: the MQTT tests need mosquitto: sudo apt-get install mosquitto" >&2
    exit 2
  fi
fi
cd "$REPO"
exec python -m pytest -n 2 --dist loadfile "$@"
