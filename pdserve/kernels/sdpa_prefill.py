"""Prompts with no cached prefix through torch's SDPA (cuDNN or flash attention on Hopper).

For a fresh prompt, causal attention over its own keys is exactly what the library kernels
do best: on an H100, cuDNN's SDPA runs an 8k-token causal prefill at 1.30x its FLOP floor
against 1.89x for our Triton prefill kernel (benchmarks/results/attention_h100.json). Chunks
over a cached prefix, and batches with decode rows, stay on the Triton kernels, which read the
paged cache directly.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# shorter prompts: one Triton launch (attention + KV store) beats a store plus a SDPA call
# per sequence; `PDSERVE_PREFILL_SDPA=0` turns the path off (for comparisons)
SDPA_MIN_QUERY_LEN = 512


def sdpa_prefill_applies(query_lens: list[int], seq_lens: list[int]) -> bool:
    """Whether every sequence of the step is a whole fresh prompt, one of them long."""
    if os.environ.get("PDSERVE_PREFILL_SDPA", "1") == "0":
        return False
    return max(query_lens, default=0) >= SDPA_MIN_QUERY_LEN and query_lens == seq_lens


def sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: list[int],
                 scale: float, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of each fresh prompt over itself; q [T, Hq, D], k/v [T, Hkv, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    start = 0
    with sdpa_kernel(backends, set_priority=True):
        for q_len in query_lens:
            end = start + q_len
            # [L, H, D] -> [1, H, L, D] views; K/V repeated to the query heads (GQA)
            qi = q[start:end].transpose(0, 1)[None]
            ki = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)[None]
            vi = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
            out[start:end] = o[0].transpose(0, 1)
            start = end
    return out
