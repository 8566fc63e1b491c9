#!/usr/bin/env bash
# Install AIPerf (NVIDIA's LLM benchmark client, pip `aiperf`) into its OWN venv, for `make compare-aiperf`
# (tools/aiperf_compare.py, docs/aiperf.md).
#
#   tools/install_aiperf.sh [VENV_DIR]      # default .venv-aiperf
#
# Why its own venv: aiperf 0.13.0 pulls transformers 5, numpy, pandas, zmq, textual and ~100 other
# packages with their own pins; none of that may touch the router's .venv (what CI tests) or the
# peers' .venv-peers. Nothing in `make test` / CI calls this script.
#
# Idempotent: when VENV_DIR already imports aiperf 0.13.0 it exits 0 at once. Two callers at the same
# time (two `make compare-aiperf`) serialize on `flock VENV_DIR.lock`; the second finds it installed.
# ~2 min and ~1 GB the first time (2 cores).
set -euo pipefail

AIPERF_VERSION=0.13.0
VENV=${1:-.venv-aiperf}
VENV=${VENV%/}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

log() { printf '[install_aiperf %4ds] %s\n' "$SECONDS" "$*"; }

installed() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null || true
import importlib.metadata as md
import aiperf.cli  # noqa: F401  (what `aiperf profile` runs)
print(md.version("aiperf"))
PY
}

ready() { [[ -x "$VENV/bin/aiperf" ]] && [[ "$(installed | tail -n 1)" == "$AIPERF_VERSION" ]]; }

if ready; then
  log "aiperf $AIPERF_VERSION already importable in $VENV; nothing to do"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
log "waiting for $VENV.lock"
flock 9
if ready; then # installed by whoever held the lock before us
  log "aiperf $AIPERF_VERSION installed meanwhile in $VENV"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
log "installing aiperf==$AIPERF_VERSION into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "aiperf==$AIPERF_VERSION" \
  2> >(grep -v "^WARNING: Location 'file:" >&2)

got=$(installed | tail -n 1)
[[ "$got" == "$AIPERF_VERSION" ]] || { echo "aiperf does not import from $VENV (got '$got')" >&2; exit 1; }
log "done: aiperf $AIPERF_VERSION in $VENV ($(du -sh "$VENV" | cut -f1)) in ${SECONDS}s"
