#!/usr/bin/env bash
# A short run of every fuzz target (fuzz/): a smoke test that each decoder still survives its
# seed corpus and a few thousand mutations. Long runs: see fuzz/README.md.
# cargo fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
targets=(v1_json v2_json v2_binary server_frames longpoll_body upgrade_request)
cargo fuzz build -O
for t in "${targets[@]}"; do
  scratch="$(mktemp -d)"
  cargo fuzz run -O "$t" "$scratch" "fuzz/corpus/$t" -- -runs=20000 -max_len=4096
  rm -rf "$scratch"
done
echo "fuzz smoke: ${#targets[@]} targets passed"
