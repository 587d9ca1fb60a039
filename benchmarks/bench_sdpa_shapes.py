"""First-call cost of SDPA backends at new sequence lengths (cuDNN builds a plan per shape).

    python3 benchmarks/bench_sdpa_shapes.py     # on a GPU; prints ms of first and second calls
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, D = 32, 128
for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
    firsts, seconds = [], []
    for n in (1000, 1003, 1500, 2047, 3001, 4093, 8192):
        q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16)
        try:
            with sdpa_kernel(backend):
                for store in (firsts, seconds):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    F.scaled_dot_product_attention(q, q, q, is_causal=True)
                    torch.cuda.synchronize()
                    store.append(round((time.perf_counter() - t) * 1e3, 2))
        except RuntimeError as e:
            print(name, "unavailable", str(e)[:100])
            break
    print(f"sdpa {name}: first call ms {firsts}; second call ms {seconds}", flush=True)
