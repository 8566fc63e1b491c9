# shellcheck shell=bash
# Process bookkeeping shared by serve_cpu.sh and gpu/serve_gpu.sh (sourced, not run).
#
# One replica = one process group, started with setsid so that NAME.pid holds the group id: vLLM forks
# an EngineCore and one Worker per GPU/CPU rank, and signalling the whole group is the only way to be
# sure none of them outlives a stop. Files per replica under $RUN_DIR: NAME.pid, NAME.log, NAME.env.
#
# Callers set RUN_DIR, HOST (what the server binds) and HEALTH_TIMEOUT before calling these functions,
# and PROBE_HOST where HOST is a wildcard like 0.0.0.0 (health checks and printed URLs use it).
# HEALTH_PATH (default /health) is the readiness URL path recorded per process at launch: LMCache's MP
# server and coordinator (serve_lmcache.sh) answer on other paths than vLLM.

die() { echo "${0##*/}: $*" >&2; exit 1; }

pid_of() { [[ -f "$RUN_DIR/$1.pid" ]] && cat "$RUN_DIR/$1.pid"; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
port_of() { sed -n 's/^PORT=//p' "$RUN_DIR/$1.env"; }
health_path_of() { local p; p=$(sed -n 's/^HEALTH_PATH=//p' "$RUN_DIR/$1.env"); echo "${p:-/health}"; }

# launch NAME PORT ZMQ_PORT REPLAY_PORT DEVICE VAR=VALUE... -- CMD...
launch() {
  local name=$1 port=$2 zmq_port=$3 replay_port=$4 device=$5
  shift 5
  local envs=()
  while (($#)) && [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
  shift
  mkdir -p "$RUN_DIR"
  if alive "$(pid_of "$name")"; then die "$name is already running (pid $(pid_of "$name"))"; fi
  {
    printf 'PORT=%s\nZMQ_PORT=%s\nREPLAY_PORT=%s\nDEVICE=%s\nSTARTED=%s\nHEALTH_PATH=%s\n' \
      "$port" "$zmq_port" "$replay_port" "$device" "$(date +%s)" "${HEALTH_PATH:-/health}"
    printf 'CMD='
    printf '%q ' "${envs[@]}" "$@"
    echo
  } >"$RUN_DIR/$name.env"
  # The shell's background child is not a group leader, so setsid execs in place (and `env` execs the
  # command): $! is the server's pid and the new process-group id at once.
  setsid env "${envs[@]}" "$@" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  local h=${PROBE_HOST:-$HOST}
  echo "started $name: http://$h:$port events tcp://$h:$zmq_port${replay_port:+ replay tcp://$h:$replay_port}" \
    "on $device, pid $!, log $RUN_DIR/$name.log"
}

wait_healthy() {
  local name=$1 pid port started path
  pid=$(pid_of "$name") || die "$name was never started (no $RUN_DIR/$name.pid)"
  port=$(port_of "$name")
  path=$(health_path_of "$name")
  started=$(sed -n 's/^STARTED=//p' "$RUN_DIR/$name.env")
  while true; do
    alive "$pid" || { tail -n 30 "$RUN_DIR/$name.log" >&2; die "$name (pid $pid) exited before it became healthy"; }
    if curl -fsS -o /dev/null --max-time 2 "http://${PROBE_HOST:-$HOST}:$port$path" 2>/dev/null; then
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
  local name=$1 pid members=() m
  pid=$(pid_of "$name") || { echo "$name: not started"; return 0; }
  if alive "$pid"; then
    # The group's pids, read before the signal: shared-memory segments named after them are removed below.
    mapfile -t members < <(ps -o pid= -g "$pid" 2>/dev/null | tr -d ' ')
    # SIGTERM to the whole group lets the API server shut its EngineCore down cleanly; SIGKILL after 20 s
    # for anything left (a worker stuck in an OpenMP barrier or a CUDA call does not always exit on TERM).
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
  # LMCacheMPConnector in lmcache_driven mode moves each worker's KV cache into POSIX SHM
  # /dev/shm/lmcache_kv_<workerpid>_<n> (as large as the KV cache) and leaves it behind on SIGTERM.
  for m in "${members[@]}"; do
    [[ -n "$m" ]] && rm -f /dev/shm/lmcache_kv_"$m"_*
  done
  rm -f "$RUN_DIR/$name.pid"
  echo "stopped $name"
}

stop_all() {
  local f
  for f in "$RUN_DIR"/*.pid; do
    [[ -e "$f" ]] && stop "$(basename "$f" .pid)"
  done
  return 0
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
      curl -fsS -o /dev/null --max-time 2 "http://${PROBE_HOST:-$HOST}:$port/health" 2>/dev/null && health=healthy
    fi
    echo "$name pid $pid port $port $health"
  done
}
