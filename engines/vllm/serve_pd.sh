#!/usr/bin/env bash
# Start a vLLM CPU prefill/decode pair that hands KV over with NixlConnector (UCX over loopback).
#
#   engines/vllm/serve_pd.sh start NAME prefill|decode PORT ZMQ_PORT SIDE_CHANNEL_PORT [CORE [REPLAY_PORT]]
#   engines/vllm/serve_pd.sh wait|stop|status NAME      engines/vllm/serve_pd.sh stop-all
#
# Environment: everything serve_cpu.sh reads (VLLM_VENV, MODEL, RUN_DIR, BLOCKS, ...), plus
#   NIXL_DIR [.cache/nixl-site]   the --target folder made by install_nixl.sh; put on the server's PYTHONPATH
#   NIXL_EXTRA_CONFIG []          JSON object for kv_connector_extra_config, e.g. '{"kv_lease_duration":60}'
#   DTYPE [float32]               NOT bfloat16: on a Xeon with AMX tiles vLLM 0.32 picks its `amx` attention
#                                 kernel for bf16, and the decode replica's worker died with SIGILL ("Illegal
#                                 instruction", in cpu_attention_with_kv_cache) on its first step after a NIXL
#                                 load; float32 selects the vector kernel and works.
#                                 Both sides must use the same dtype (NIXL's compatibility hash checks it).
#
# What it sets, and why (docs/real-engines.md §9 has the measurements):
#   kv_connector NixlConnector, kv_buffer_device "cpu"   vLLM 0.32 has a real CPU/DRAM path for NIXL
#   kv_role kv_producer (prefill) / kv_consumer (decode)  kv_both works too but is deprecated
#   VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 + a PORT per instance: the handshake listener the decode side dials
#     (the prefill returns it as remote_host/remote_port in kv_transfer_params); two instances on one port clash
#   UCX_NET_DEVICES=lo UCX_TLS=self,sm,tcp               loopback + shared memory only, no RDMA probing
#
# Traps: each NIXL agent starts a UCX progress thread that busy-polls ~60-100 % of a core even when idle
# (turning it off makes transfers hang: keep it), and vLLM's NIXL worker pins its main thread to the last
# core of each NUMA node whatever VLLM_CPU_OMP_THREADS_BIND says. On a 2-core box a pair is slow: give
# requests >= 60 s timeouts. A decode leg sent after the lease (kv_lease_duration, 30 s) reads freed blocks
# and still answers 200: send leg 2 at once.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NIXL_DIR=${NIXL_DIR:-.cache/nixl-site}
export DTYPE=${DTYPE:-float32}

usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

action=${1:-}
shift || true
case "$action" in
  start)
    (($# >= 5 && $# <= 7)) || usage
    name=$1 role=$2 port=$3 zmq_port=$4 side_port=$5
    case "$role" in
      prefill) kv_role=kv_producer ;;
      decode) kv_role=kv_consumer ;;
      *) usage ;;
    esac
    [[ -d "$NIXL_DIR/nixl" ]] || { echo "no nixl in $NIXL_DIR (run engines/vllm/install_nixl.sh $NIXL_DIR)" >&2; exit 1; }
    nixl_abs=$(cd "$NIXL_DIR" && pwd)
    kv='{"kv_connector":"NixlConnector","kv_role":"'"$kv_role"'","kv_buffer_device":"cpu"'
    [[ -n "${NIXL_EXTRA_CONFIG:-}" ]] && kv+=',"kv_connector_extra_config":'"$NIXL_EXTRA_CONFIG"
    kv+='}'
    KV_TRANSFER_CONFIG=$kv \
      EXTRA_ENV="PYTHONPATH=$nixl_abs VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=$side_port UCX_NET_DEVICES=lo UCX_TLS=self,sm,tcp ${EXTRA_ENV:-}" \
      exec bash "$HERE/serve_cpu.sh" start "$name" "$port" "$zmq_port" "${@:6}"
    ;;
  wait | stop | status | stop-all) exec bash "$HERE/serve_cpu.sh" "$action" "$@" ;;
  *) usage ;;
esac
