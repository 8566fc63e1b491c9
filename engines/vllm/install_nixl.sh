#!/usr/bin/env bash
# Install NIXL 1.5.1 (PyPI wheels, UCX backend bundled) for vLLM's NixlConnector prefill/decode pair on CPU,
# WITHOUT touching the vLLM venv: the wheels go into a --target folder that serve_pd.sh puts on PYTHONPATH.
#
#   engines/vllm/install_nixl.sh [NIXL_DIR [VLLM_VENV]]   # defaults .cache/nixl-site and .venv-vllm
#
# Why --target and not `pip install` into the venv: the shared vLLM venv stays byte-identical (its pins are
# the verified freeze in constraints-cpu.txt), and removing NIXL is `rm -r NIXL_DIR`. A dry run in the venv
# resolves exactly nixl + nixl-cu12 + nixl-cu13 1.5.1 and nothing else, so --no-deps loses nothing.
# Why all three: the `nixl` meta package picks nixl_cu12 or nixl_cu13 at import time (cu13 without CUDA);
# both ship the UCX plugin that runs over loopback/shared memory on a CPU-only machine.
# The venv's python runs pip so the wheels match its interpreter (cp311, manylinux x86_64).
#
# Idempotent: when `import nixl` from NIXL_DIR already reports 1.5.1 and builds a UCX agent, it exits 0.
set -euo pipefail

NIXL_VERSION=1.5.1
NIXL_DIR=${1:-.cache/nixl-site}
VENV=${2:-${VLLM_VENV:-.venv-vllm}}
PY="$VENV/bin/python"

log() { printf '[install_nixl %4ds] %s\n' "$SECONDS" "$*"; }

[[ -x "$PY" ]] || { echo "no python at $PY: run engines/vllm/install_cpu.sh $VENV first" >&2; exit 1; }

check() {
  # Prints the nixl version if NIXL_DIR imports and a UCX agent comes up, else nothing.
  PYTHONPATH="$NIXL_DIR" "$PY" - <<'PY' 2>/dev/null || true
import importlib.metadata, os, sys
from nixl._api import nixl_agent, nixl_agent_config
nixl_agent(f"install-check-{os.getpid()}", nixl_agent_config(backends=["UCX"]))
print(importlib.metadata.version("nixl"))
PY
}

if [[ -d "$NIXL_DIR" ]] && [[ "$(check | tail -n 1)" == "$NIXL_VERSION" ]]; then
  log "nixl $NIXL_VERSION already in $NIXL_DIR; nothing to do"
  exit 0
fi

log "installing nixl==$NIXL_VERSION nixl-cu12 nixl-cu13 into $NIXL_DIR (--no-deps, the venv is not touched)"
rm -rf "$NIXL_DIR"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$NIXL_DIR" \
  "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_VERSION" "nixl-cu13==$NIXL_VERSION" \
  2> >(grep -v "^WARNING: Location 'file:" >&2)

got=$(check | tail -n 1)
[[ "$got" == "$NIXL_VERSION" ]] || { echo "nixl does not import / build a UCX agent from $NIXL_DIR" >&2; exit 1; }
log "done: nixl $got in $NIXL_DIR ($(du -sh "$NIXL_DIR" | cut -f1)) in ${SECONDS}s"
