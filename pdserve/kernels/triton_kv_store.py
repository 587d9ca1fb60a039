"""Triton KV store: write this step's K/V into the paged cache at `slot_mapping`.

One program per new token copies its [Hkv, D] key and value rows into the cache slot
(block = slot // block_size, offset = slot % block_size); slots of -1 are padding and skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_blk,
    stride_c_tok,
    stride_c_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_P2: tl.constexpr,
    DIM_P2: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch filler)
        return
    heads = tl.arange(0, HEADS_P2)
    dims = tl.arange(0, DIM_P2)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HEAD_DIM)
    src = heads[:, None] * stride_kh + dims[None, :]
    dst = (
        (slot // PAGE) * stride_c_blk
        + (slot % PAGE) * stride_c_tok
        + heads[:, None] * stride_c_head
        + dims[None, :]
    )
    key = tl.load(k_ptr + t.to(tl.int64) * stride_kt + src, mask=mask)
    src_v = heads[:, None] * stride_vh + dims[None, :]
    value = tl.load(v_ptr + t.to(tl.int64) * stride_vt + src_v, mask=mask)
    elem = cache_ptr.dtype.element_ty
    tl.store(cache_ptr + dst, key.to(elem), mask=mask)
    tl.store(cache_ptr + stride_c_kv + dst, value.to(elem), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Write K and V ([T, Hkv, D], last dim contiguous) into `kv_cache` at `slots` ([T])."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    assert kv_cache.stride(-1) == 1, "cache rows must be contiguous"
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HEADS_P2=triton.next_power_of_2(num_heads),
        DIM_P2=triton.next_power_of_2(head_dim),
        PAGE=kv_cache.shape[2],
    )
