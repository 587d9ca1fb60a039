#!/usr/bin/env bash
# pdserve against vLLM's CPU build as a client measures them, in one command (issue #14).
# Not run in CI (vLLM's CPU build takes minutes to install and start).
#
#   bash benchmarks/vs_vllm_cpu.sh            # from the repo root; ~11 minutes on 2 cores once vLLM is installed
#
# Both servers run on core 0 with one thread each (pdserve --cpu-threads 1; vLLM
# OMP_NUM_THREADS=1), both with a 1 GiB KV cache, serving the same safetensors folder of the
# embedded SmolLM2-135M-Instruct; `vllm bench serve` (random dataset, --ignore-eos) runs on
# core 1. Both are up for the whole run and take turns, one run each, so that a host whose
# speed drifts over minutes slows both alike (an idle server takes ~1% of its core); only
# one serves at a time. Workloads, each run twice (passes with seeds 0 and 1: cold prefix
# caches both times), medians of the two passes:
#   a. 256 in / 64 out, one client at a time      (max concurrency 1, 8 prompts)
#   b. 256 in / 64 out, 8 concurrent clients      (32 prompts)
#   c. 1024 in / 16 out, 4 concurrent clients     (16 prompts)
# Prints a table of mean/P99 TTFT, mean TPOT, mean/P99 ITL and output tok/s with the ratio
# pdserve / vLLM, and writes OUT_JSON.
#
# Environment (all optional; and those of benchmarks/vllm_cpu_lib.sh):
#   OUT_JSON       results (benchmarks/results/vs_vllm_cpu.json)
#   VS_WORK        logs and scratch (a new /tmp/pdserve-vs-vllm.* folder)
#   SERVER_CORE    the core each server is pinned to (0); CLIENT_CORE the load generator's (1)
#   PASSES         runs of each workload (2)
#   WORKLOADS      which of a b c to run ("a b c")
#   TOTAL_TIMEOUT  seconds for the whole run (4500)
#   PDSERVE_SERVE_ARGS  more `pdserve serve` flags, e.g. "--finish-first-tokens 2"
cd "$(dirname "$0")/.."
LOG_TAG=vs-vllm
WORK=${VS_WORK:-$(mktemp -d /tmp/pdserve-vs-vllm.XXXXXX)}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-4500}
PDSERVE_KV_MEMORY=1GiB
export VLLM_CPU_KVCACHE_SPACE=1
source benchmarks/vllm_cpu_lib.sh
OUT_JSON=${OUT_JSON:-$ROOT/benchmarks/results/vs_vllm_cpu.json}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
PASSES=${PASSES:-2}
WORKLOADS=${WORKLOADS:-a b c}
RESULTS=$WORK/results; mkdir -p "$RESULTS"

declare -A SHAPE=([a]="256 64 1 8" [b]="256 64 8 32" [c]="1024 16 4 16")

ensure_vllm
note "vllm-cpu $VLLM_VERSION; both servers on core $SERVER_CORE, taking turns run by run; load generator on core $CLIENT_CORE; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
ensure_model

bench() {  # server url workload pass: one run, into $RESULTS/<server>_<w>_<pass>.json
  local server=$1 url=$2 w=$3 pass=$4 inp out conc num
  read -r inp out conc num <<< "${SHAPE[$w]}"
  log "$server: workload $w ($inp in / $out out, $conc concurrent, $num prompts), pass $pass"
  timeout 1200 taskset -c "$CLIENT_CORE" env VLLM_TARGET_DEVICE=cpu "$VPY" \
    "$ROOT/benchmarks/vllm_cli.py" bench serve --backend openai --base-url "$url" \
    --model smollm2 --tokenizer "$MODEL_DIR" --dataset-name random \
    --random-input-len "$inp" --random-output-len "$out" --num-prompts "$num" \
    --max-concurrency "$conc" --ignore-eos --seed "$pass" \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
    --save-result --result-dir "$RESULTS" --result-filename "${server}_${w}_${pass}.json" \
    >> "$WORK/bench_$server.log" 2>&1 || note "$server workload $w pass $pass: vllm bench serve exited $?"
}

PIN=(taskset -c "$SERVER_CORE")
port; P=$PORT_OUT
# shellcheck disable=SC2086  # word-split on purpose: a list of flags
pdserve_serve pdserve "$P" colocated --cpu-threads 1 ${PDSERVE_SERVE_ARGS:-}
port; V=$PORT_OUT
vllm_serve vllm "$V"
if wait_http pdserve "$(U "$P")/health" && wait_http vllm "$(U "$V")/health"; then
  for w in $WORKLOADS; do
    for pass in $(seq 0 $((PASSES - 1))); do
      bench pdserve "$(U "$P")" "$w" "$pass"
      bench vllm "$(U "$V")" "$w" "$pass"
    done
  done
fi
stop pdserve
stop vllm

"$PY" "$ROOT/benchmarks/vs_vllm_table.py" "$RESULTS" --notes "$NOTES" \
  --vllm-version "$VLLM_VERSION" --out "$OUT_JSON"
log "results: $OUT_JSON"
