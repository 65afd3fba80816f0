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
# narrow the run, e.g. CASES="1.* 2.*" for a quick check. A whole run is shared out among
# AUTOBAHN_JOBS (default: one per core) wstest processes. The report is left in
# $AUTOBAHN_CACHE/reports/index.json (and each wstest's HTML in reports/<n>/).
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

# The whole run is the Python client's (one core, most of it deflating sections 12 and 13):
# it is split into one wstest per core, each with its share of the sections, balanced by what
# each took in a whole run (seconds, 2026-12-07). A run narrowed by CASES is one wstest.
jobs="${AUTOBAHN_JOBS:-$(nproc)}"
if [ -n "${CASES:-}" ] || [ "$jobs" -lt 2 ]; then
  shares=("${CASES:-*}")
else
  mapfile -t shares < <(python3 - "$jobs" <<'PY'
import sys
weights = {"12.2.*": 127, "12.3.*": 125, "12.5.*": 99, "13.6.*": 61, "12.4.*": 59,
           "13.4.*": 53, "13.3.*": 52, "13.2.*": 52, "12.1.*": 52, "13.5.*": 50,
           "13.1.*": 48, "13.7.*": 48}
light = ["%d.*" % n for n in range(1, 12)]
jobs = [[0, []] for _ in range(int(sys.argv[1]))]
for pattern, w in sorted(weights.items(), key=lambda kv: -kv[1]):
    job = min(jobs, key=lambda j: j[0])
    job[0] += w
    job[1].append(pattern)
min(jobs, key=lambda j: j[0])[1].extend(light)
for _, patterns in jobs:
    print(" ".join(patterns))
PY
  )
fi

exclude_json="$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1].split()))' "${EXCLUDE:-}")"
rm -rf "$cache/reports"
start=$SECONDS
waits=()
for i in "${!shares[@]}"; do
  cases_json="$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1].split()))' "${shares[$i]}")"
  mkdir -p "$work/$i"
  cat >"$work/$i/fuzzingclient.json" <<JSON
{
  "outdir": "$cache/reports/$i",
  "servers": [{"agent": "firebrand", "url": "ws://127.0.0.1:$port"}],
  "cases": $cases_json,
  "exclude-cases": $exclude_json,
  "exclude-agent-cases": {}
}
JSON
  (cd "$work/$i" && "$venv/bin/wstest" -m fuzzingclient -s fuzzingclient.json >wstest.log 2>&1) &
  waits+=($!)
done
for i in "${!waits[@]}"; do
  wait "${waits[$i]}" || {
    tail -n 30 "$work/$i/wstest.log" >&2
    die "wstest failed (cases ${shares[$i]})"
  }
done
elapsed=$((SECONDS - start))

python3 - "$cache/reports" "$elapsed" "${#shares[@]}" <<'PY'
import glob, json, os, sys
from collections import Counter
# One report per wstest, merged into reports/index.json (the HTML stays in reports/<n>/).
results = {}
for index in sorted(glob.glob(os.path.join(sys.argv[1], "*", "index.json"))):
    results.update(next(iter(json.load(open(index)).values())))
json.dump({"firebrand": results}, open(os.path.join(sys.argv[1], "index.json"), "w"))
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
print("autobahn: %d cases in %ss (%s wstest at once)" % (len(results), sys.argv[2], sys.argv[3]))
print("autobahn: behaviour: " + line(behavior))
print("autobahn: close:     " + line(close))
if failed:
    print("autobahn: FAILED: " + " ".join(failed))
    sys.exit(1)
PY
