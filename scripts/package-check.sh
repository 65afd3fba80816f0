#!/usr/bin/env bash
# Are the crates ready for crates.io? Packages every publishable crate in dependency order and
# builds each from its packaged sources alone (`cargo publish --dry-run`: path dependencies
# replaced by the packaged versions, only the files the package includes — a missing
# `include`, a file outside the crate, a build step that needs the workspace fails here), then
# builds the documentation of the whole workspace with every feature, warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."

crates=(firebrand-protocol firebrand firebrand-client firebrand-redis firebrand-nats firebrand-postgres firebrand-server)
args=()
for c in "${crates[@]}"; do args+=(-p "$c"); done
# --allow-dirty: CI checks out a clean tree; on a developer's machine, uncommitted work is packaged too.
cargo publish --dry-run --allow-dirty "${args[@]}"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps
echo "package-check: ${#crates[@]} crates package and build from their packaged sources; docs build without warnings"
