"""Prompts with no cached prefix through torch's SDPA (cuDNN first): opt-in, and why.

For a fresh prompt, causal attention over its own keys is what library kernels do best. On
an H100 (2026-11-24, docs/PERF.md) cuDNN's SDPA takes 1.08 ms per layer for an 8k-token
Llama-3.1-8B prompt, flash 1.77 ms, and the whole 8k prefill step drops from 229.4 ms
(Triton) to 222.2 ms (3%). But cuDNN builds an execution plan for every new sequence
length: 62-102 ms on the first call at each length. Serving sees a new length on nearly
every request, so by default pdserve keeps its Triton prefill kernel (no per-shape cost);
`PDSERVE_PREFILL_SDPA=1` opts in where lengths repeat (fixed-length benchmarks, padding).
Chunks over a cached prefix and batches with decode rows always stay on the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve import switches

# shorter prompts: one Triton launch (attention + KV store) beats a store plus a SDPA call
SDPA_MIN_QUERY_LEN = 512


def sdpa_prefill_applies(query_lens: list[int], seq_lens: list[int]) -> bool:
    """Whether every sequence of the step is a whole fresh prompt, one of them long."""
    if not switches.SWITCHES.prefill_sdpa:
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
