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

Each linear also gets a copy of its weight packed for oneDNN (`onednn_weight`, as vLLM's CPU
build does), which `layers.linear` uses for every step of two or more rows (2 padded to 3:
`layers.ONEDNN_MIN_ROWS`; one row on two or more threads); past 64 rows it hands oneDNN only
multiples of 64 rows (`layers.onednn_linear`: oneDNN caches a primitive per row count, and
a server sees every prompt length). On a 2-core AMD
EPYC (AVX2, torch 2.13, 2026-12-07; benchmarks/bench_cpu_linear_layout.py, docs/PERF.md), one
thread, weights streamed from memory, the 30 layers' linears at 1 / 2 / 4 / 8 / 64 / 512 rows
took 27 / 40 / 54 / 67 / 184 / 1213 ms K-major on MKL and 29 / 36 / 24 / 36 / 135 / 1007 ms
packed on oneDNN; the LM head 4.9 / 9.1 / 21 ms at 1 / 2 / 8 rows against 7.2 / 8.7 / 8.2. On
two threads oneDNN wins at one row too. The price is a second copy of the linear weights in
memory (`PDSERVE_CPU_ONEDNN=0` keeps only the first).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pdserve import switches
from pdserve.kernels import cpu_native
from pdserve.models.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

LINEARS = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead, nn.Linear)
ONEDNN_LINEARS = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)  # `layers.linear`'s


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 and arm64 CPU wheels do)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@torch.no_grad()
def pack_linears_onednn(model: nn.Module) -> int:
    """Give every float32 CPU linear of `model` its weight packed for oneDNN, unless
    PDSERVE_CPU_ONEDNN=0 or torch lacks it. The number packed."""
    if not (switches.SWITCHES.cpu_onednn and onednn_available()):
        return 0
    packed = 0
    for module, weight in _cpu_float32_linears(model):
        module.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        packed += 1
    return packed


@torch.no_grad()
def pack_linears_panels(model: nn.Module) -> int:
    """Give every float32 CPU linear of `model` whose outputs fill whole 32-column panels its
    weight packed for kernels/cpu_linear.c (`panel_weight`), unless PDSERVE_CPU_PANELS=0 or
    the CPU kernels are off or cannot be built. The number packed."""
    if not switches.SWITCHES.cpu_panels or cpu_native.native_kernels() is None:
        return 0
    packed = 0
    for module, weight in _cpu_float32_linears(model):
        module.panel_weight = cpu_native.pack_panels(weight)
        packed += module.panel_weight is not None
    return packed


def _cpu_float32_linears(model: nn.Module) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """(module, weight) of every linear of `model` that `layers.linear` runs with a packed
    copy: a 2-D float32 weight in host memory."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, ONEDNN_LINEARS) and weight is not None and weight.dim() == 2
                and weight.device.type == "cpu" and weight.dtype == torch.float32):
            yield module, weight


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
