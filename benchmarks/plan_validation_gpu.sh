#!/usr/bin/env bash
# Issue #22 on the GPUs at hand: profile a preset with `pdserve plan profile`, then run
# `pdserve plan validate --layouts all` on named workloads (every layout of the GPU budget,
# each started with `pdserve up`, benched with `pdserve bench`, beside its prediction).
#   OUT=results TOKENIZER=.device/tokenizer bash benchmarks/plan_validation_gpu.sh profile
#   OUT=results TOKENIZER=... bash benchmarks/plan_validation_gpu.sh validate 8k_r1 2k_r4
# Workloads: 8k_r1, 8k_r2 (8192 in / 512 out at 1 and 2 req/s), 2k_r4, 2k_r8 (2048 / 512),
# prefix (shared system prompts), code (the code-assistant mix). Env: MODEL (llama-3.1-8b),
# GPUS (all), N (100 requests a run), WORK (scratch folder; everything ends up tarred in
# $OUT/plan_gpu.tgz, since the device tool brings back few files), REUSE=1 (compare a new
# $WORK/profile.json's predictions with the runs already measured in $WORK: no GPU needed,
# e.g. GPUS=1 REUSE=1 WORK=copy-of-results bash ... validate 8k_r1 ...).
set -u
OUT=${OUT:-results} MODEL=${MODEL:-llama-3.1-8b} N=${N:-100}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)} WORK=${WORK:-/tmp/plan_gpu}
mkdir -p "$OUT" "$WORK"
tok_args=()
[ -n "${TOKENIZER:-}" ] && tok_args=(--tokenizer "$TOKENIZER")

workload() {  # the bench flags of a named workload
  case "$1" in
    8k_r1) echo "--random-input-len 8192 --random-output-len 512 --request-rate 1" ;;
    8k_r2) echo "--random-input-len 8192 --random-output-len 512 --request-rate 2" ;;
    2k_r4) echo "--random-input-len 2048 --random-output-len 512 --request-rate 4" ;;
    2k_r8) echo "--random-input-len 2048 --random-output-len 512 --request-rate 8" ;;
    prefix) echo "--dataset-name shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 25
                  --gsp-system-prompt-len 2048 --gsp-question-len 256 --gsp-output-len 256
                  --request-rate 4" ;;
    code) echo "--dataset-name code --request-rate 2" ;;
    *) echo "unknown workload $1" >&2; return 1 ;;
  esac
}

case "${1:-}" in
  profile)
    # shapes as served: 2048-token chunks (serve's default), up to 128 decode rows, 8.7k context
    timeout "${PROFILE_TIMEOUT:-420}" python3 -m pdserve.cli plan profile --model "$MODEL" \
      "${tok_args[@]}" --max-prefill-tokens 2048 --max-decode-rows 128 --max-context 8704 \
      -o "$WORK/profile.json" 2>&1 | grep -v -i warn | tail -12
    ;;
  validate)
    shift
    for w in "$@"; do
      # shellcheck disable=SC2046  # the workload's flags split into words
      timeout "${RUN_TIMEOUT:-400}" python3 -m pdserve.cli plan validate \
        --profile "$WORK/profile.json" --gpus "$GPUS" --layouts all --port 8400 \
        --result-dir "$WORK/$w" --num-prompts "$N" --seed 0 "${tok_args[@]}" ${REUSE:+--reuse-measured} \
        $(workload "$w") 2>&1 | grep -v -i warn | grep -E "^\| .*(ttft|itl|e2el|tpot|thr)" \
        || echo "$w: no table (see $WORK/$w)"
    done
    ;;
  *)
    echo "usage: $0 profile | validate WORKLOAD..." >&2
    exit 2
    ;;
esac
tar czf "$OUT/plan_gpu.tgz" -C "$WORK" .
