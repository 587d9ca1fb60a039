"""One-row GEMVs with the RMSNorm before them or the SwiGLU after them fused into the K loop.

At batch-1 decode a decoder layer's two RMSNorms (with their residual adds) and its
silu(gate) * up are tiny kernels whose time is mostly the launch gap inside the CUDA graph.
Each feeds a linear of one row, and triton_gemv's one-row path already re-reads x per
[BLOCK_N, BLOCK_K] tile of W from L1/L2; these kernels read the vectors that x is made from
instead, and make x on the fly. The scheme is the GEMV's FMA path (program n owns BLOCK_N
rows of W, float32 products reduced once after the loop, split_k = 1 only) on a 2-D tile:
with 4 warps the K vector broadcasts over W's rows in registers, where the GEMV's 3-D
[M, N, K] tile goes through shared memory every tile (seen in the PTX for sm_90).

- `add_rmsnorm_gemv`: h = x + residual (rounded to the residual's dtype, as the eager add and
  triton_rmsnorm round the residual stream), and the K loop accumulates sum_k(h_k g_k w_nk)
  and sum_k(h_k^2); the end multiplies by rstd = rsqrt(mean(h^2) + eps). Exact arithmetic
  gives F.linear(rmsnorm(h) * g, W); this skips HF's two roundings to the model dtype
  (h * rstd, then g * that), so at bf16 it differs from the unfused path by about one bf16
  step of the output's typical size, and is the closer to float64. Every program sums the
  same squares in the same order, so all agree on rstd; column block 0 alone writes h to a
  new buffer (the other programs still read the old residual).
- `silu_mul_gemv`: a_k = silu(gate_k) * up_k, rounded as triton_activation.silu_and_mul rounds
  (silu to the dtype, then the product): the GEMV's input is bit for bit the unfused one.

The vector work of a tile (2 or 3 vector loads, the add or the silu) is amortized over
BLOCK_N rows of W, so wider tiles than the GEMV's may pay: `benchmarks/bench_gemv.py --fused`
sweeps them. Grids depend on shapes only and nothing is read back to the host: both entry
points are safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import pdl_launch, wait_for_previous_kernel
from pdserve.kernels.triton_gemv import GemvConfig, _check, weight_rows


@triton.jit
def _load_k(ptrs, k_ok, EVEN_K: tl.constexpr):
    if EVEN_K:  # no mask on the W stream where K is a multiple of BLOCK_K
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=k_ok, other=0.0)


@triton.jit
def _add_rmsnorm_gemv_kernel(
    x_ptr, res_ptr, g_ptr, w_ptr, out_ptr, res_out_ptr,
    N, K, stride_x, stride_res, stride_g, stride_wn, stride_wk, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    cols, w_rows = weight_rows(w_ptr, pid_n, N, stride_wn, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        h = _load_k(x_ptr + ks * stride_x, k_ok, EVEN_K).to(tl.float32)
        if HAS_RESIDUAL:
            res = _load_k(res_ptr + ks * stride_res, k_ok, EVEN_K).to(tl.float32)
            # eager adds in float32 and rounds once to the residual's dtype
            summed = (h + res).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + ks, summed, mask=k_ok & (pid_n == 0))
            h = summed.to(tl.float32)
        g = _load_k(g_ptr + ks * stride_g, k_ok, EVEN_K).to(tl.float32)
        w = _load_k(w_rows + ks[None, :] * stride_wk, k_ok[None, :], EVEN_K)
        squares += h * h
        acc += (h * g)[None, :] * w.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    total = tl.sum(acc, axis=1) * rstd
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _silu_mul_gemv_kernel(
    gate_up_ptr, w_ptr, out_ptr, N, K, stride_gu, stride_wn, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    cols, w_rows = weight_rows(w_ptr, pid_n, N, stride_wn, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    ty = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        gate = _load_k(gate_up_ptr + ks * stride_gu, k_ok, EVEN_K).to(tl.float32)
        up = _load_k(gate_up_ptr + (K + ks) * stride_gu, k_ok, EVEN_K).to(tl.float32)
        w = _load_k(w_rows + ks[None, :] * stride_wk, k_ok[None, :], EVEN_K)
        # silu_and_mul's arithmetic and roundings: the same input as the unfused GEMV
        act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
        a = (act * up).to(ty).to(tl.float32)
        acc += a[None, :] * w.to(tl.float32)
    total = tl.sum(acc, axis=1)
    tl.store(out_ptr + cols, total.to(ty), mask=cols < N)


def fused_default_config(dtype: torch.dtype, block_n: int = 8) -> GemvConfig:
    """2 KB-wide K tiles, 4 warps. Rows per program from `bench_gemv.py --fused` on an H100
    (2026-11-24): 8 for the norm (qkv 21.4 us, gate_up 79.7) and 4 for the SwiGLU (down
    43.4); the GEMV's 2 rows re-read the 2 or 3 vectors too often (23.2, 81.6, 50.3 us)."""
    return GemvConfig(block_n=block_n, block_k=2048 // dtype.itemsize, num_warps=4)


def _vector(t: torch.Tensor, name: str) -> torch.Tensor:
    """One row [..., K] (leading dims all 1) as a 1-D view, or a copy if no view exists."""
    if t.numel() != t.shape[-1]:
        raise ValueError(f"{name} must be one row, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[-1])


def _launch_config(config: GemvConfig | None, dtype: torch.dtype, block_n: int) -> GemvConfig:
    cfg = config or fused_default_config(dtype, block_n)
    if cfg.split_k != 1 or cfg.use_dot:
        raise ValueError(f"the fused GEMVs are FMA with split_k=1 only: {cfg}")
    return cfg


def add_rmsnorm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`F.linear(rmsnorm(h) * norm_weight, weight)` with h = x + residual, for one row of x.

    Returns `(out, new_residual)`: out [..., N] in x's dtype; new_residual is h in a new
    tensor (x itself when residual is None), as `fused_add_rmsnorm` returns it. The inputs
    are not modified.
    """
    _check(x, weight)
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"empty weight {tuple(weight.shape)}")
    if norm_weight.shape != (k,):
        raise ValueError(f"norm weight {tuple(norm_weight.shape)} does not match K = {k}")
    x1 = _vector(x, "x")
    res1 = res_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {residual.shape} {residual.dtype} != x {x.shape} {x.dtype}")
        res1 = _vector(residual, "residual")
        res_out = torch.empty(k, dtype=residual.dtype, device=x.device)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    cfg = _launch_config(config, x.dtype, block_n=8)
    _add_rmsnorm_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x1, res1 if res1 is not None else x1, norm_weight, weight, out,
        res_out if res_out is not None else out,  # unused without a residual
        n, k, x1.stride(0), res1.stride(0) if res1 is not None else 0, norm_weight.stride(0),
        weight.stride(0), weight.stride(1), eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_launch(x),
    )  # fmt: skip
    new_residual = x if res_out is None else res_out.view(x.shape)
    return out.view(*x.shape[:-1], n), new_residual


def silu_mul_gemv(
    gate_up: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None
) -> torch.Tensor:
    """`F.linear(silu(gate) * up, weight)` for one row gate_up [..., 2 * K] (gate first)."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"gate_up width {width} is odd: expected gate and up halves")
    _check(gate_up[..., : width // 2], weight)
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"empty weight {tuple(weight.shape)}")
    gu1 = _vector(gate_up, "gate_up")
    out = torch.empty(n, dtype=gate_up.dtype, device=gate_up.device)
    cfg = _launch_config(config, gate_up.dtype, block_n=4)
    _silu_mul_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        gu1, weight, out, n, k, gu1.stride(0), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(gate_up),
    )  # fmt: skip
    return out.view(*gate_up.shape[:-1], n)
