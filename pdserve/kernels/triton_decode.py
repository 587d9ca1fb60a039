"""Triton decode attention over the paged cache: split-KV (flash-decoding) plus a reduction.

Stage 1 runs one program per (sequence, KV head, split). The query heads that share a KV
head are one small [group, D] matrix, so every K/V tile is loaded once for the whole group
and scored with `tl.dot`. Each split walks its slice of the sequence's pages and leaves a
partial output and its log-sum-exp (base 2) in scratch. Stage 2 merges the splits.

The grid is (num_seqs, num_kv_heads, num_splits), where num_splits depends only on the batch
size and the device, never on sequence lengths: a decode step can be captured in a CUDA
graph and replayed with new lengths. Sequences whose query length is not 1 are skipped, so
the same launch serves the decode part of a mixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention import AttentionMetadata
from pdserve.kernels.pdl import pdl_launch, wait_for_previous_kernel

MAX_SPLITS = 32  # bounds scratch; past this the reduction and empty splits cost more than they save


@triton.jit
def _attend_new_token(
    q, acc, m_i, l_i, k_ptr, v_ptr, slot_ptr, cache_ptr, q_row, kv_head, dims, dim_ok,
    scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head, PAGE: tl.constexpr,
):  # fmt: skip
    """Attend to this step's own key/value (read from k/v) and store them in the cache."""
    row = q_row.to(tl.int64)
    k_new = tl.load(k_ptr + row * stride_kt + kv_head * stride_kh + dims, mask=dim_ok, other=0.0)
    v_new = tl.load(v_ptr + row * stride_vt + kv_head * stride_vh + dims, mask=dim_ok, other=0.0)
    k_new = k_new.to(cache_ptr.dtype.element_ty)  # the values attended are those cached
    v_new = v_new.to(cache_ptr.dtype.element_ty)
    score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
    m_new = tl.maximum(m_i, score)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(score - m_new)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
    slot = tl.load(slot_ptr + row)
    if slot >= 0:
        dst = (slot // PAGE) * stride_c_blk + (slot % PAGE) * stride_c_tok
        dst += kv_head * stride_c_head + dims
        tl.store(cache_ptr + dst, k_new, mask=dim_ok)
        tl.store(cache_ptr + stride_c_kv + dst, v_new, mask=dim_ok)
    return acc, m_new, l_i


@triton.jit
def _decode_split_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_blk,
    stride_c_tok,
    stride_c_head,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FUSED_STORE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) - q_row != 1:  # not a decode sequence
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # splits are whole tiles, so only the sequence's last tile needs a length mask
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    # with the store fused in, the new token comes from k/v, not from the cache
    cached_end = tl.minimum(end, seq_len - 1) if FUSED_STORE else end

    rows = tl.arange(0, GROUP_P2)
    dims = tl.arange(0, DIM_P2)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q_offs = q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, DIM_P2], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(start, cached_end, BLOCK_N):
        toks = tile + tl.arange(0, BLOCK_N)
        tok_ok = toks < cached_end
        blocks = tl.load(table + toks // PAGE, mask=tok_ok, other=0).to(tl.int64)
        base = blocks * stride_c_blk + (toks % PAGE) * stride_c_tok + kv_head * stride_c_head
        kv_offs = base[:, None] + dims[None, :]
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        k = tl.load(cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        scores = tl.where(tok_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + stride_c_kv + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if FUSED_STORE:
        if (start < end) & (end == seq_len):  # this split holds the new token
            acc, m_i, l_i = _attend_new_token(
                q, acc, m_i, l_i, k_ptr, v_ptr, slot_ptr, cache_ptr, q_row, kv_head, dims, dim_ok,
                scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head, PAGE,
            )  # fmt: skip

    out_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:  # nothing to merge: write the final output directly
        o = acc / l_i[:, None]
        o_offs = q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        has_keys = l_i > 0  # an empty split (short sequence) reports lse = -inf
        o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        p_base = seq.to(tl.int64) * stride_pb + split * stride_ps
        p_offs = p_base + heads[:, None] * stride_ph + dims[None, :]
        tl.store(part_out_ptr + p_offs, o, mask=out_mask)
        lse_offs = seq.to(tl.int64) * stride_lb + heads * stride_lh + split
        tl.store(part_lse_ptr + lse_offs, lse, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    query_start_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) - q_row != 1:
        return
    splits = tl.arange(0, SPLITS_P2)
    dims = tl.arange(0, DIM_P2)
    split_ok = splits < NUM_SPLITS
    lse_base = seq.to(tl.int64) * stride_lb + head * stride_lh
    lse = tl.load(part_lse_ptr + lse_base + splits, mask=split_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = tl.where(lse > float("-inf"), weight, 0.0)  # empty splits hold no keys
    p_offs = seq.to(tl.int64) * stride_pb + head * stride_ph
    p_offs = p_offs + splits[:, None] * stride_ps + dims[None, :]
    p_mask = split_ok[:, None] & (dims[None, :] < HEAD_DIM)
    parts = tl.load(part_out_ptr + p_offs, mask=p_mask, other=0.0)
    o = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    o_offs = q_row.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@dataclass
class DecodeScratch:
    """Preallocated split-KV partials: out [B, Hq, S, D] and lse [B, Hq, S], float32.

    Allocate once for the largest batch and MAX_SPLITS (e.g. before CUDA-graph capture).
    """

    out: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def allocate(
        cls, max_seqs: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device
    ) -> DecodeScratch:
        shape = (max_seqs, num_heads, num_splits)
        out = torch.empty(*shape, head_dim, dtype=torch.float32, device=device)
        return cls(out=out, lse=torch.empty(shape, dtype=torch.float32, device=device))

    def fits(self, num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> bool:
        # kernels index by strides, so one buffer sized (max batch, MAX_SPLITS) serves every step
        b, h, s, d = self.out.shape
        return b >= num_seqs and h == num_heads and s >= num_splits and d == head_dim


@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape and launch settings of the split kernel."""

    block_n: int = 64  # KV tokens per loop step (spans several pages)
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: few programs keep CPU tests fast
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits_for(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence: enough programs for ~4 waves of the SMs, a function of batch only."""
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(4 * _num_sms(device), programs)
    return min(MAX_SPLITS, triton.next_power_of_2(want)) if want > 1 else 1


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    scratch: DecodeScratch | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Attention of every query-length-1 sequence over the cache, written into `out` [T, Hq, D].

    Without `new_kv`, this step's K/V must already be in the cache. With `new_kv` = (k, v)
    ([T, Hkv, D]), the kernel stores them at `meta.slot_mapping` itself (one launch fewer).
    Other sequences of the batch are left untouched.
    """
    num_seqs = meta.query_start_loc.shape[0] - 1
    _, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = num_splits_for(num_seqs, num_kv_heads, q.device)
    fits = scratch is not None and scratch.fits(num_seqs, num_heads, head_dim, num_splits)
    if num_splits > 1 and not fits:
        scratch = DecodeScratch.allocate(num_seqs, num_heads, head_dim, num_splits, q.device)
    part_out = scratch.out if num_splits > 1 else out  # unused when there is a single split
    part_lse = scratch.lse if num_splits > 1 else out
    split_strides = (*part_out.stride()[:3], *part_lse.stride()[:2]) if num_splits > 1 else (0,) * 5
    cfg = config or DecodeConfig()
    k, v = new_kv if new_kv is not None else (q, q)  # unused without the fused store
    k_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        kv_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        out,
        part_out,
        part_lse,
        k,
        v,
        meta.slot_mapping,
        scale * 1.4426950408889634,  # exp(x) = exp2(x * log2(e))
        q.stride(0),
        q.stride(1),
        *k_strides,
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        meta.block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *split_strides,
        GROUP=group,
        GROUP_P2=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        DIM_P2=triton.next_power_of_2(head_dim),
        PAGE=kv_cache.shape[2],
        BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits,
        FUSED_STORE=new_kv is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages if q.is_cuda else 1,
        **pdl_launch(q),
    )
    if num_splits == 1:
        return
    _decode_reduce_kernel[(num_seqs, num_heads)](
        part_out,
        part_lse,
        meta.query_start_loc,
        out,
        *split_strides,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        DIM_P2=triton.next_power_of_2(head_dim),
        NUM_SPLITS=num_splits,
        SPLITS_P2=triton.next_power_of_2(num_splits),
        num_warps=4,
        **pdl_launch(q),
    )
