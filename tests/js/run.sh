#!/usr/bin/env bash
# End-to-end tests of the official phoenix npm client against the conformance app.
#
#   bash tests/js/run.sh [path/to/conformance]      (default: target/release/conformance of the workspace)
#
# Builds nothing. Starts the binary on a free port with --port, waits for its line
# "listening on 127.0.0.1:PORT", runs `node --test` on the *.test.mjs files here (or on $JS_TESTS, a
# space-separated list of file names) with FIREBRAND_URL set, then stops the server with SIGTERM and
# checks that it exits with code 0. Exits non-zero if anything failed; the server is stopped on every path.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../target/release/conformance}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-30}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-15}"

die() { echo "run.sh: $*" >&2; exit 1; }
[ -x "$bin" ] || die "no executable conformance binary at $bin (build it with: cargo build --release --bin conformance)"
command -v node >/dev/null || die "node is not installed"

tmp="$(mktemp -d)"
pid=""
drain=""
tests=""
cleanup() {
  local rc=$?
  [ -n "$tests" ] && kill -TERM "$tests" 2>/dev/null && wait "$tests" 2>/dev/null
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  fi
  [ -n "$drain" ] && kill "$drain" 2>/dev/null
  exec 3<&-
  if [ "$rc" -ne 0 ] && [ -s "$tmp/server.log" ]; then
    echo "---- last lines of the conformance server's output ----" >&2
    tail -n 40 "$tmp/server.log" >&2
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

cd "$here" || die "cannot cd to $here"
if [ ! -d node_modules ]; then
  npm ci --no-audit --no-fund || die "npm ci failed"
fi

# A free port: bind port 0 and release it.
port="$(node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')" \
  || die "could not pick a free port"

# The server's stdout goes through a FIFO that we read line by line until the listening line,
# then keep draining into the log so the server never blocks on a full pipe.
mkfifo "$tmp/stdout"
"$bin" --port "$port" >"$tmp/stdout" 2>>"$tmp/server.log" &
pid=$!
exec 3<"$tmp/stdout"

deadline=$((SECONDS + READY_TIMEOUT_S))
while :; do
  left=$((deadline - SECONDS))
  [ "$left" -gt 0 ] || die "no 'listening on 127.0.0.1:$port' line within ${READY_TIMEOUT_S}s"
  if IFS= read -r -t "$left" line <&3; then
    printf '%s\n' "$line" >>"$tmp/server.log"
    [ "$line" = "listening on 127.0.0.1:$port" ] && break
  elif [ $? -gt 128 ]; then
    die "no 'listening on 127.0.0.1:$port' line within ${READY_TIMEOUT_S}s"
  else
    # End of its output: the server exited.
    wait "$pid"; code=$?; pid=""
    die "the conformance server exited (code $code) before printing 'listening on 127.0.0.1:$port'"
  fi
done
cat <&3 >>"$tmp/server.log" &
drain=$!
echo "run.sh: conformance (pid $pid) listening on 127.0.0.1:$port"

if [ -n "${JS_TESTS:-}" ]; then
  read -r -a files <<<"$JS_TESTS"
else
  files=(*.test.mjs)
fi

status=0
# In the background so that a signal to this script is handled at once (the trap stops node too).
FIREBRAND_URL="ws://127.0.0.1:$port/socket" FIREBRAND_HTTP="http://127.0.0.1:$port" CONFORMANCE_BIN="$bin" \
  node --test --test-reporter=spec "${files[@]}" &
tests=$!
wait "$tests" || status=1
tests=""

# Stop the server: SIGTERM, then it must exit 0 within STOP_TIMEOUT_S.
kill -TERM "$pid" 2>/dev/null || { echo "run.sh: the conformance server was no longer running" >&2; status=1; }
sleep "$STOP_TIMEOUT_S" &
timer=$!
wait -n -p which "$pid" "$timer"
rc=$?
if [ "${which:-}" = "$pid" ]; then
  kill "$timer" 2>/dev/null; wait "$timer" 2>/dev/null
  pid=""
  if [ "$rc" -eq 0 ]; then
    echo "run.sh: conformance exited 0 on SIGTERM"
  else
    echo "run.sh: conformance exited with code $rc on SIGTERM (expected 0)" >&2
    status=1
  fi
else
  echo "run.sh: conformance did not exit within ${STOP_TIMEOUT_S}s of SIGTERM" >&2
  status=1
fi

[ "$status" -eq 0 ] && echo "run.sh: all passed"
exit "$status"
