#!/usr/bin/env bash
# Runs the official phoenix client tests against the conformance binary:
#   bash tests/js/run.sh [path/to/conformance]
# Starts the binary on a free port, waits for its "listening on" line, runs `node --test`,
# then stops it with SIGTERM and checks that it exits 0.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(realpath "${1:-$here/../../target/release/conformance}")"
cd "$here"
[ -d node_modules ] || npm ci --no-audit --no-fund

out="$(mktemp)"
"$bin" --port 0 >"$out" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$out"' EXIT
port=""
for _ in $(seq 1 100); do
  port="$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$out")"
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "conformance exited before listening" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "conformance did not print its listening line" >&2; exit 1; }

FIREBRAND_URL="ws://127.0.0.1:$port/socket" FIREBRAND_HTTP="http://127.0.0.1:$port" node --test
kill -TERM "$pid"
wait "$pid" && echo "conformance exited 0 on SIGTERM"
trap - EXIT
rm -f "$out"
