#!/usr/bin/env bash
# A/B on real vLLM CPU + LMCache: kvrouter crediting the LMCache tier (events mode) vs GPU-only routing
# (--lmcache-credit-cpu-tier false), same fleet, same trace, both tiers emptied before each run.
#
#   LMCACHE_VENV=/path/venv-lmcache MODEL=/path/tiny-llama tools/lmcache_ab.sh TRACE OUT_DIR [REPLICAS]
#
# REPLICAS (default 2) replicas of the tiny model, each with its own LMCache MP server (1 GB L1) and a
# 96-block (3072-token) vLLM cache. Prints and writes OUT_DIR/{cpu,gpu}.json (tools/lmcache_ab_client.py):
# hit ratio (vLLM's cached_tokens: both tiers) and the replicas' local vs external (LMCache) hit tokens.
set -euo pipefail
TRACE=$1; OUT=$2; N=${3:-2}
PY=${PY:-.venv/bin/python}
S=engines/vllm/serve_lmcache.sh
export RUN_DIR=${RUN_DIR:-$OUT/run} BLOCKS=${BLOCKS:-96}
mkdir -p "$OUT" "$RUN_DIR"
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
trap '$S stop-all >/dev/null 2>&1 || true' EXIT
URLS=(); SERVERS=()
for i in $(seq 0 $((N - 1))); do
  mp=$(port); hp=$(port); pp=$(port)
  $S server "mp$i" "$mp" "$hp" "$pp"
  SERVERS+=("http://127.0.0.1:$hp")
  eval "MP$i=$mp"
done
for i in $(seq 0 $((N - 1))); do $S wait "mp$i"; done
for i in $(seq 0 $((N - 1))); do
  p=$(port); z=$(port); r=$(port); mpv="MP$i"
  $S replica "r$i" "$p" "$z" "${!mpv}" $((i % 2)) "$r"
  URLS+=("http://127.0.0.1:$p")
done
for i in $(seq 0 $((N - 1))); do $S wait "r$i"; done

run() {  # NAME ROUTER_FLAGS...
  local name=$1; shift
  local rp; rp=$(port)
  local backends=(); for u in "${URLS[@]}"; do backends+=(--backend "$u"); done
  PYTHONPATH=. "$PY" -m router serve --port "$rp" "${backends[@]}" --kv-events auto --policy cache_aware \
    --drain-grace 0 "$@" >"$OUT/router-$name.log" 2>&1 &
  local rpid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$rp/ready" >/dev/null && break; sleep 0.3; done
  local args=(); for u in "${URLS[@]}"; do args+=(--replica "$u"); done
  for u in "${SERVERS[@]}"; do args+=(--lmcache "$u"); done
  PYTHONPATH=. "$PY" tools/lmcache_ab_client.py --trace "$TRACE" --router "http://127.0.0.1:$rp" \
    --speedup "${SPEEDUP:-1}" "${args[@]}" | tee "$OUT/$name.json"
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
}
run cpu
run gpu --lmcache-credit-cpu-tier false
