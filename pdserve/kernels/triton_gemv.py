"""Triton GEMV: `F.linear(x, weight)` for a few rows of x (decode), streaming W at HBM speed.

At M <= 8 rows a linear layer is a pass over W [N, K]: the time is W's bytes over memory
bandwidth, and the arithmetic is free. Program (n, s) owns output columns
[n * BLOCK_N, (n + 1) * BLOCK_N), i.e. BLOCK_N rows of W, and walks split s's share of K in
[BLOCK_N, BLOCK_K] tiles: each W row is contiguous, so every load is a wide coalesced read.
The M rows of x (a few KB) are re-read per tile from L1/L2. Two ways to multiply:

- FMA (the default at M = 1): products accumulate elementwise in a [BLOCK_M, BLOCK_N,
  BLOCK_K] float32 register tile and are reduced across threads once, after the loop;
- tl.dot (the default from M = 2): x is padded to 16 rows, the tensor-core tile's minimum.

Where the column blocks are too few to fill the SMs (tl.dot's 64-column tiles on N = 4096:
64 blocks for 132 SMs), K is split over SPLIT_K programs per column block. Each writes its
float32 partial to a workspace and bumps a per-block counter; the last to arrive adds the
SPLIT_K partials in split order (the same order whoever arrives last, so results are
deterministic), writes the output and resets the counter to zero for the next launch. That
is one launch, where cuBLAS's split-K adds a reduce kernel and fp32 atomics would add a
memset and a cast kernel and make sums arrival-ordered.

The grid depends on shapes only, nothing is read back to the host, and the only persistent
state (the counters) is allocated once per device: safe to capture in a CUDA graph. Two
split-K launches on one device must not run concurrently on different streams (they would
share counters); a decode step runs on one stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import pdl_launch, wait_for_previous_kernel

MAX_ROWS = 16  # the tl.dot tile's height; more rows are a GEMM, not a GEMV
MAX_COUNTERS = 1 << 16  # column blocks a split-K launch may have (split-K is for narrow N)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters; `default_config` picks them, the benchmark sweeps them."""

    block_n: int  # output columns (rows of W) per program
    block_k: int  # K elements per tile
    split_k: int = 1  # programs per column block, each summing a 1/split_k share of K
    num_warps: int = 4
    use_dot: bool = False  # tensor cores on x padded to 16 rows, instead of FMAs
    num_stages: int = 3


@triton.jit
def weight_rows(w_ptr, pid_n, N, stride_wn, BLOCK_N: tl.constexpr):
    """Program `pid_n`'s output columns and pointers to their rows of W [N, K]. Rows past N
    are clamped to the last one: every load is in bounds, so the W stream carries no row
    mask (the stores mask those columns)."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return cols, w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * stride_wn


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, k_per_split, split_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols, w_rows = weight_rows(w_ptr, pid_n, N, stride_wn, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # clamped rows of x too: every load is in bounds
    x_rows = x_ptr + tl.minimum(rows, M - 1)[:, None] * stride_xm
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        if EVEN_K:
            x = tl.load(x_rows + ks[None, :] * stride_xk)
            w = tl.load(w_rows + ks[None, :] * stride_wk)
        else:
            k_ok = (ks < k_end)[None, :]
            x = tl.load(x_rows + ks[None, :] * stride_xk, mask=k_ok, other=0.0)
            w = tl.load(w_rows + ks[None, :] * stride_wk, mask=k_ok, other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if USE_DOT:
        total = acc
    else:
        total = tl.sum(acc, axis=2)
    out_ok = (rows < M)[:, None] & (cols < N)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if SPLIT:
        parts = partial_ptr + rows[:, None] * N + cols[None, :]  # [split_k, M, N] float32
        tl.store(parts + pid_k * M * N, total, mask=out_ok)
        tl.debug_barrier()  # all threads' partials are stored before thread 0 signals
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:  # the last of this column block sums them, in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(split_k):
                part = tl.load(parts + s * M * N, mask=out_ok, other=0.0, cache_modifier=".cg")
                total += part
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_ok)


@cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any number; an H100's keeps CPU tests on GPU configs
    return torch.cuda.get_device_properties(device).multi_processor_count


_counters: dict[torch.device, torch.Tensor] = {}


def counters_for(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters, one per column block; each launch leaves them zero again."""
    if device not in _counters:  # allocated once and never freed: graphs keep its address
        _counters[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


def auto_split(blocks: int, k: int, block_k: int, sms: int) -> int:
    """The most splits of K whose grid still fits one wave of SMs, each split >= 4 tiles.

    Few, fat column blocks (tl.dot tiles on N = 4096) leave SMs idle without a split; a
    grid past one wave gains nothing from splitting and pays for the partial sums.
    """
    split = 1
    while blocks * split * 2 <= sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int = 132) -> GemvConfig:
    """The config for x [m, k] @ W[n, k]^T, from a sweep of Llama-3.1-8B's shapes on an H100.

    One row: FMA over [2, 1024] bf16 tiles (2 KB of each W row a tile, thousands of
    programs). More rows: tl.dot on 64-column tiles, split over K where that fills the SMs,
    with longer K tiles where there are blocks for more than one wave (gate_up, LM head).
    """
    if m == 1:
        return GemvConfig(block_n=2, block_k=2048 // dtype.itemsize, num_warps=4)
    blocks = triton.cdiv(n, 64)
    block_k = 512 if blocks >= sms else 256
    split_k = auto_split(blocks, k, block_k, sms)
    return GemvConfig(64, block_k, split_k, num_warps=4, use_dot=True)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in _DTYPES:
        raise TypeError(f"gemv takes fp16/bf16/fp32 of one dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) for x [..., K] of at most MAX_ROWS rows; x's dtype out.

    Accumulates in float32. Any strides are accepted (a unit K stride is what makes it fast).
    """
    _check(x, weight)
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, k)
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}: use F.linear")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    if k == 0:
        return out.zero_().view(*x.shape[:-1], n)
    cfg = config or default_config(m, n, k, x.dtype, _sm_count(x.device))
    if cfg.use_dot and min(cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"tl.dot needs block_n and block_k >= 16: {cfg}")
    block_m = max(16, triton.next_power_of_2(m)) if cfg.use_dot else triton.next_power_of_2(m)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    blocks = triton.cdiv(n, cfg.block_n)
    if split_k > 1:
        if blocks > MAX_COUNTERS:
            raise ValueError(f"split-K over {blocks} column blocks: raise block_n or split_k=1")
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = counters_for(x.device)
    else:
        partial = counters = out  # unused
    _gemv_kernel[(blocks, split_k)](
        x2, weight, out, partial, counters,
        m, n, k, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        k_per_split, split_k,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, USE_DOT=cfg.use_dot, SPLIT=split_k > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x),
    )  # fmt: skip
    return out.view(*x.shape[:-1], n)
