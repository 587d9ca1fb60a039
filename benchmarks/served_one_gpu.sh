#!/usr/bin/env bash
# Issue #21's served case on one GPU, as a client measures it: `pdserve serve` and
# `pdserve bench run`, 1024 prompt tokens / 128 out (ignore_eos, streamed), first one client at
# a time, then 64 concurrent clients; the peer is vLLM 0.26 on an H100 (shared/device notes):
# one client TPOT 6.63 ms, TTFT 51.6 ms; 64 clients 3,024 out tok/s, ITL P99 192 ms, TTFT 495 ms.
#   OUT=results bash benchmarks/served_one_gpu.sh   # TOKENIZER=folder to use another one
# Env: MODEL (llama-3.1-8b), MAX_NUM_SEQS (256), N64 (320 requests at 64 clients),
# IN/OUTLEN (1024/128), PORT (8123). On CPU (a smoke run of the script itself):
#   MODEL= IN=64 OUTLEN=8 N64=16 EXTRA="--cpu-threads 1" bash benchmarks/served_one_gpu.sh
set -u
OUT=${OUT:-results} MODEL=${MODEL-llama-3.1-8b} PORT=${PORT:-8123}
IN=${IN:-1024} OUTLEN=${OUTLEN:-128} N64=${N64:-320}
mkdir -p "$OUT"
model_args=() tok_args=()
[ -n "$MODEL" ] && model_args=(--model "$MODEL")
[ -n "${TOKENIZER:-}" ] && tok_args=(--tokenizer "$TOKENIZER")
# shellcheck disable=SC2086  # EXTRA is a list of flags
python3 -m pdserve.cli serve "${model_args[@]}" "${tok_args[@]}" --port "$PORT" \
  --max-num-seqs "${MAX_NUM_SEQS:-256}" ${EXTRA:-} >"$OUT/served_serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $server 2>/dev/null || { echo "server died:"; tail -20 "$OUT/served_serve.log"; exit 1; }
  sleep 2
done
for clients in 1 64; do
  n=$([ "$clients" = 1 ] && echo 20 || echo "$N64")
  python3 -m pdserve.cli bench run --base-url "http://127.0.0.1:$PORT" "${tok_args[@]}" \
    --dataset-name random --random-input-len "$IN" --random-output-len "$OUTLEN" \
    --random-range-ratio 0 --ignore-eos --num-prompts "$n" --max-concurrency "$clients" \
    --num-warmups 2 --seed 0 --disable-tqdm --label "c$clients" --save-result \
    --result-dir "$OUT" --result-filename "served_c$clients.json" 2>&1 | tail -25
done
# issue #20: nothing compiled or captured while serving (Triton, CUDA graphs, torch.compile)
curl -s "http://127.0.0.1:$PORT/metrics" | grep "^pdserve:compilations_after_ready" \
  | tee "$OUT/served_compilations.txt"
