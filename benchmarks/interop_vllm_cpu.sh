#!/usr/bin/env bash
# pdserve <-> vLLM interop on CPU (issue #13): does each proxy/engine pairing give the text of
# a colocated instance? Not run in CI (vLLM's CPU build takes minutes to install and start).
#
#   bash benchmarks/interop_vllm_cpu.sh            # from the repo root; ~15 minutes on 2 cores
#
# Setups, each sent the prompt set of benchmarks/interop_vllm_check.py (8 greedy requests,
# completions and chat, streamed and not) and compared, text and usage.completion_tokens,
# with the colocated instance of the same engine:
#   vLLM toy proxy -> pdserve P+D        vllm-router -> pdserve P+D
#   pdserve router -> pdserve P+D        pdserve router -> vLLM P+D (NixlConnector)
#   pdserve router -> vLLM P+D without a KV connector
#   vLLM toy proxy -> vLLM P+D (NixlConnector): vLLM with itself, to show the NIXL setup works
# then `vllm bench serve` against pdserve's router in front of pdserve P+D.
#
# Environment (all optional; and those of benchmarks/vllm_cpu_lib.sh):
#   VLLM_TOY_PROXY   vLLM's tests/v1/kv_connector/nixl_integration/toy_proxy_server.py, or
#   VLLM_SRC         a vLLM source checkout that holds it (the toy proxy rows are skipped else)
#   MODEL_DIR        the HF folder both engines serve (exported from the embedded GGUF if absent)
#   OUT_JSON         results (benchmarks/results/interop_vllm_cpu.json)
#   INTEROP_WORK     logs and scratch (a new /tmp/pdserve-interop.* folder)
#   BASE_PORT        first port tried (18700); busy ports are skipped
#   DTYPE            float32 | bfloat16, both engines (float32)
#   STARTUP_TIMEOUT  seconds a server may take to answer /health (300)
#   VLLM_OMP_NUM_THREADS  OpenMP threads of each vLLM instance (1)
#   TOTAL_TIMEOUT    seconds for the whole run (2700)
cd "$(dirname "$0")/.."
LOG_TAG=interop
WORK=${INTEROP_WORK:-$(mktemp -d /tmp/pdserve-interop.XXXXXX)}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-2700}
NEED_NIXL=1
source benchmarks/vllm_cpu_lib.sh
OUT_JSON=${OUT_JSON:-$ROOT/benchmarks/results/interop_vllm_cpu.json}
ROWS=$WORK/rows.jsonl; : > "$ROWS"
CHECK=("$PY" "$ROOT/benchmarks/interop_vllm_check.py")

ensure_vllm
note "vllm-cpu $VLLM_VERSION; vllm-router $("$PY" -c "import importlib.metadata as m; print(m.version('vllm-router'))" 2>/dev/null || echo '?')"
ensure_model

TOY=${VLLM_TOY_PROXY:-${VLLM_SRC:+$VLLM_SRC/tests/v1/kv_connector/nixl_integration/toy_proxy_server.py}}
[ -n "$TOY" ] && [ -f "$TOY" ] || { note "vLLM's toy_proxy_server.py not found (set VLLM_TOY_PROXY or VLLM_SRC): toy proxy rows skipped"; TOY=; }

pdserve_router() {  # name port prefill_url decode_url
  start "$1" "$PY" -m pdserve.cli router --port "$2" --prefill "$3" --decode "$4"
}
compare() {  # setup url reference [--kv-metric URL NAME ...]
  local setup=$1 url=$2 ref=$3; shift 3
  log "checking: $setup"
  timeout 900 "${CHECK[@]}" compare "$setup" "$url" --reference "$ref" --rows "$ROWS" "$@" \
    || note "$setup: the checker failed"
}

# --- 3. references ------------------------------------------------------------------------
port; P_COLO=$PORT_OUT
pdserve_serve pdserve-colocated "$P_COLO" colocated
if wait_http pdserve-colocated "$(U "$P_COLO")/health"; then
  timeout 600 "${CHECK[@]}" reference "$(U "$P_COLO")" --source "pdserve colocated" --out "$WORK/ref_pdserve.json"
fi
stop pdserve-colocated
[ -f "$WORK/ref_pdserve.json" ] || { note "no pdserve reference"; exit 1; }

port; V_COLO=$PORT_OUT
VLLM_ENV=(); vllm_serve vllm-colocated "$V_COLO"
if wait_http vllm-colocated "$(U "$V_COLO")/health"; then
  timeout 600 "${CHECK[@]}" reference "$(U "$V_COLO")" --source "vLLM colocated" --out "$WORK/ref_vllm.json"
  compare "vLLM colocated vs pdserve colocated (same weights)" "$(U "$V_COLO")" "$WORK/ref_pdserve.json" \
    --kv-note "n/a (no P/D)"
fi
stop vllm-colocated

# --- 4. pdserve P+D behind three proxies, and vllm bench serve ---------------------------------
port; PP=$PORT_OUT; port; PD=$PORT_OUT; port; PR=$PORT_OUT; port; TOYP=$PORT_OUT; port; VR=$PORT_OUT
port; VR_METRICS=$PORT_OUT  # vllm-router's Prometheus listener (29000 unless told)
pdserve_serve pdserve-prefill "$PP" prefill --accept-client-kv-requests
pdserve_serve pdserve-decode "$PD" decode
if wait_http pdserve-prefill "$(U "$PP")/health" && wait_http pdserve-decode "$(U "$PD")/health"; then
  KV_PD=(--kv-metric "$(U "$PD")" "pdserve:kv_pulls_ok")
  pdserve_router pdserve-router "$PR" "$(U "$PP")" "$(U "$PD")"
  wait_http pdserve-router "$(U "$PR")/health" \
    && compare "pdserve router -> pdserve P+D" "$(U "$PR")" "$WORK/ref_pdserve.json" "${KV_PD[@]}"
  if [ -n "$TOY" ]; then
    start toy-proxy-pdserve "$VPY" "$TOY" --host 127.0.0.1 --port "$TOYP" \
      --prefiller-hosts 127.0.0.1 --prefiller-ports "$PP" --decoder-hosts 127.0.0.1 --decoder-ports "$PD"
    wait_http toy-proxy-pdserve "$(U "$TOYP")/healthcheck" \
      && compare "vLLM toy proxy -> pdserve P+D" "$(U "$TOYP")" "$WORK/ref_pdserve.json" "${KV_PD[@]}"
    stop toy-proxy-pdserve
  fi
  start vllm-router-pdserve vllm-router --host 127.0.0.1 --port "$VR" --vllm-pd-disaggregation \
    --prefill "$(U "$PP")" --decode "$(U "$PD")" --worker-startup-timeout-secs 60 \
    --prometheus-host 127.0.0.1 --prometheus-port "$VR_METRICS"
  wait_http vllm-router-pdserve "$(U "$VR")/health" \
    && compare "vllm-router -> pdserve P+D" "$(U "$VR")" "$WORK/ref_pdserve.json" "${KV_PD[@]}"
  stop vllm-router-pdserve
  if [ -n "${PID[pdserve-router]:-}" ]; then
    log "vllm bench serve against pdserve's router (32 prompts, 128 in, 32 out)"
    timeout 600 env VLLM_TARGET_DEVICE=cpu "$VPY" "$ROOT/benchmarks/vllm_cli.py" bench serve \
      --backend openai --base-url "$(U "$PR")" --model smollm2 --tokenizer "$MODEL_DIR" \
      --dataset-name random --random-input-len 128 --random-output-len 32 --num-prompts 32 \
      --seed 0 > "$WORK/vllm-bench.log" 2>&1 || note "vllm bench serve exited $? (log: $WORK/vllm-bench.log)"
    grep -v "leaked\|nanobind\|skipped remainder" "$WORK/vllm-bench.log" | tail -25 >&2
  fi
fi
stop pdserve-router pdserve-prefill pdserve-decode

# --- 5. vLLM P+D over NIXL behind pdserve's router (and vLLM's own proxy) ------------------------
port; VP=$PORT_OUT; port; VD=$PORT_OUT; port; VPS=$PORT_OUT; port; VDS=$PORT_OUT; port; PR2=$PORT_OUT; port; TOY2=$PORT_OUT
NIXL='{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'
VLLM_ENV=(VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT="$VPS")
vllm_serve vllm-nixl-prefill "$VP" --kv-transfer-config "$NIXL"
VLLM_ENV=(VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT="$VDS")
vllm_serve vllm-nixl-decode "$VD" --kv-transfer-config "$NIXL"
if wait_http vllm-nixl-prefill "$(U "$VP")/health" && wait_http vllm-nixl-decode "$(U "$VD")/health"; then
  KV_VD=(--kv-metric "$(U "$VD")" "vllm:nixl_xfer_time_seconds_count"
         --kv-metric "$(U "$VD")" 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}')
  if [ -n "$TOY" ]; then
    start toy-proxy-vllm "$VPY" "$TOY" --host 127.0.0.1 --port "$TOY2" \
      --prefiller-hosts 127.0.0.1 --prefiller-ports "$VP" --decoder-hosts 127.0.0.1 --decoder-ports "$VD"
    wait_http toy-proxy-vllm "$(U "$TOY2")/healthcheck" \
      && compare "vLLM toy proxy -> vLLM P+D (NIXL)" "$(U "$TOY2")" "$WORK/ref_vllm.json" "${KV_VD[@]}"
    stop toy-proxy-vllm
  fi
  pdserve_router pdserve-router-vllm "$PR2" "$(U "$VP")" "$(U "$VD")"
  wait_http pdserve-router-vllm "$(U "$PR2")/health" \
    && compare "pdserve router -> vLLM P+D (NIXL)" "$(U "$PR2")" "$WORK/ref_vllm.json" "${KV_VD[@]}"
fi
stop pdserve-router-vllm vllm-nixl-prefill vllm-nixl-decode
VLLM_ENV=()

# --- 6. vLLM without a KV connector, as P and as D, behind pdserve's router ---------------------
# two instances: the router keys instances by URL, so one URL given as P and D is a D only
port; VNP=$PORT_OUT; port; VND=$PORT_OUT; port; PR3=$PORT_OUT
vllm_serve vllm-noconn-prefill "$VNP"
vllm_serve vllm-noconn-decode "$VND"
if wait_http vllm-noconn-prefill "$(U "$VNP")/health" && wait_http vllm-noconn-decode "$(U "$VND")/health"; then
  pdserve_router pdserve-router-noconn "$PR3" "$(U "$VNP")" "$(U "$VND")"
  wait_http pdserve-router-noconn "$(U "$PR3")/health" \
    && compare "pdserve router -> vLLM P+D without KV connector" "$(U "$PR3")" "$WORK/ref_vllm.json" \
      --kv-note "no (no connector)"
fi
stop pdserve-router-noconn vllm-noconn-prefill vllm-noconn-decode

# --- 7. the table ------------------------------------------------------------------------------
"${CHECK[@]}" table --rows "$ROWS" --bench-log "$WORK/vllm-bench.log" --notes "$NOTES" --out "$OUT_JSON"
log "results: $OUT_JSON"
