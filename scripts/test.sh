#!/usr/bin/env bash
# The test command: every Rust test, then the official phoenix npm client against the
# conformance binary, then the chat demo in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
# The drain test opens 2,000 connections: more files than the usual default soft limit.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace
cargo build --release --bin conformance --bin chat
bash tests/js/run.sh "$PWD/target/release/conformance"
(cd tests/browser && { [ -d node_modules ] || npm ci --no-audit --no-fund; } &&
  CHAT_BIN="$PWD/../../target/release/chat" node --test)
