"""Triton prefill attention: variable-length query chunks over the paged cache, causal.

Flash-attention style: each program owns one tile of query rows of one sequence and one KV
head, and streams keys/values in tiles with an online softmax. The tile's rows are (query
token, query head of the group) pairs, so the GQA heads sharing a KV head reuse every K/V
tile load. Earlier tokens of the sequence (chunked prefill, prefix-cache hits) are read from
the paged cache; this step's own tokens straight from k/v (contiguous, and no dependency on
a store launch). Each program also stores its own tokens' K/V for its KV head.

Query tiles are numbered per batch without a host-built table: sequence i owns the tiles
starting at query_start_loc[i] // BLOCK_Q + i, and a program finds its sequence by binary
search. The grid is (num_tokens // BLOCK_Q + num_seqs, num_kv_heads), an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention import AttentionMetadata


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence i whose first tile (query_start_loc[i] // BLOCK_Q + i) is <= tile."""
    lo: tl.int32 = 0  # typed, so the loop carries tensors even when num_seqs is specialised to 1
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        below = first_tile <= tile
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo - 1


@triton.jit
def _softmax_step(q, acc, m_i, l_i, k, v, visible, scale_log2, MASKED: tl.constexpr):
    """One online-softmax step over a K/V tile; with MASKED, keys outside `visible` are skipped."""
    scores = tl.dot(q, tl.trans(k)) * scale_log2
    if MASKED:
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    if MASKED:  # a row may have seen no key yet; unmasked tiles always give every row one
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_safe = m_new
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _cache_tile(
    cache_ptr, table, tile, limit, kv_head, dims, dim_ok,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Cached keys/values of positions tile .. tile + BLOCK_N (zeros from `limit` on)."""
    toks = tile + tl.arange(0, BLOCK_N)
    ok = toks < limit
    blocks = tl.load(table + toks // PAGE, mask=ok, other=0).to(tl.int64)
    base = blocks * stride_c_blk + (toks % PAGE) * stride_c_tok + kv_head * stride_c_head
    offs = base[:, None] + dims[None, :]
    mask = ok[:, None] & dim_ok[None, :]
    k = tl.load(cache_ptr + offs, mask=mask, other=0.0)
    v = tl.load(cache_ptr + stride_c_kv + offs, mask=mask, other=0.0)
    return k, v, toks


@triton.jit
def _new_tile(
    k_ptr, v_ptr, q_start, first, q_len, kv_head, dims, dim_ok,
    stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N: tl.constexpr, CACHE_DTYPE: tl.constexpr,
):  # fmt: skip
    """This step's keys/values of chunk offsets first .. first + BLOCK_N, read from k/v."""
    idx = first + tl.arange(0, BLOCK_N)
    rows = (q_start + idx).to(tl.int64)
    mask = (idx < q_len)[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + rows[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + rows[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=mask)
    # attend to exactly the values a later step will read back from the cache
    return k.to(CACHE_DTYPE), v.to(CACHE_DTYPE), idx


@triton.jit
def _store_new_rows(
    k_ptr, v_ptr, slot_ptr, cache_ptr, q_start, first, count, q_len, kv_head, dims, dim_ok,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Write chunk offsets first .. first + count of this KV head into the cache (slot -1: skip)."""
    lane = tl.arange(0, BLOCK_M)
    idx = first + lane
    rows = (q_start + idx).to(tl.int64)
    slots = tl.load(slot_ptr + rows, mask=(lane < count) & (idx < q_len), other=-1)
    mask = (slots >= 0)[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + rows[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + rows[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=mask)
    dst = (slots // PAGE) * stride_c_blk + (slots % PAGE) * stride_c_tok + kv_head * stride_c_head
    offs = dst[:, None] + dims[None, :]
    elem = cache_ptr.dtype.element_ty
    tl.store(cache_ptr + offs, k.to(elem), mask=mask)
    tl.store(cache_ptr + stride_c_kv + offs, v.to(elem), mask=mask)


# num_seqs changes every step: specializing on it (== 1, multiple of 16) would compile new
# variants while serving, a stall of a second or more on the first step of each kind
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    scale_log2,
    num_seqs,
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
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SKIP_DECODE: tl.constexpr,
):
    # last tiles first: they see the most keys, so the longest programs start earliest
    tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, num_seqs, tile_id, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    q_tile = tile_id - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:  # spare program of the upper-bound grid
        return
    if SKIP_DECODE and q_len == 1:  # the decode kernel owns it
        return
    context = tl.load(seq_lens_ptr + seq) - q_len
    dims = tl.arange(0, DIM_P2)
    dim_ok = dims < HEAD_DIM
    first_new = q_tile * BLOCK_Q  # chunk offset of this tile's first query
    _store_new_rows(
        k_ptr, v_ptr, slot_ptr, cache_ptr, q_start, first_new, BLOCK_Q, q_len, kv_head, dims,
        dim_ok, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head, PAGE, BLOCK_M,
    )  # fmt: skip

    rows = tl.arange(0, BLOCK_M)
    q_tok = first_new + rows // GROUP  # row = (query token, head of the group)
    row_ok = (rows < BLOCK_Q * GROUP) & (q_tok < q_len)
    heads = kv_head * GROUP + rows % GROUP
    tok_rows = (q_start + q_tok).to(tl.int64)
    q_offs = tok_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], dtype=tl.float32)
    # 1) the cached prefix, positions 0 .. context: every row sees all of it
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    context_full = (context // BLOCK_N) * BLOCK_N
    for tile in range(0, context_full, BLOCK_N):
        k, v, _ = _cache_tile(
            cache_ptr, table, tile, context, kv_head, dims, dim_ok,
            stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head, PAGE, BLOCK_N,
        )  # fmt: skip
        acc, m_i, l_i = _softmax_step(q, acc, m_i, l_i, k.to(q.dtype), v.to(q.dtype), None,
                                      scale_log2, False)  # fmt: skip
    if context_full < context:
        k, v, toks = _cache_tile(
            cache_ptr, table, context_full, context, kv_head, dims, dim_ok,
            stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head, PAGE, BLOCK_N,
        )  # fmt: skip
        visible = (toks < context)[None, :] & (rows >= 0)[:, None]
        acc, m_i, l_i = _softmax_step(q, acc, m_i, l_i, k.to(q.dtype), v.to(q.dtype), visible,
                                      scale_log2, True)  # fmt: skip
    # 2) this step's tokens, read from k/v: causal within the chunk
    new_full = (first_new // BLOCK_N) * BLOCK_N  # chunk offsets every row of the tile sees
    new_end = tl.minimum(q_len, first_new + BLOCK_Q)
    for first in range(0, new_full, BLOCK_N):
        k, v, _ = _new_tile(
            k_ptr, v_ptr, q_start, first, q_len, kv_head, dims, dim_ok,
            stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N, cache_ptr.dtype.element_ty,
        )  # fmt: skip
        acc, m_i, l_i = _softmax_step(q, acc, m_i, l_i, k.to(q.dtype), v.to(q.dtype), None,
                                      scale_log2, False)  # fmt: skip
    for first in range(new_full, new_end, BLOCK_N):
        k, v, idx = _new_tile(
            k_ptr, v_ptr, q_start, first, q_len, kv_head, dims, dim_ok,
            stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N, cache_ptr.dtype.element_ty,
        )  # fmt: skip
        visible = idx[None, :] <= q_tok[:, None]
        acc, m_i, l_i = _softmax_step(q, acc, m_i, l_i, k.to(q.dtype), v.to(q.dtype), visible,
                                      scale_log2, True)  # fmt: skip

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_offs = tok_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=q_mask)


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and launch settings of the prefill kernel."""

    block_m: int  # query rows (tokens x group heads) per program
    block_n: int  # KV tokens per loop step
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, group: int, device: torch.device) -> PrefillConfig:
    """Tiles that suit the device: large on a GPU, small under the CPU interpreter."""
    if device.type != "cuda":
        return PrefillConfig(block_m=max(16, triton.next_power_of_2(group)), block_n=16,
                             num_warps=4, num_stages=1)  # fmt: skip
    # fastest of 9 tiles on an H100, Llama-3.1-8B shapes (benchmarks/results/attention_h100.json):
    # 420 TFLOP/s on an 8k prompt, 322 on a 2k chunk over a 6k prefix
    return PrefillConfig(block_m=128, block_n=32, num_warps=4, num_stages=3)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    skip_decode: bool = False,
    config: PrefillConfig | None = None,
) -> None:
    """Causal attention of every sequence's new tokens (q, k, v: [T, H, D]) into `out`.

    Earlier tokens come from the cache; this step's K/V come from `k`/`v`, and the kernel
    stores them at `meta.slot_mapping` (no separate store launch). With `skip_decode`,
    sequences of query length 1 are left (attention and store) to the decode kernel.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = meta.query_start_loc.shape[0] - 1
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    cfg = config or prefill_config(head_dim, group, q.device)
    block_m = max(cfg.block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q,
        k,
        v,
        meta.slot_mapping,
        kv_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        out,
        scale * 1.4426950408889634,  # exp(x) = exp2(x * log2(e))
        num_seqs,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        meta.block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        DIM_P2=triton.next_power_of_2(head_dim),
        PAGE=kv_cache.shape[2],
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=cfg.block_n,
        SKIP_DECODE=skip_decode,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
