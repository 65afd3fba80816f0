#!/usr/bin/env bash
# The test command: every Rust test, then the official phoenix npm client against the
# conformance binary, then the chat demo in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace
cargo build --release --bin conformance --bin chat
bash tests/js/run.sh target/release/conformance
(cd tests/browser && { [ -d node_modules ] || npm ci --no-audit --no-fund; } &&
  CHAT_BIN="$PWD/../../target/release/chat" node --test)
