"""The C decode attention kernel (pdserve/kernels/cpu_native.py) against attention written out
in PyTorch over each sequence's gathered keys, and the engine's attention seam with the
kernel on and off: scattered blocks, ragged lengths across block edges, GQA, threads."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from pdserve import switches
from pdserve.kernels import cpu_native
from pdserve.kernels.attention import build_metadata, torch_paged_attention

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
            cpu_native.decode_kernel(), q, out, rows, cache,
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32), dim ** -0.5)
    finally:
        torch.set_num_threads(before)
    expected = reference(q, cache, tables, lens, rows.tolist())
    torch.testing.assert_close(out[rows], expected[rows], rtol=1e-5, atol=1e-5)
    assert out[[1, 6]].isnan().all()  # rows of no sequence are left alone


def test_engine_seam_gives_the_same_with_the_kernel_on_and_off(monkeypatch):
    """A step of decodes around two prefill chunks: the kernel serves the decode rows, SDPA
    the chunks; turning the switch off (PyTorch's gather + SDPA) changes nothing."""
    query_lens, seq_lens = [1, 40, 1, 1, 7, 1], [33, 40, 2, 170, 20, 16]
    tables = scattered_tables(seq_lens, 64, seed=3)
    g = torch.Generator().manual_seed(5)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, 64, generator=g) for h in (9, 3, 3))
    cache = torch.randn(2, 64, BLOCK, 3, 64, generator=g)

    def attend() -> torch.Tensor:
        meta = build_metadata(query_lens, seq_lens, tables, BLOCK)
        return torch_paged_attention(q, k, v, cache.clone(), meta, scale=0.125)

    assert cpu_native.decode_kernel() is not None  # a compiler is here: the kernel serves
    native = attend()
    monkeypatch.setattr(switches, "SWITCHES",
                        dataclasses.replace(switches.SWITCHES, cpu_native=False))
    assert cpu_native.decode_kernel() is None
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
    assert cpu_native.decode_kernel() is not None
    tiny = torch.tensor(1e-39, dtype=torch.float32)  # a float32 denormal
    assert (tiny / 2).item() > 0.0
