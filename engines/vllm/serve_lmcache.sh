#!/usr/bin/env bash
# Start vLLM CPU replicas with LMCache 0.5.6 as their CPU tier: LMCache's MP server (one per replica, or one
# shared by several), vLLM's LMCacheMPConnector, and optionally LMCache's MP coordinator (directory lookups).
#
#   engines/vllm/serve_lmcache.sh coordinator NAME PORT
#   engines/vllm/serve_lmcache.sh server NAME MP_PORT HTTP_PORT PROM_PORT [COORDINATOR_URL INSTANCE_ID]
#   engines/vllm/serve_lmcache.sh replica NAME PORT ZMQ_PORT MP_PORT [CORE [REPLAY_PORT]]
#   engines/vllm/serve_lmcache.sh wait|stop|status NAME      engines/vllm/serve_lmcache.sh stop-all
#
# Environment: everything serve_cpu.sh reads (MODEL, RUN_DIR, BLOCKS, ...), plus
#   LMCACHE_VENV [.venv-lmcache]      made by install_lmcache.sh (vLLM CPU + lmcache); also runs the replicas
#   TRANSFER_MODE [lmcache_driven]    replica: lmcache_driven (POSIX-SHM KV, vLLM publishes the CPU tier's
#                                     BlockStored/BlockRemoved medium "CPU") or engine_driven (pickle transfer,
#                                     LMCache's CPU default: hits work, no CPU-tier events)
#   L1_SIZE_GB [1]  CHUNK_SIZE [256]  server: LMCache's CPU (L1) tier size and chunk; 0.02 GB holds ~80
#                                     tiny-model chunks and starts evicting at its 0.8 watermark
#
# Start order: coordinator, server(s), replicas (the connector waits for its server at registration).
# Stop order: replicas, then servers (stop removes the worker's /dev/shm/lmcache_kv_<pid>_* that SIGTERM leaves).
# Several replicas may name the same MP_PORT: they share one CPU tier, so one replica's prefill is an
# external hit on the others. `model_name` in coordinator lookups is the model PATH (MODEL), not "tiny".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LMCACHE_VENV=${LMCACHE_VENV:-.venv-lmcache}
RUN_DIR=${RUN_DIR:-.cache/vllm-run}
HOST=${HOST:-127.0.0.1}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-240}
TRANSFER_MODE=${TRANSFER_MODE:-lmcache_driven}
L1_SIZE_GB=${L1_SIZE_GB:-1}
CHUNK_SIZE=${CHUNK_SIZE:-256}
# shellcheck source-path=SCRIPTDIR source=replicas.sh
source "$HERE/replicas.sh"

usage() { sed -n '4,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# LMCache phones home unless told not to; the banner only clutters logs.
LMC_ENV=(DO_NOT_TRACK=1 LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1)

need_venv() { [[ -x "$LMCACHE_VENV/bin/python" ]] || die "no venv at $LMCACHE_VENV (run engines/vllm/install_lmcache.sh)"; }

action=${1:-}
shift || true
case "$action" in
  coordinator)
    (($# == 2)) || usage
    need_venv
    HEALTH_PATH=/healthz launch "$1" "$2" "" "" "lmcache coordinator" "${LMC_ENV[@]}" -- \
      "$LMCACHE_VENV/bin/python" -m lmcache.v1.mp_coordinator \
      --host "$HOST" --port "$2" --chunk-size "$CHUNK_SIZE" --health-check-interval 5
    ;;
  server)
    (($# == 4 || $# == 6)) || usage
    need_venv
    name=$1 mp_port=$2 http_port=$3 prom_port=$4
    coord=()
    (($# == 6)) && coord=(--coordinator-url "$5" --coordinator-advertise-ip "$HOST"
      --coordinator-event-reporting --instance-id "$6")
    # --supported-transfer-mode auto: the server default accepts lmcache_driven only, while a CPU client's
    # `auto` resolves to engine_driven; auto lets replicas of either mode share the server.
    HEALTH_PATH=/status launch "$name" "$http_port" "$mp_port" "" "lmcache mp server" "${LMC_ENV[@]}" -- \
      "$LMCACHE_VENV/bin/python" -m lmcache.v1.multiprocess.http_server \
      --host "$HOST" --port "$mp_port" --http-host "$HOST" --http-port "$http_port" --prometheus-port "$prom_port" \
      --chunk-size "$CHUNK_SIZE" --l1-size-gb "$L1_SIZE_GB" --eviction-policy LRU --supported-transfer-mode auto \
      "${coord[@]}"
    ;;
  replica)
    (($# >= 4 && $# <= 6)) || usage
    need_venv
    name=$1 port=$2 zmq_port=$3 mp_port=$4
    case "$TRANSFER_MODE" in lmcache_driven | engine_driven | auto) ;; *) die "TRANSFER_MODE must be lmcache_driven, engine_driven or auto" ;; esac
    kv='{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both","kv_connector_extra_config":'
    kv+='{"lmcache.mp.host":"tcp://'"$HOST"'","lmcache.mp.port":'"$mp_port"',"lmcache.mp.mp_transfer_mode":"'"$TRANSFER_MODE"'"}}'
    # bf16 is what the LMCache tests ran with (no SIGILL on this path); float32 doubles the bytes per chunk.
    DTYPE=${DTYPE:-bfloat16} VLLM_VENV=$LMCACHE_VENV KV_TRANSFER_CONFIG=$kv EXTRA_ENV="${LMC_ENV[*]} ${EXTRA_ENV:-}" \
      exec bash "$HERE/serve_cpu.sh" start "$name" "$port" "$zmq_port" "${@:5}"
    ;;
  wait) (($# == 1)) || usage; wait_healthy "$1" ;;
  stop) (($# == 1)) || usage; stop "$1" ;;
  stop-all) stop_all ;;
  status) status "${1:-}" ;;
  *) usage ;;
esac
