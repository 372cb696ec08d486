#!/usr/bin/env bash
# The test command of README.md and CI: installs what the tests need, then runs them (no GPU needed).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: a C++ toolchain, libzmq and msgpack-c headers for the C++ example client.
need=()
for pkg in g++ make pkg-config libzmq3-dev libmsgpack-cxx-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# torch is pinned here (not in pyproject) so a CPU-only machine gets the CPU build it already has.
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q "$@"
