#!/usr/bin/env bash
# A/B on real vLLM CPU + LMCache: kvrouter crediting the LMCache tier (events mode) vs GPU-only routing
# (--lmcache-credit-cpu-tier false), same fleet, same trace, both tiers emptied before each run.
#
#   LMCACHE_VENV=/path/venv-lmcache MODEL=/path/tiny-llama tools/lmcache_ab.sh TRACE OUT_DIR [REPLICAS]
#
# REPLICAS (default 2) replicas of the tiny model, each with its own LMCache MP server (1 GB L1) and a
# 96-block (3072-token) vLLM cache. Writes OUT_DIR/{cpu,gpu}/summary.json (kvrouter replay) and prints
# hit ratios (vLLM's cached_tokens: both tiers) and the replicas' external (LMCache) hit tokens per run.
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
  for u in "${SERVERS[@]}"; do curl -sf -X POST "$u/cache/clear" >/dev/null; done
  local rp; rp=$(port)
  local backends=(); for u in "${URLS[@]}"; do backends+=(--backend "$u"); done
  PYTHONPATH=. "$PY" -m router serve --port "$rp" "${backends[@]}" --kv-events auto --policy cache_aware "$@" \
    >"$OUT/router-$name.log" 2>&1 &
  local rpid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$rp/ready" >/dev/null && break; sleep 0.3; done
  local em=(); for u in "${URLS[@]}"; do em+=(--engine-metrics "$u"); done
  PYTHONPATH=. "$PY" -m router replay --trace "$TRACE" --target "$name=http://127.0.0.1:$rp" --out "$OUT/$name" \
    --model tiny --speedup "${SPEEDUP:-1}" "${em[@]}" --reset-prefix-cache --no-plots --request-timeout 120 >"$OUT/replay-$name.log" 2>&1
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
}
run cpu
run gpu --lmcache-credit-cpu-tier false
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
for name in ("cpu", "gpu"):
    s = json.load(open(f"{out}/{name}/summary.json"))
    t = s["targets"][name] if "targets" in s else s
    print(name, json.dumps({k: t.get(k) for k in ("requests", "ok", "hit_ratio", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s")}))
PYEOF
