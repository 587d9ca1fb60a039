#!/usr/bin/env bash
# The first P/D comparison: 1P1D against 2 colocated instances behind the router, on 2 GPUs,
# Llama-3.1-8B preset (random weights, bf16). Run on the GPU machine from the repo root:
#   OUT=results TOKENIZER=path/to/tokenizer bash benchmarks/pd_compare.sh
# Workloads (random prompts, ignore_eos): 8192 in / 512 out at 1 req/s, then 2048 / 512 at
# 4 req/s. Writes one bench JSON per (layout, workload), the decode side's KV-pull metrics,
# and compare_*.md tables.
set -u
OUT=${OUT:-results}; MODEL=${MODEL:-llama-3.1-8b}; PORT=${PORT:-9000}
N8K=${N8K:-40}; N2K=${N2K:-100}
TOK=(); [ -n "${TOKENIZER:-}" ] && TOK=(--tokenizer "$TOKENIZER")
SERVE=(--max-model-len 10240 --max-num-batched-tokens 8192 --max-num-seqs 128 "${TOK[@]}")
mkdir -p "$OUT"

bench() {  # label input_len rate num
  python3 -m pdserve.bench run --port "$PORT" --label "$1" "${TOK[@]}" --dataset-name random \
    --random-input-len "$2" --random-output-len 512 --ignore-eos \
    --request-rate "$3" --num-prompts "$4" --num-warmups 2 --seed 0 --disable-tqdm \
    --save-result --result-dir "$OUT" --result-filename "$1-in$2.json" 2>&1 | tail -30
}

run_layout() {  # label, then `pdserve up` layout flags
  local label=$1; shift
  python3 -m pdserve.cli up --model "$MODEL" --port "$PORT" --startup-timeout 300 \
    --log-dir "$OUT/logs-$label" "$@" -- "${SERVE[@]}" > "$OUT/up-$label.log" 2>&1 &
  local up=$!
  for _ in $(seq 300); do grep -q "ready" "$OUT/up-$label.log" && break; sleep 1; done
  tail -12 "$OUT/up-$label.log"
  bench "$label" 8192 1 "$N8K"
  bench "$label" 2048 4 "$N2K"
  for port in $((PORT + 1)) $((PORT + 2)); do
    curl -s "localhost:$port/metrics" | grep -E "^(pdserve:(kv_pull|kv_bytes|kv_transfer)|vllm:num_preempt)" \
      > "$OUT/metrics-$label-$port.txt"
  done
  cat "$OUT"/metrics-"$label"-*.txt
  kill -INT "$up"; wait "$up"
}

run_layout 1P1D --prefill 1 --decode 1
run_layout 2colocated --colocated 2
for n in 8192 2048; do
  python3 -m pdserve.bench compare "$OUT/2colocated-in$n.json" "$OUT/1P1D-in$n.json" \
    -o "$OUT/compare_in$n.md" && cat "$OUT/compare_in$n.md"
done
