"""The C kernels (pdserve/kernels/cpu_native.py). Attention, decode and causal prefill, against
attention written out in float64 over each sequence's keys gathered by hand, and the engine's
attention seam with the kernels on and off: scattered blocks, ragged lengths across block
edges, chunks after a context, GQA, threads. The elementwise steps against their formulas,
RoPE against Hugging Face's bits, the KV store against index_copy_."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from pdserve import switches
from pdserve.kernels import cpu_native
from pdserve.kernels.attention import build_metadata, torch_paged_attention
from pdserve.kernels.rope_table import rope_cos_sin_cache
from pdserve.models.layers import rope_inv_freq

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                                reason="no C compiler: the kernel cannot be built here")

BLOCK = 16


def reference(q, cache, tables, lens, rows):
    """Softmax(q k^T * scale) v for each sequence's one query, keys gathered by hand."""
    out = torch.zeros_like(q)
    heads, kv_heads, dim = q.shape[1], cache.shape[3], q.shape[2]
    for b, n in enumerate(lens):
        slots = [tables[b][t // BLOCK] * BLOCK + t % BLOCK for t in range(n)]
        keys = cache[0].flatten(0, 1)[slots].double()  # [n, Hkv, D]
        values = cache[1].flatten(0, 1)[slots].double()
        for h in range(heads):
            kv = h // (heads // kv_heads)
            weights = torch.softmax(keys[:, kv] @ q[rows[b], h].double() * dim ** -0.5, 0)
            out[rows[b], h] = (weights @ values[:, kv]).float()
    return out


def scattered_tables(lens, num_blocks, seed):
    """Each sequence's blocks, drawn without repeats from the whole cache, in no order."""
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    tables, used = [], 0
    for n in lens:
        count = -(-n // BLOCK)
        tables.append(order[used:used + count].tolist())
        used += count
    return tables


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 8), (8, 1, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_attention_written_out(heads, kv_heads, dim, threads):
    lens = [1, 15, 16, 17, 300, 64]  # one key; either side of a block's edge; long
    g = torch.Generator().manual_seed(heads * dim)
    cache = torch.randn(2, 40, BLOCK, kv_heads, dim, generator=g)
    tables = scattered_tables(lens, 40, seed=dim)
    width = max(map(len, tables))
    q = torch.randn(len(lens) + 2, heads, dim, generator=g)  # two rows no sequence owns
    rows = torch.tensor([2, 0, 7, 3, 5, 4])
    out = torch.full_like(q, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_native.paged_decode(
            cpu_native.native_kernels(), q, out, rows, cache,
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32), dim ** -0.5)
    finally:
        torch.set_num_threads(before)
    expected = reference(q, cache, tables, lens, rows.tolist())
    torch.testing.assert_close(out[rows], expected[rows], rtol=1e-5, atol=1e-5)
    assert out[[1, 6]].isnan().all()  # rows of no sequence are left alone


def causal_reference(q, cache, table, context, scale):
    """Each new token (at position context + j) over keys 0 .. context + j, in float64."""
    q_len, heads, dim = q.shape
    kv_heads = cache.shape[3]
    n = context + q_len
    slots = [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)]
    keys = cache[0].flatten(0, 1)[slots].double()  # [n, Hkv, D]
    values = cache[1].flatten(0, 1)[slots].double()
    out = torch.empty(q_len, heads, dim, dtype=torch.float64)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        scores = q[:, h].double() @ keys[:, kv].T * scale  # [q_len, n]
        hidden = torch.arange(n)[None, :] > (context + torch.arange(q_len))[:, None]
        out[:, h] = torch.softmax(scores.masked_fill(hidden, float("-inf")), 1) @ values[:, kv]
    return out


@pytest.mark.parametrize("q_len,context", [(1, 0), (5, 0), (16, 0), (17, 3), (64, 0),
                                           (100, 37), (300, 0), (33, 500), (130, 16)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 1, 32), (4, 4, 16)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_kernel_equals_causal_attention_written_out(q_len, context, heads, kv_heads,
                                                           dim, threads):
    """A fresh prompt (context 0) or a later chunk, lengths on and off the kernel's 16- to
    64-query tiles and the cache's blocks, keys in scattered blocks."""
    g = torch.Generator().manual_seed(q_len * 7 + context)
    num_blocks = 48
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, dim, generator=g)
    table = scattered_tables([context + q_len], num_blocks, seed=q_len)[0]
    q = torch.randn(q_len, heads, dim, generator=g)
    out = torch.full_like(q, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        taken = cpu_native.paged_prefill(cpu_native.native_kernels(), q, out, context, cache,
                                         torch.tensor(table, dtype=torch.int32), dim ** -0.5)
    finally:
        torch.set_num_threads(before)
    assert taken
    expected = causal_reference(q, cache, table, context, dim ** -0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_prefill_kernel_with_scores_far_apart():
    """Scores hundreds apart (exp's argument clamped, masked keys weighted 0): no NaN where a
    query's keys are all but one negligible, and no further from float64 than PyTorch's own
    float32 attention (scores this large carry float32's rounding into the exp)."""
    g = torch.Generator().manual_seed(11)
    cache = torch.randn(2, 8, BLOCK, 1, 16, generator=g)
    q = torch.randn(70, 2, 16, generator=g) * 300
    out = torch.empty_like(q)
    table = list(range(1, 7))
    assert cpu_native.paged_prefill(cpu_native.native_kernels(), q, out, 10, cache,
                                    torch.tensor(table, dtype=torch.int32), 0.25)
    expected = causal_reference(q, cache, table, 10, 0.25)
    slots = [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(80)]
    keys, values = (cache[i].flatten(0, 1)[slots].transpose(0, 1) for i in (0, 1))
    visible = torch.arange(80)[None, :] <= (10 + torch.arange(70))[:, None]
    pytorch = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys, values, attn_mask=visible, scale=0.25,
        enable_gqa=True).transpose(0, 1)
    assert out.isfinite().all()
    assert (out.double() - expected).abs().max() <= 2 * (pytorch.double() - expected).abs().max()


def test_prefill_kernel_declines_a_head_size_it_does_not_tile():
    """head_dim 10 is not a multiple of the 8 output elements an AVX-512 build updates at once:
    it says so and leaves out alone (an AVX2 build, 2 at once, takes it)."""
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 4, BLOCK, 1, 10, generator=g)
    q = torch.randn(20, 2, 10, generator=g)
    out = torch.full_like(q, float("nan"))
    table = torch.tensor([3, 1], dtype=torch.int32)
    if cpu_native.paged_prefill(cpu_native.native_kernels(), q, out, 0, cache, table, 0.3):
        torch.testing.assert_close(out.double(), causal_reference(q, cache, [3, 1], 0, 0.3),
                                   rtol=1e-5, atol=1e-5)
    else:
        assert out.isnan().all()


def test_engine_seam_gives_the_same_with_the_kernel_on_and_off(monkeypatch):
    """A step of decodes around two prefill chunks, one fresh and one after 13 cached tokens:
    the kernels serve all of them; with the switch off PyTorch's gather + SDPA does, and
    nothing changes."""
    query_lens, seq_lens = [1, 40, 1, 1, 7, 1], [33, 40, 2, 170, 20, 16]
    tables = scattered_tables(seq_lens, 64, seed=3)
    g = torch.Generator().manual_seed(5)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, 64, generator=g) for h in (9, 3, 3))
    cache = torch.randn(2, 64, BLOCK, 3, 64, generator=g)

    def attend() -> torch.Tensor:
        meta = build_metadata(query_lens, seq_lens, tables, BLOCK)
        return torch_paged_attention(q, k, v, cache.clone(), meta, scale=0.125)

    assert cpu_native.native_kernels() is not None  # a compiler is here: the kernel serves
    native = attend()
    monkeypatch.setattr(switches, "SWITCHES",
                        dataclasses.replace(switches.SWITCHES, cpu_native=False))
    assert cpu_native.native_kernels() is None
    torch.testing.assert_close(native, attend(), rtol=1e-5, atol=1e-5)


def test_a_cache_that_is_not_float32_stays_on_pytorch():
    q = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    cache = torch.randn(2, 4, BLOCK, 2, 8, dtype=torch.bfloat16)
    meta = build_metadata([1, 1], [3, 5], [[1], [2]], BLOCK)
    out = torch_paged_attention(q, q[:, :2], q[:, :2], cache, meta, scale=0.3)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


def test_loading_the_kernel_leaves_denormals_alone():
    """Compiled with -ffast-math but linked without it: no crtfastmath.o setting
    flush-to-zero for every thread of the process that loads the library."""
    assert cpu_native.native_kernels() is not None
    tiny = torch.tensor(1e-39, dtype=torch.float32)  # a float32 denormal
    assert (tiny / 2).item() > 0.0


@pytest.mark.parametrize("rows,width", [(1, 576), (3, 100), (70, 64), (130, 37)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_equals_the_formula(rows, width, threads, with_residual):
    """One pass of (x + residual), then Hugging Face's RMSNorm in float32, against the formula
    in float64; rows on either side of where it goes parallel, widths off the vector's."""
    g = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=g) * 3
    residual = torch.randn(rows, width, generator=g) if with_residual else None
    weight = torch.rand(width, generator=g) + 0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        normed, summed = cpu_native.add_rms_norm(cpu_native.native_kernels(), x, residual,
                                                 weight, 1e-5)
    finally:
        torch.set_num_threads(before)
    s = x.double() + (0 if residual is None else residual.double())
    expected = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    torch.testing.assert_close(summed.double(), s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,width", [(1, 1536), (5, 19), (80, 48)])
@pytest.mark.parametrize("threads", [1, 2])
def test_silu_and_mul_equals_the_formula(rows, width, threads):
    """silu(gate) * up of packed gate | up rows, against the formula in float64, with gates
    far out on both sides (exp's argument clamped) and widths off the vector's."""
    g = torch.Generator().manual_seed(rows + width)
    gate_up = torch.randn(rows, 2 * width, generator=g) * 4
    gate_up[0, :4] = torch.tensor([-1000.0, -90.0, 90.0, 1000.0])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_native.silu_and_mul(cpu_native.native_kernels(), gate_up)
    finally:
        torch.set_num_threads(before)
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(gate) * up,
                               rtol=1e-5, atol=1e-6)


def test_elementwise_kernels_take_only_contiguous_float32_on_the_cpu():
    x = torch.randn(4, 8)
    assert cpu_native.elementwise_applies(x, None) is not None
    assert cpu_native.elementwise_applies(x.T) is None  # strided: PyTorch's ops serve
    assert cpu_native.elementwise_applies(x.bfloat16()) is None


def hf_rope(q, k, positions, theta):
    """Hugging Face's Llama RoPE on [T, heads, D] rows: its angles and its rotate-half."""
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf

    dim = q.shape[-1]
    config = LlamaConfig(hidden_size=dim * q.shape[1], num_attention_heads=q.shape[1],
                         head_dim=dim, rope_theta=theta, max_position_embeddings=4096)
    cos, sin = hf.LlamaRotaryEmbedding(config)(q, positions[None, :])
    q_hf, k_hf = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)


@pytest.mark.parametrize("tokens", [1, 8, 100])
@pytest.mark.parametrize("threads", [1, 2])
def test_rope_kernel_gives_hugging_face_s_bits(tokens, threads):
    """q and k as the engine holds them, views of one qkv projection (token rows apart), are
    rotated in place to exactly Hugging Face's values (each product rounded on its own, no
    fused multiply-add), on either side of where the kernel goes parallel."""
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (9 + 3 + 3) * 64, generator=g)
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], -1)
    q, k = q.view(tokens, 9, 64), k.view(tokens, 3, 64)
    positions = torch.randint(0, 2048, (tokens,), generator=g)
    expected_q, expected_k = hf_rope(q.clone(), k.clone(), positions, 100000.0)
    table = rope_cos_sin_cache(rope_inv_freq(64, 100000.0, None), 2048)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu_native.rope(q, k, positions, table)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert qkv[:, :9 * 64].data_ptr() == q.data_ptr()  # in place, in the projection


def test_rope_kernel_refuses_a_position_past_its_table_and_declines_other_dtypes():
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    table = rope_cos_sin_cache(rope_inv_freq(8, 10000.0, None), 16)
    q_before = q.clone()
    with pytest.raises(ValueError, match="outside the RoPE table"):
        cpu_native.rope(q, k, torch.tensor([0, 16, 3]), table)
    assert torch.equal(q, q_before)  # nothing rotated
    assert not cpu_native.rope(q.bfloat16(), k.bfloat16(), torch.tensor([0, 1, 2]), table)
    assert not cpu_native.rope(q, k, torch.tensor([0, 1, 2], dtype=torch.int32), table)
    # shapes the kernel would read past: more positions than rows, k's head size not q's
    assert not cpu_native.rope(q, k, torch.tensor([0, 1, 2, 3]), table)
    assert not cpu_native.rope(q, torch.randn(3, 1, 4), torch.tensor([0, 1, 2]), table)
    assert torch.equal(q, q_before)


def test_kv_store_kernel_equals_index_copy_and_skips_padding():
    """k and v (views of a qkv projection) land at their slots as index_copy_ puts them;
    padding slots (-1) are skipped; a slot past the cache raises and stores nothing."""
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(6, 4 * 16 + 2 * 2 * 16, generator=g)
    _, k, v = qkv.split([4 * 16, 2 * 16, 2 * 16], -1)
    k, v = k.view(6, 2, 16), v.view(6, 2, 16)
    cache = torch.randn(2, 5, 4, 2, 16, generator=g)
    slots = torch.tensor([7, -1, 0, 19, 8, -1])
    expected = cache.clone()
    keep = slots >= 0
    expected[0].view(20, 2, 16).index_copy_(0, slots[keep], k[keep])
    expected[1].view(20, 2, 16).index_copy_(0, slots[keep], v[keep])
    assert cpu_native.store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_native.store_kv(k, v, cache, torch.tensor([1, 2, 20, 3, 4, 5]))
    # shapes the kernel would read past: more slots than rows, v's heads not k's
    assert not cpu_native.store_kv(k, v, cache, torch.tensor([1, 2, 3, 4, 5, 6, 7]))
    assert not cpu_native.store_kv(k, v[:, :1], cache, slots)
    assert torch.equal(cache, expected)
