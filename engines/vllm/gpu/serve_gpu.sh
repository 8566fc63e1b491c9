#!/usr/bin/env bash
# N vLLM 0.32.0 replicas on one GPU host, each with prefix caching, ZMQ KV events (+ replay) and
# LMCache 0.5.6 as KV connector (CPU tier), ready for `kvrouter serve`.
#
#   engines/vllm/gpu/serve_gpu.sh start N MODEL    # replica i on GPUs [i*TP, (i+1)*TP)
#   engines/vllm/gpu/serve_gpu.sh wait             # block until every replica's /health is 200
#   engines/vllm/gpu/serve_gpu.sh status [NAME]
#   engines/vllm/gpu/serve_gpu.sh router-args      # the --backend flags for kvrouter serve
#   engines/vllm/gpu/serve_gpu.sh stop-all
#
# Environment (defaults in brackets):
#   VLLM_VENV [.venv-vllm-gpu]   vllm==0.32.0 + lmcache==0.5.6 (requirements-gpu.txt)
#   TP [1]  BASE_PORT [8000]  BASE_ZMQ_PORT [5557]  BASE_REPLAY_PORT [5657]   replica i: base + i
#   HOST [0.0.0.0]  ADVERTISE_HOST [$(hostname -f)]   what the router should dial
#   BLOCK_SIZE [16]  GPU_MEM_UTIL [0.90]  MAX_MODEL_LEN [model default]  SERVED_NAME [MODEL]
#   LMCACHE [1]                 0 = plain vLLM (no KV connector, no CPU tier)
#   LMCACHE_CONFIG_FILE [engines/vllm/gpu/lmcache.yaml]; LMCACHE_<KEY>=... overrides a key
#   PYTHONHASHSEED [0]          see below
#   RUN_DIR [.cache/vllm-gpu-run]  HEALTH_TIMEOUT [900]
#
# Why these settings:
# * endpoint tcp://*:PORT: vLLM binds (the `*`), so every router replica connects and none has to be
#   reachable from the engines. The replay endpoint lets a router that (re)joins fetch the last
#   buffer_steps batches instead of waiting for the cache to turn over.
# * --enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens in every response, which
#   the router compares with its own prediction.
# * PYTHONHASHSEED: LMCache chains its chunk hashes from vLLM's NONE_HASH, which is seeded from it, so
#   replicas (and restarts) only agree on chunk keys when it is set and equal. vLLM's own sha256 block
#   hashes are fixed without it; the router does not need either (it re-hashes the token ids carried in
#   BlockStored), but a shared LMCache backend (redis, p2p) does.
# * vLLM's default hash (sha256) is kept: xxhash would need PYTHONHASHSEED and the xxhash package.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VLLM_VENV=${VLLM_VENV:-.venv-vllm-gpu}
TP=${TP:-1}
BASE_PORT=${BASE_PORT:-8000}
BASE_ZMQ_PORT=${BASE_ZMQ_PORT:-5557}
BASE_REPLAY_PORT=${BASE_REPLAY_PORT:-5657}
HOST=${HOST:-0.0.0.0}
PROBE_HOST=127.0.0.1
ADVERTISE_HOST=${ADVERTISE_HOST:-$(hostname -f 2>/dev/null || hostname)}
BLOCK_SIZE=${BLOCK_SIZE:-16}
GPU_MEM_UTIL=${GPU_MEM_UTIL:-0.90}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-}
LMCACHE=${LMCACHE:-1}
LMCACHE_CONFIG_FILE=${LMCACHE_CONFIG_FILE:-$HERE/lmcache.yaml}
PYTHONHASHSEED=${PYTHONHASHSEED:-0}
RUN_DIR=${RUN_DIR:-.cache/vllm-gpu-run}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-900}

# shellcheck source-path=SCRIPTDIR source=../replicas.sh
source "$HERE/../replicas.sh"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

start() {
  local n=$1 model=$2 i first gpus port zmq_port replay_port events
  [[ -x "$VLLM_VENV/bin/vllm" ]] || die "no vllm in $VLLM_VENV (see engines/vllm/gpu/requirements-gpu.txt)"
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: this recipe needs NVIDIA GPUs (CPU: serve_cpu.sh)"
  local have
  have=$(nvidia-smi -L | wc -l)
  ((n * TP <= have)) || die "$n replicas x TP $TP needs $((n * TP)) GPUs, this host has $have"

  for ((i = 0; i < n; i++)); do
    first=$((i * TP))
    gpus=$(seq -s, "$first" $((first + TP - 1)))
    port=$((BASE_PORT + i))
    zmq_port=$((BASE_ZMQ_PORT + i))
    replay_port=$((BASE_REPLAY_PORT + i))
    events='{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv-events",'
    events+=' "endpoint": "tcp://*:'"$zmq_port"'", "replay_endpoint": "tcp://*:'"$replay_port"'"}'

    local args=(
      "$VLLM_VENV/bin/vllm" serve "$model" --served-model-name "${SERVED_NAME:-$model}"
      --host "$HOST" --port "$port" --tensor-parallel-size "$TP"
      --gpu-memory-utilization "$GPU_MEM_UTIL" --block-size "$BLOCK_SIZE"
      --enable-prefix-caching --enable-prompt-tokens-details
      --kv-events-config "$events"
    )
    [[ -n "$MAX_MODEL_LEN" ]] && args+=(--max-model-len "$MAX_MODEL_LEN")
    local envs=(CUDA_VISIBLE_DEVICES="$gpus" PYTHONHASHSEED="$PYTHONHASHSEED" VLLM_NO_USAGE_STATS=1)
    if [[ "$LMCACHE" == 1 ]]; then
      args+=(--kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}')
      envs+=(LMCACHE_CONFIG_FILE="$LMCACHE_CONFIG_FILE")
      # Per-key overrides the caller exported (LMCACHE_MAX_LOCAL_CPU_SIZE=..., ...) reach the server
      # through the inherited environment; LMCache applies them on top of the file.
    fi
    launch "vllm$i" "$port" "$zmq_port" "$replay_port" "gpu $gpus" "${envs[@]}" -- "${args[@]}"
  done
}

each_replica() {
  local f
  for f in "$RUN_DIR"/vllm*.pid; do
    [[ -e "$f" ]] && "$@" "$(basename "$f" .pid)"
  done
  return 0
}

router_args() { printf -- '--backend http://%s:%s ' "$ADVERTISE_HOST" "$(port_of "$1")"; }

action=${1:-}
shift || true
case "$action" in
  start) (($# == 2)) || usage; start "$@" ;;
  wait) each_replica wait_healthy ;;
  status) status "${1:-}" ;;
  router-args) each_replica router_args; echo ;;
  stop-all) stop_all ;;
  *) usage ;;
esac
