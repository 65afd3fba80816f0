#!/usr/bin/env bash
# CI smoke for the fuzz targets (fuzz/): each decoder gets its seed corpus and 20,000 libFuzzer
# executions (release build, address sanitizer, debug assertions and overflow checks). Fails on
# any crash, panic, property failure, leak or hang; the reproducer is left in
# fuzz/artifacts/<target>/. Long runs: see fuzz/README.md.
#
# cargo fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. New inputs go to a scratch directory, so fuzz/corpus/ keeps only the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  . "$HOME/.cargo/env"
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1

targets=(v1_json v2_json v2_binary server_frames longpoll_body upgrade_request ws_frames ws_deflate cluster_message client_inflate)
flags=(-O -a)
runs="${FUZZ_SMOKE_RUNS:-20000}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

start=$SECONDS
cargo fuzz build "${flags[@]}"
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  if ! cargo fuzz run "${flags[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
      -runs="$runs" -max_len=4096 -timeout=10 >"$scratch/$t.log" 2>&1; then
    cat "$scratch/$t.log" >&2
    echo "fuzz smoke: $t FAILED; reproducer in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^Done ' "$scratch/$t.log" | sed "s/^/fuzz smoke: $t: /"
  rm -rf "${scratch:?}/$t"
done
echo "fuzz smoke: ${#targets[@]} targets passed in $((SECONDS - start))s"
