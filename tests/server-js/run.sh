#!/usr/bin/env bash
# The ecosystem against the firebrand-server binary: the official phoenix npm client (WebSocket
# and long-poll), tokens minted by npm jsonwebtoken and by Python's PyJWT, the server API called
# with fetch(), connects, joins and pushes decided by a node:http backend, the quickstart in
# README.md run as written, and outbox rows written by psql, psycopg and pg inside transactions
# (PostgreSQL on 127.0.0.1:5432, database test).
#
#   bash tests/server-js/run.sh [path/to/firebrand-server]   (default: target/release/firebrand-server)
#
# Builds nothing. Each test file starts the binary it needs with a temp config on 127.0.0.1:0
# (support.mjs), reads the port from its `listening on` line, and stops it with SIGTERM at the end
# (it must exit 0). Runs `node --test` on the *.test.mjs files here (or on $JS_TESTS, a
# space-separated list of file names). Exits non-zero if anything failed.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../target/release/firebrand-server}"

die() { echo "run.sh: $*" >&2; exit 1; }
[ -x "$bin" ] || die "no executable firebrand-server at $bin (build it with: cargo build --release --bin firebrand-server)"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
command -v node >/dev/null || die "node is not installed"
# /usr/bin/python3 explicitly: `python3` on PATH may be another Python without PyJWT.
/usr/bin/python3 -c "import jwt" 2>/dev/null ||
  die "PyJWT is missing for /usr/bin/python3 (install it with: sudo apt-get install python3-jwt)"
command -v curl >/dev/null || die "curl is not installed (the quickstart publishes with it)"
/usr/bin/python3 -c "import psycopg" 2>/dev/null ||
  die "psycopg is missing for /usr/bin/python3 (the outbox test's Python writer; install it with: sudo apt-get install python3-psycopg)"
command -v psql >/dev/null || die "psql is not installed (the outbox test's SQL writer; sudo apt-get install postgresql-client)"

cd "$here" || die "cannot cd to $here"
if [ ! -d node_modules ]; then
  npm ci --no-audit --no-fund || die "npm ci failed"
fi

if [ -n "${JS_TESTS:-}" ]; then
  read -r -a files <<<"$JS_TESTS"
else
  files=(*.test.mjs)
fi

FIREBRAND_SERVER_BIN="$bin" node --test --test-reporter=spec "${files[@]}" &
tests=$!
trap 'kill -TERM "$tests" 2>/dev/null' INT TERM HUP
wait "$tests"
status=$?
[ "$status" -eq 0 ] && echo "run.sh: all passed"
exit "$status"
