"""Triton RMSNorm, optionally fused with the residual add that precedes it.

One program normalizes one row of [T, hidden] (the whole row fits one block: hidden <= 8192
or so), so a decoder layer's `residual + x` and `norm(residual)` are one launch instead of
the five or six that eager PyTorch issues. The arithmetic follows Hugging Face's
`LlamaRMSNorm.forward` step for step, rounding where eager rounds:

    h = float32(x);  h = h * rsqrt(mean(h^2) + eps);  out = weight * h.to(x.dtype)

and the residual sum is rounded to the residual's dtype before it is normalized, as
`hidden = residual + x` would be in eager. Outputs are allocated from shapes only, and the
kernel reads nothing back to the host: both entry points are safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import pdl_launch, wait_for_previous_kernel


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # eager adds in float32 and rounds once to the residual's dtype; normalize that value
        summed = (x.to(tl.float32) + res.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, summed, mask=mask)
        h = summed.to(tl.float32)
    else:
        h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    out_ty = out_ptr.dtype.element_ty
    # HF casts the normalized row to the input dtype before the weight multiply
    normed = (h * rstd).to(out_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ty), mask=mask)


def _num_warps(block: int) -> int:
    # enough threads that each holds a few elements of the row, as Liger/unsloth size them
    return 4 if block < 2048 else 8 if block < 8192 else 16


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] as [rows, hidden] with a contiguous last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = res_out = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        res2 = _rows(residual)
        res_out = torch.empty(res2.shape, dtype=residual.dtype, device=x.device)
    rows = x2.shape[0]
    if rows > 0:
        block = triton.next_power_of_2(hidden)
        _rmsnorm_kernel[(rows,)](
            x2,
            res2 if res2 is not None else x2,  # unused without a residual
            weight if weight.is_contiguous() else weight.contiguous(),
            out,
            res_out if res_out is not None else out,
            x2.stride(0),
            res2.stride(0) if res2 is not None else 0,
            out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
            **pdl_launch(x2),
        )
    new_residual = res_out.view(residual.shape) if res_out is not None else None
    return out.view(x.shape), new_residual


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., hidden] over its last dim, as HF's `LlamaRMSNorm`; x's dtype out."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual = x + residual` (skipped when residual is None), then RMSNorm it; one launch.

    Returns `(normed, new_residual)`: normed in x's dtype, new_residual in the residual's
    dtype. With `residual=None` (the first layer) new_residual is `x` itself. The inputs are
    not modified; both outputs are new tensors of x's shape.
    """
    normed, new_residual = _launch(x, residual, weight, eps)
    return normed, x if new_residual is None else new_residual
