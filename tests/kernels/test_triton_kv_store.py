"""The Triton KV store writes each new token's K/V at its cache slot, under the interpreter."""

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402
from triton_paged_case import make_case  # noqa: E402

from pdserve.kernels.attention import write_kv  # noqa: E402
from pdserve.kernels.triton_kv_store import store_kv  # noqa: E402


@pytest.mark.parametrize(
    "head_dim,num_kv_heads,block_size", [(64, 2, 16), (128, 1, 32), (64, 3, 16)]
)
def test_store_matches_the_torch_write(head_dim: int, num_kv_heads: int, block_size: int) -> None:
    case = make_case([3, 1, 20], [3, 40, 52], num_kv_heads, num_kv_heads, head_dim, block_size)
    expected = case.kv_cache.clone()
    write_kv(case.k, case.v, expected, case.meta.slot_mapping)
    store_kv(case.k, case.v, case.kv_cache, case.meta.slot_mapping)
    assert torch.equal(case.kv_cache, expected)


def test_store_skips_padding_slots() -> None:
    case = make_case([4], [4], 2, 2, 64, 16)
    slots = case.meta.slot_mapping.clone()
    slots[1] = -1
    slots[3] = -1
    expected = case.kv_cache.clone()
    write_kv(case.k, case.v, expected, slots)
    store_kv(case.k, case.v, case.kv_cache, slots)
    assert torch.equal(case.kv_cache, expected)


def test_store_casts_to_the_cache_dtype_and_accepts_strided_rows() -> None:
    case = make_case([6], [6], 2, 2, 64, 16)
    cache = case.kv_cache.to(torch.float16)
    kv = torch.cat([case.k, case.v], dim=1)  # k and v as views of one fused projection
    k, v = kv[:, :2], kv[:, 2:]
    expected = cache.clone()
    write_kv(k, v, expected, case.meta.slot_mapping)
    store_kv(k, v, cache, case.meta.slot_mapping)
    assert torch.equal(cache, expected)
