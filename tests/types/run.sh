#!/usr/bin/env bash
# The chat page's type check (issue 24): the page (plain JavaScript, `// @ts-check` + JSDoc) and
# the TypeScript generated from the Rust contract, checked by `tsc --strict` against
# @types/phoenix (the phoenix npm package ships no typings of its own).
#
#   bash tests/types/run.sh
#
# 1. tsc over the page, the generated contract.d.ts, its runtime contract.js and node-client.mjs
#    (the typed wrapper from Node): must pass.
# 2. The contract changed: a copy of examples/chat-contract with the pushed message's `body`
#    renamed generates its TypeScript (its `typescript` example), and tsc over the unchanged
#    page against it must FAIL, naming the field. The copy builds against the real crates,
#    with the workspace's Cargo.lock and target directory.
# 3. With CHAT_BIN (a chat binary; scripts/test.sh sets it), node-client.mjs runs against it:
#    joins a room, pushes, gets its message back as a typed event.
#
# Exits non-zero if any step does not do what it must.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
assets="$root/examples/chat/assets"
die() { echo "types/run.sh: $*" >&2; exit 1; }
command -v node >/dev/null || die "node is not installed"
command -v cargo >/dev/null || die "cargo is not installed"

cd "$here"
if [ ! -d node_modules ]; then
  npm ci --no-audit --no-fund || die "npm ci failed"
fi
tsc=("$here/node_modules/.bin/tsc")

tmp="$(mktemp -d)"
chat=""
cleanup() {
  if [ -n "$chat" ]; then kill -TERM "$chat" 2>/dev/null; wait "$chat" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---- 1. the page and the generated file, as checked in
echo "types/run.sh: tsc over the page and the generated contract ($("${tsc[@]}" --version))"
"${tsc[@]}" -p "$here/tsconfig.json" || die "the page does not type-check against the generated contract"
echo "types/run.sh: the page type-checks"

# ---- 2. a field renamed in the Rust contract breaks the page's type check
copy="$tmp/chat-contract"
cp -r "$root/examples/chat-contract" "$copy"
rm -rf "$copy/target"
# The copy is a workspace of its own whose dependencies are the real crates (absolute paths):
# the root manifest's [workspace.*] tables, without its members.
{
  echo
  sed -e '/^members = /d' -e '/^exclude = /d' -e "s|path = \"|path = \"$root/|g" "$root/Cargo.toml"
} >>"$copy/Cargo.toml"
cp "$root/Cargo.lock" "$copy/Cargo.lock"
# Rename the pushed message's field: `NewMsg { body }` becomes `NewMsg { text }`.
sed -i '/^pub struct NewMsg {/,/^}/ s/pub body: String/pub text: String/' "$copy/src/lib.rs"
grep -q 'pub text: String' "$copy/src/lib.rs" || die "the sed did not rename NewMsg's body (did the contract change shape?)"
mkdir "$tmp/page"
CARGO_TARGET_DIR="$root/target" cargo run --quiet --manifest-path "$copy/Cargo.toml" --example typescript \
  >"$tmp/page/contract.d.ts" || die "cannot generate the TypeScript of the modified contract"
grep -q 'export type NewMsg = {' "$tmp/page/contract.d.ts" || die "the modified contract's TypeScript has no NewMsg"
cp "$assets/app.js" "$assets/contract.js" "$tmp/page/"
cat >"$tmp/tsconfig.json" <<JSON
{
  "extends": "$here/tsconfig.json",
  "files": ["page/contract.d.ts", "page/app.js"]
}
JSON
set +e
"${tsc[@]}" -p "$tmp/tsconfig.json" >"$tmp/tsc.out" 2>&1
rc=$?
set -e
if [ "$rc" -eq 0 ]; then
  die "tsc passed on the page against a contract whose NewMsg has no 'body': the type check would not catch a renamed field"
fi
if ! grep -q "app.js.*'body'" "$tmp/tsc.out"; then
  cat "$tmp/tsc.out" >&2
  die "tsc failed (code $rc) but not on the page's use of 'body'"
fi
echo "types/run.sh: with NewMsg.body renamed to text in the Rust contract, tsc fails as it must:"
sed 's/^/    /' "$tmp/tsc.out"

# ---- 3. the typed wrapper from Node, against a running chat
if [ -z "${CHAT_BIN:-}" ]; then
  echo "types/run.sh: CHAT_BIN not set: node-client.mjs was type-checked, not run"
else
  [ -x "$CHAT_BIN" ] || die "CHAT_BIN=$CHAT_BIN is not an executable"
  mkfifo "$tmp/chat.out"
  "$CHAT_BIN" --port 0 >"$tmp/chat.out" 2>"$tmp/chat.err" &
  chat=$!
  exec 3<"$tmp/chat.out"
  url=""
  while IFS= read -r -t 30 line <&3; do
    if [[ "$line" =~ listening\ on\ (http://127\.0\.0\.1:[0-9]+) ]]; then url="${BASH_REMATCH[1]}"; break; fi
  done
  [ -n "$url" ] || { cat "$tmp/chat.err" >&2; die "the chat printed no 'listening on' line within 30 s"; }
  cat <&3 >/dev/null &
  # Node 20 has WebSocket behind a flag; from Node 22 on it is there anyway.
  flags=()
  if node --experimental-websocket -e '' 2>/dev/null; then flags=(--experimental-websocket); fi
  NODE_NO_WARNINGS=1 node "${flags[@]}" "$here/node-client.mjs" "$url" || die "node-client.mjs failed against $url"
fi
echo "types/run.sh: all passed"
