#!/usr/bin/env bash
# The Autobahn TestSuite (fuzzingclient) against firebrand's own WebSocket layer: an echo server
# (crates/conformance/src/bin/autobahn_echo.rs) with permessage-deflate on, every case of
# sections 1-13 (9, limits and performance, with messages up to 16 MB, which the echo server
# takes). Exits non-zero when a case is FAILED (or the run breaks); prints the count of each
# result (OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED) for the behaviour and for the
# close handshake.
#
#   bash scripts/autobahn.sh [path/to/autobahn-echo]   (default: builds it, release)
#
# Set-up, once, cached under $AUTOBAHN_CACHE (default ~/.cache/firebrand-autobahn): the upstream
# release from PyPI (autobahntestsuite, Python 2 only) in a virtualenv on pyenv's Python 2.7
# (AUTOBAHN_PYTHON to name another Python 2.7). CASES (default "*") and EXCLUDE (default none)
# narrow the run, e.g. CASES="1.* 2.*" for a quick check. The report is left in
# $AUTOBAHN_CACHE/reports/index.json (and HTML beside it).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${AUTOBAHN_CACHE:-$HOME/.cache/firebrand-autobahn}"
venv="$cache/venv"
die() { echo "autobahn.sh: $*" >&2; exit 1; }

if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  . "$HOME/.cargo/env"
fi

if [ ! -x "$venv/bin/wstest" ]; then
  py="${AUTOBAHN_PYTHON:-}"
  if [ -z "$py" ]; then
    command -v pyenv >/dev/null || [ -x "$HOME/.pyenv/bin/pyenv" ] || die "no pyenv: set AUTOBAHN_PYTHON to a Python 2.7"
    pyenv_bin="$(command -v pyenv || echo "$HOME/.pyenv/bin/pyenv")"
    v="$("$pyenv_bin" versions --bare | grep -E '^2\.7' | tail -n 1)" || true
    [ -n "$v" ] || die "pyenv has no Python 2.7 (pyenv install 2.7.18)"
    py="$("$pyenv_bin" root)/versions/$v/bin/python"
  fi
  echo "autobahn.sh: setting up autobahntestsuite with $py in $venv"
  mkdir -p "$cache"
  "$py" -m pip install --quiet --disable-pip-version-check virtualenv
  "$py" -m virtualenv --quiet "$venv"
  # The last releases that run on Python 2.7 (newer ones of these need Python 3).
  "$venv/bin/pip" install --quiet --disable-pip-version-check autobahntestsuite
  [ -x "$venv/bin/wstest" ] || die "wstest missing after the install"
fi

bin="${1:-}"
if [ -z "$bin" ]; then
  cargo build --release --bin autobahn-echo
  bin="$PWD/target/release/autobahn-echo"
fi
[ -x "$bin" ] || die "no executable at $bin"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" --port "$port" >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  grep -q "listening on" "$work/server.log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || die "the echo server exited: $(cat "$work/server.log")"
  sleep 0.1
done

cases_json="$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1].split()))' "${CASES:-*}")"
exclude_json="$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1].split()))' "${EXCLUDE:-}")"
rm -rf "$cache/reports"
cat >"$work/fuzzingclient.json" <<JSON
{
  "outdir": "$cache/reports",
  "servers": [{"agent": "firebrand", "url": "ws://127.0.0.1:$port"}],
  "cases": $cases_json,
  "exclude-cases": $exclude_json,
  "exclude-agent-cases": {}
}
JSON

start=$SECONDS
(cd "$work" && "$venv/bin/wstest" -m fuzzingclient -s fuzzingclient.json >"$work/wstest.log" 2>&1) || {
  tail -n 30 "$work/wstest.log" >&2
  die "wstest failed"
}
elapsed=$((SECONDS - start))

python3 - "$cache/reports/index.json" "$elapsed" <<'PY'
import json, sys
from collections import Counter
report = json.load(open(sys.argv[1]))
results = next(iter(report.values()))
behavior, close = Counter(), Counter()
failed = []
for case, r in sorted(results.items(), key=lambda kv: [int(x) for x in kv[0].split(".")]):
    behavior[r["behavior"]] += 1
    close[r["behaviorClose"]] += 1
    if r["behavior"] == "FAILED" or r["behaviorClose"] == "FAILED":
        failed.append(case)
order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
def line(c):
    return ", ".join("%s %d" % (k, c[k]) for k in order + sorted(set(c) - set(order)) if c[k])
print("autobahn: %d cases in %ss" % (len(results), sys.argv[2]))
print("autobahn: behaviour: " + line(behavior))
print("autobahn: close:     " + line(close))
if failed:
    print("autobahn: FAILED: " + " ".join(failed))
    sys.exit(1)
PY
