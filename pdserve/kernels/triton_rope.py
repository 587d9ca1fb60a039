"""Triton rotary position embedding (neox / rotate-half style, as HF Llama), in place on q and k.

For head dim D and half = D/2, element i < half pairs with element i + half:

    out[i]        = x[i] * cos[i] - x[i + half] * sin[i]
    out[i + half] = x[i + half] * cos[i] + x[i] * sin[i]

which is HF's `x * cos + rotate_half(x) * sin` with `cos = cat(cos_half, cos_half)`.

cos and sin come from one precomputed cache [max_positions, D]: columns [0, half) hold
cos(p * inv_freq) and columns [half, D) hold sin(p * inv_freq) (vLLM's layout); build it once
with `rope_cos_sin_cache`. Each product and the sum are rounded to q's / k's dtype as eager
PyTorch rounds them, so a cache in the model's dtype gives HF's numbers; a float32 cache
skips HF's rounding of cos/sin and is slightly more accurate.

One launch rotates both q [T, Hq, D] and k [T, Hkv, D]: program (t, b) takes block b of
HEAD_BLOCK heads of token t, q's blocks first, then k's. Nothing is allocated and nothing is
read back to the host, so it can be captured in a CUDA graph. Positions are not bounds-checked
(that would need a sync): they must lie in [0, max_positions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import pdl_launch, wait_for_previous_kernel


@triton.jit
def _rotate_heads(
    x_ptr, stride_t, stride_h, tok, head0, num_heads, cos, sin,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, HEAD_BLOCK: tl.constexpr,
):  # fmt: skip
    """Rotate heads [head0, head0 + HEAD_BLOCK) of token `tok` in place."""
    heads = head0 + tl.arange(0, HEAD_BLOCK)
    dims = tl.arange(0, HALF_P2)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    first = x_ptr + tok * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    ty = x_ptr.dtype.element_ty
    # eager rounds x*cos, rotate_half(x)*sin and their sum to x's dtype, one op at a time
    out1 = (x1 * cos).to(ty).to(tl.float32) - (x2 * sin).to(ty).to(tl.float32)
    out2 = (x2 * cos).to(ty).to(tl.float32) + (x1 * sin).to(ty).to(tl.float32)
    tl.store(first, out1.to(ty), mask=mask)
    tl.store(first + HALF, out2.to(ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, HEAD_BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous_kernel(PDL)
    tok = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, HEAD_BLOCK)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF_P2)
    row = cache_ptr + pos * stride_cache + dims
    cos = tl.load(row, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    if block < q_blocks:
        _rotate_heads(
            q_ptr, stride_qt, stride_qh, tok, block * HEAD_BLOCK, num_q_heads, cos, sin,
            HALF, HALF_P2, HEAD_BLOCK,
        )  # fmt: skip
    else:
        _rotate_heads(
            k_ptr, stride_kt, stride_kh, tok, (block - q_blocks) * HEAD_BLOCK, num_k_heads,
            cos, sin, HALF, HALF_P2, HEAD_BLOCK,
        )  # fmt: skip


def _head_block(half_p2: int, max_heads: int) -> int:
    # about 512 elements a program: enough work per program, and many programs at batch 1
    return max(1, min(256 // half_p2, triton.next_power_of_2(max_heads)))


def apply_rope_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by `positions` [T] (one launch).

    q and k may be strided views (e.g. slices of the packed qkv projection) as long as the
    head dim is contiguous. `cos_sin_cache` is [max_positions, D]: cos then sin, see
    `rope_cos_sin_cache`.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions do not agree")
    if head_dim % 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos/sin cache {tuple(cos_sin_cache.shape)} is not for head dim {head_dim}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and the cos/sin cache need a contiguous last dim")
    if num_tokens == 0:
        return
    num_k_heads = k.shape[1]
    half = head_dim // 2
    half_p2 = triton.next_power_of_2(half)
    head_block = _head_block(half_p2, max(num_q_heads, num_k_heads))
    blocks = triton.cdiv(num_q_heads, head_block) + triton.cdiv(num_k_heads, head_block)
    _rope_kernel[(num_tokens, blocks)](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        HALF=half,
        HALF_P2=half_p2,
        HEAD_BLOCK=head_block,
        num_warps=4,
        **pdl_launch(q),
    )
