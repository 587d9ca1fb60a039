#!/usr/bin/env bash
# Everything that needs 2+ GPUs, in parts that each fit one 10-minute device command.
# Run from the repo root on the GPU machine, results under $OUT:
#   OUT=results TOKENIZER=path/to/tokenizer bash benchmarks/multi_gpu_suite.sh checks  # 2 GPUs
#   OUT=results bash benchmarks/multi_gpu_suite.sh tp70b [TP]                           # TP GPUs
#   OUT=results TOKENIZER=... bash benchmarks/multi_gpu_suite.sh compare                # 2 GPUs
#   checks:  NCCL tensor parallelism and P/D exactness with a TP=2 decode instance (tests),
#            then the KV transfer between two GPUs, all transports (issue 4's 0.80 target)
#   tp70b:   Llama-3.1-70B preset at tensor parallel size TP (default 2): decode b=1 and
#            b=128 and an 8k prefill, each against its per-GPU floor (issue 3)
#   compare: 1P1D against 2 colocated instances behind the router (pd_compare.sh)
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
# NVLink multicast stays off on these machines (see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-checks}" in
  checks)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/test_tensor_parallel.py \
      -k nccl -rs 2>&1 | tail -3
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_disagg.py \
      tests/transfer/test_cuda_ipc.py -rs 2>&1 | tail -3
    timeout 200 python3 benchmarks/bench_kv_transfer.py --tiles 16:4,32:4,32:8 \
      --out "$OUT/kv_transfer_2gpu.json" 2>&1 | grep -E "GB/s"
    ;;
  tp70b)
    tp=${2:-2}
    timeout 560 python3 benchmarks/bench_engine.py --model llama-3.1-70b \
      --tensor-parallel-size "$tp" --max-num-seqs 128 \
      --cases decode_b1_1k,prefill_8k,decode_b128_2k \
      --out "$OUT/engine_llama-3.1-70b_tp$tp.json" 2>&1 | grep -v -i warn | tail -6
    ;;
  compare)
    N8K=${N8K:-30} N2K=${N2K:-80} bash benchmarks/pd_compare.sh
    ;;
  *)
    echo "usage: $0 checks | tp70b [TP] | compare" >&2
    exit 2
    ;;
esac
