#!/usr/bin/env bash
# The README's main command: serve the built-in tiny demo model (a random Pi0.5 on the CPU, no
# downloads) with flashrt-serve, query it with flashrt-client, and stop the server cleanly.
#   bash scripts/demo.sh
# FLASHRT_DEMO_ENDPOINT changes where it serves (default: configs/demo.yaml's tcp://127.0.0.1:5555).
# Exits non-zero if any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

endpoint=${FLASHRT_DEMO_ENDPOINT:-tcp://127.0.0.1:5555}
if command -v flashrt-serve >/dev/null && command -v flashrt-client >/dev/null; then
  serve=(flashrt-serve) client=(flashrt-client)
else  # not installed as commands yet: the same entry points through Python, from this checkout
  serve=(python3 -m runtime serve) client=(python3 -m runtime client)
fi

"${serve[@]}" --config configs/demo.yaml --bind "$endpoint" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT

alive() {
  kill -0 "$server" 2>/dev/null || { echo "demo: flashrt-serve exited (see its message above)" >&2; exit 1; }
}
echo "demo: waiting for flashrt-serve at $endpoint (it loads and warms the model first) ..."
for _ in $(seq 120); do
  alive
  "${client[@]}" --endpoint "$endpoint" --ping --timeout-ms 1000 >/dev/null 2>&1 && break
done
alive
"${client[@]}" --endpoint "$endpoint" --ping
"${client[@]}" --endpoint "$endpoint" -n 5
"${client[@]}" --endpoint "$endpoint" -n 3 --prompt "open the drawer" --encoding npy

kill -TERM "$server"
wait "$server"  # flashrt-serve exits 0 after a clean stop; anything else fails the demo here
trap - EXIT
echo "demo: ok"
