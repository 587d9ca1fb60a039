"""The CPU attention path: decodes attended in one batched call give what each sequence
attended alone gives, beside prefill chunks in the same step (GQA, ragged lengths)."""

from __future__ import annotations

import torch

from pdserve.kernels.attention import build_metadata, torch_paged_attention

BLOCK, HQ, HKV, DIM = 4, 6, 2, 8
QUERY_LENS = [1, 5, 1, 1, 3, 1]  # decodes around two prefill chunks
SEQ_LENS = [9, 5, 2, 17, 7, 4]


def tables() -> list[list[int]]:
    out, first = [], 1  # block 0 unused: a table padded with 0 must never be read as keys
    for n in SEQ_LENS:
        blocks = -(-n // BLOCK)
        out.append(list(range(first, first + blocks)))
        first += blocks
    return out


def attend(query_lens, seq_lens, block_tables, q, k, v, cache):
    meta = build_metadata(query_lens, seq_lens, block_tables, BLOCK)
    return torch_paged_attention(q, k, v, cache, meta, scale=DIM ** -0.5)


def test_batched_decodes_equal_one_sequence_at_a_time():
    g = torch.Generator().manual_seed(0)
    t = sum(QUERY_LENS)
    q, k, v = (torch.randn(t, h, DIM, generator=g) for h in (HQ, HKV, HKV))
    cache = torch.randn(2, 32, BLOCK, HKV, DIM, generator=g)
    block_tables = tables()
    together = attend(QUERY_LENS, SEQ_LENS, block_tables, q, k, v, cache.clone())
    alone, start = [], 0
    for i, (q_len, seq_len) in enumerate(zip(QUERY_LENS, SEQ_LENS)):
        rows = slice(start, start + q_len)
        alone.append(attend([q_len], [seq_len], [block_tables[i]], q[rows], k[rows], v[rows],
                            cache.clone()))
        start += q_len
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_every_layer_of_a_step_shares_one_decode_plan_and_a_rewritten_table_rebuilds_it():
    g = torch.Generator().manual_seed(1)
    t = sum(QUERY_LENS)
    q, k, v = (torch.randn(t, h, DIM, generator=g) for h in (HQ, HKV, HKV))
    cache = torch.randn(2, 32, BLOCK, HKV, DIM, generator=g)
    meta = build_metadata(QUERY_LENS, SEQ_LENS, tables(), BLOCK)
    first = torch_paged_attention(q, k, v, cache, meta, scale=DIM ** -0.5)
    plan = meta.decode_plan
    assert plan is not None and plan.decodes == [0, 2, 3, 5]
    again = torch_paged_attention(q, k, v, cache, meta, scale=DIM ** -0.5)  # the next layer
    assert meta.decode_plan is plan
    torch.testing.assert_close(again, first)
    # a replay rewrites the tables in place: sequence 3's blocks move, the plan must follow
    rows = tables()
    rows[3] = [b + 12 for b in rows[3]]
    cache[:, rows[3]] = cache[:, tables()[3]]
    fresh = build_metadata(QUERY_LENS, SEQ_LENS, rows, BLOCK).block_tables
    meta.block_tables.copy_(fresh)
    moved = torch_paged_attention(q, k, v, cache, meta, scale=DIM ** -0.5)
    assert meta.decode_plan is not plan
    torch.testing.assert_close(moved, first)
