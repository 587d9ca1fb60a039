#!/usr/bin/env bash
# The CPU smoke comparison in docs/BENCH.md: two pdserve deployments of the embedded
# SmolLM2-135M on a 2-core CPU, a rate sweep and a concurrency sweep each, then the
# Markdown comparison and the plots. Start the servers first:
#   pdserve serve --port 8101                     # "seqs128" (default --max-num-seqs)
#   pdserve serve --port 8102 --max-num-seqs 2    # "seqs2"
set -euo pipefail
cd "$(dirname "$0")"
COMMON=(--dataset-name random --random-input-len 64 --random-output-len 32 --ignore-eos
        --num-prompts 10 --num-warmups 2 --seed 0 --goodput ttft:2000 tpot:250
        --disable-tqdm --metric-percentiles 50,99)
for dep in "seqs128 8101" "seqs2 8102"; do
  set -- $dep
  python -m pdserve.bench sweep --port "$2" --label "$1" "${COMMON[@]}" \
    --request-rates 0.25,0.5,1 --save-detailed --result-dir "$1/rate"
  python -m pdserve.bench sweep --port "$2" --label "$1" "${COMMON[@]}" \
    --max-concurrencies 1,2,4 --save-detailed --result-dir "$1/concurrency"
done
python -m pdserve.bench compare seqs128/rate/sweep.json seqs2/rate/sweep.json -o compare_rate.md
python -m pdserve.bench compare seqs128/concurrency/sweep.json seqs2/concurrency/sweep.json \
  -o compare_concurrency.md
python -m pdserve.bench plot seqs128/rate/sweep.json seqs2/rate/sweep.json -o plots_rate
python -m pdserve.bench plot seqs128/concurrency/sweep.json seqs2/concurrency/sweep.json \
  -o plots_concurrency
