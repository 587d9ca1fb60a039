"""CPU prefill attention: torch SDPA with 3-D inputs (its "math" path) against 4-D (flash).

    taskset -c 0 python3 benchmarks/bench_cpu_sdpa.py

One layer of the embedded SmolLM2 (9 query heads, 3 KV heads, head dim 64), one thread,
float32: a fresh prompt (masked, and causal) and a chunk over a cached prefix (masked), each
call shaped as pdserve's CPU attention made it before (3-D, [H, L, D]) and makes it now
(4-D, [1, H, L, D]; pdserve/kernels/attention.py). Median of 5 calls; max difference to 3-D.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

HQ, HKV, D = 9, 3, 64


def ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare(context: int, q_len: int) -> str:
    n = context + q_len
    q, k, v = torch.randn(HQ, q_len, D), torch.randn(HKV, n, D), torch.randn(HKV, n, D)
    mask = torch.arange(n)[None, :] <= torch.arange(context, n)[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    calls = {"3-D, mask": lambda: F.scaled_dot_product_attention(
                 q, k, v, attn_mask=mask, enable_gqa=True),
             "4-D, mask": lambda: F.scaled_dot_product_attention(
                 q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]}
    if context == 0:
        calls["4-D, causal"] = lambda: F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
    line = [f"context {context:4d} + {q_len:4d} new:"]
    for name, fn in calls.items():
        diff = (fn() - ref).abs().max().item()
        line.append(f"{name} {ms(fn):6.1f} ms (diff {diff:.0e})")
    return "  ".join(line)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for context, q_len in ((0, 1024), (0, 256), (512, 512)):
        print(compare(context, q_len), flush=True)


if __name__ == "__main__":
    main()
