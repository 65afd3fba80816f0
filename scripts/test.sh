#!/usr/bin/env bash
# The test command: every Rust test, then the official phoenix npm client end to end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace
cargo build --release --bin conformance
bash tests/js/run.sh target/release/conformance
