set -e
cd /work/wt/dev
taskset -c 0 python -m pdserve.cli serve --port 8455 --cpu-threads 1 > /work/runs/s13/diag/serve.log 2>&1 &
SP=$!
for i in $(seq 60); do curl -s localhost:8455/health >/dev/null && break; sleep 1; done
for cfg in "64 1" "512 1" "512 4"; do
  set -- $cfg
  taskset -c 1 python -m pdserve.cli bench run --base-url http://127.0.0.1:8455 --dataset-name random --random-input-len $1 --random-output-len 32 --num-prompts 8 --max-concurrency $2 --request-rate inf --ignore-eos --seed 5 --disable-tqdm --save-result --result-dir /work/runs/s13/diag --result-filename after_in$1_c$2.json > /work/runs/s13/diag/bench_$1_$2.log 2>&1
  python -c "import json;d=json.load(open('/work/runs/s13/diag/after_in$1_c$2.json'));print('$1 $2', {k:round(d[k],1) for k in ['mean_ttft_ms','mean_itl_ms','median_itl_ms','mean_tpot_ms']})"
done
kill $SP; wait
