#!/usr/bin/env bash
# Three chat nodes on ports 4000, 4001, 4002 sharing one Redis (REDIS_URL, default the local
# one): open http://127.0.0.1:4000 and http://127.0.0.1:4001 and chat across nodes.
# Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin chat
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
for port in 4000 4001 4002; do
  target/release/chat --port "$port" &
  pids+=("$!")
done
wait
