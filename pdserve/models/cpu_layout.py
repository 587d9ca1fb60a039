"""On CPU, linear weights are stored K-major (each column of W[N, K] contiguous): faster GEMMs.

MKL's single-thread fp32 GEMM of `F.linear(x, W)` is faster when W[N, K] is the transposed
view of a contiguous [K, N] tensor (`x @ Wt`, no transpose in the kernel): the 30 layers of
SmolLM2-135M's linears, weights streamed from memory, take 32.7 / 71.5 / 120 ms at 1 / 8 / 64
rows in the usual layout and 28.9 / 62.0 / 93.0 ms K-major, its 49152-row LM head 8.4 / 26.6 /
42.0 ms against 7.0 / 17.8 / 36.8 ms (benchmarks/bench_cpu_linear_layout.py, this 2-core Xeon,
AVX-512, MKL 2024.2, 2026-12-06; docs/PERF.md). Same values up to float rounding; the GPU
keeps the usual layout (cuBLAS and our GEMV read it as it is). A tied embedding table shares
the LM head's storage: gathering rows from it gets slower (1024 tokens: 8.6 ms against
0.4 ms), which a prefill of that many tokens (about 1.7 s here) does not notice.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.models.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

LINEARS = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead, nn.Linear)


@torch.no_grad()
def store_linears_k_major(model: nn.Module) -> int:
    """Re-store every linear weight of `model` as the transposed view of a contiguous
    [K, N] tensor, once (a tied weight is one Parameter). The number re-stored."""
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, LINEARS) or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        if weight.dim() == 2 and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()
    return len(seen)
