#!/usr/bin/env bash
# The test command (the README's second command): every Rust test, then the chat page's type
# check against its Rust contract (tests/types), then the official phoenix npm client against
# the conformance binary, then the ecosystem against the firebrand-server
# binary (phoenix.js, npm jsonwebtoken, PyJWT, fetch, the README's quickstart run as written),
# then the chat demo in headless Chromium.
#
# It sets up what the tests need first (scripts/prereqs.sh): Node.js and npm, Debian's
# chromium, a Redis on 127.0.0.1:6379 and a NATS server on 127.0.0.1:4222. Each is installed
# (apt-get, as root) or started when missing; where that is not possible it stops at once,
# naming what is missing and the command that installs it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/prereqs.sh
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  . "$HOME/.cargo/env"
fi
# The drain test opens 2,000 connections: more files than the usual default soft limit.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace
cargo build --release --bin conformance --bin chat --bin firebrand-server
# The chat page's type check against its Rust contract (tsc --strict; a renamed field must fail
# it), and the typed wrapper from Node against the chat.
CHAT_BIN="$PWD/target/release/chat" bash tests/types/run.sh
bash tests/js/run.sh "$PWD/target/release/conformance"
bash tests/server-js/run.sh "$PWD/target/release/firebrand-server"
(cd tests/browser && { [ -d node_modules ] || npm ci --no-audit --no-fund; } &&
  CHAT_BIN="$PWD/../../target/release/chat" node --test)
