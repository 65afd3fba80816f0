#!/usr/bin/env bash
# Installs or starts what the tests need, or stops at once saying what is missing and how to
# install it. Called by scripts/test.sh (the README's test command); safe to run again.
#
#   cargo, rustc      the Rust toolchain (rustup)
#   node, npm         the official phoenix client and the browser tests
#   chromium          the chat demo's browser tests (Debian's package; never a downloaded build)
#   openssl           firebrand-server's tests make their RS256/ES256 key pairs with it
#   promtool          firebrand-server's metrics test checks GET /metrics with it (Debian's
#                     prometheus package)
#   PyJWT, curl       firebrand-server's ecosystem suite (tests/server-js): a token minted in
#                     Python (Debian's python3-jwt, for /usr/bin/python3) and the quickstart's curl
#   psycopg           the outbox test's Python writer in tests/server-js (Debian's python3-psycopg)
#   Redis, NATS       the cluster tests, on 127.0.0.1:6379 and 127.0.0.1:4222
#   PostgreSQL        the outbox tests (firebrand-postgres), on 127.0.0.1:5432: user postgres
#                     without a password from 127.0.0.1, database `test`
set -euo pipefail

missing() {
  echo "scripts/prereqs.sh: $1 is missing and cannot be installed here (not root, or no apt-get)." >&2
  echo "  Install it with: $2" >&2
  exit 1
}

# apt-get install, as root on a Debian-like machine; `apt-get update` once per run.
updated=""
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  if [ -z "$updated" ]; then
    echo "scripts/prereqs.sh: apt-get update" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && updated=1
  fi
  echo "scripts/prereqs.sh: installing $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null ||
  missing "the Rust toolchain (cargo)" "curl --proto '=https' -sSf https://sh.rustup.rs | sh"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt_install nodejs npm || missing "Node.js 20+ with npm" "sudo apt-get install nodejs npm"
fi

if ! [ -x /usr/bin/chromium ]; then
  apt_install chromium || missing "Chromium (/usr/bin/chromium)" "sudo apt-get install chromium"
fi

if ! command -v openssl >/dev/null; then
  apt_install openssl || missing "OpenSSL (openssl)" "sudo apt-get install openssl"
fi

if ! command -v promtool >/dev/null; then
  apt_install prometheus || missing "promtool (Debian's prometheus)" "sudo apt-get install prometheus"
fi

# /usr/bin/python3 explicitly: `python3` on PATH may be another Python (pyenv) without it.
if ! /usr/bin/python3 -c "import jwt" 2>/dev/null; then
  apt_install python3 python3-jwt || missing "PyJWT (python3-jwt)" "sudo apt-get install python3-jwt"
fi

# The outbox test's Python writer (tests/server-js/outbox.test.mjs): psycopg 3, Debian's.
if ! /usr/bin/python3 -c "import psycopg" 2>/dev/null; then
  apt_install python3 python3-psycopg || missing "psycopg (python3-psycopg)" "sudo apt-get install python3-psycopg"
fi

if ! command -v curl >/dev/null; then
  apt_install curl || missing "curl" "sudo apt-get install curl"
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 50); do port_open "$1" && return 0; sleep 0.2; done
  echo "scripts/prereqs.sh: $2 was started but nothing listens on 127.0.0.1:$1" >&2
  exit 1
}

if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server ||
    missing "Redis (redis-server)" "sudo apt-get install redis-server"
  echo "scripts/prereqs.sh: starting Redis on 127.0.0.1:6379" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_port 6379 Redis
fi

if ! port_open 4222; then
  nats="$(command -v nats-server || echo /usr/sbin/nats-server)"
  [ -x "$nats" ] || apt_install nats-server ||
    missing "NATS (nats-server)" "sudo apt-get install nats-server"
  nats="$(command -v nats-server || echo /usr/sbin/nats-server)"
  echo "scripts/prereqs.sh: starting NATS on 127.0.0.1:4222" >&2
  if command -v start-stop-daemon >/dev/null; then
    start-stop-daemon --start --oknodo --background --exec "$nats" -- -a 127.0.0.1 -p 4222 -js
  else
    nohup "$nats" -a 127.0.0.1 -p 4222 -js >/dev/null 2>&1 &
  fi
  wait_port 4222 NATS
fi

if ! port_open 5432; then
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql || missing "PostgreSQL (postgresql)" "sudo apt-get install postgresql"
  fi
  echo "scripts/prereqs.sh: starting PostgreSQL on 127.0.0.1:5432" >&2
  version="$(ls /usr/lib/postgresql | sort -n | tail -1)"
  [ -n "$(pg_lsclusters -h 2>/dev/null | awk '$2 == "main"')" ] || pg_createcluster "$version" main >/dev/null
  pg_ctlcluster "$version" main start
  wait_port 5432 PostgreSQL
fi
# The tests connect as postgres from 127.0.0.1 without a password, to the database `test`.
if ! psql -h 127.0.0.1 -U postgres -d test -c "select 1" >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || missing "PostgreSQL access (postgres@127.0.0.1/test, trust)" \
    "allow trust for 127.0.0.1 in pg_hba.conf and run: createdb -U postgres test"
  hba="$(su postgres -c "psql -tAc 'show hba_file'")"
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    echo "scripts/prereqs.sh: PostgreSQL: trust for 127.0.0.1 (test machines only)" >&2
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    su postgres -c "psql -tAc 'select pg_reload_conf()'" >/dev/null
  fi
  su postgres -c "psql -tAc \"select 1 from pg_database where datname = 'test'\"" | grep -q 1 ||
    su postgres -c "createdb test"
  psql -h 127.0.0.1 -U postgres -d test -c "select 1" >/dev/null ||
    missing "PostgreSQL access (postgres@127.0.0.1/test)" "see scripts/prereqs.sh"
fi
