"""Split-KV decode attention matches a float64 reference, under the Triton interpreter."""

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402
from triton_paged_case import make_case, reference, rel_error  # noqa: E402

from pdserve.kernels.attention import write_kv  # noqa: E402
from pdserve.kernels.triton_attention import triton_paged_attention  # noqa: E402
from pdserve.kernels.triton_decode import MAX_SPLITS, DecodeScratch, decode_attention  # noqa: E402
from pdserve.kernels.triton_kv_store import store_kv  # noqa: E402

# (head_dim, query heads, kv heads, block size): GQA ratios 1, 3, 4 and 8
SHAPES = [(64, 4, 4, 16), (128, 8, 2, 32), (64, 8, 1, 16), (128, 16, 2, 16), (64, 9, 3, 32)]
SEQ_LENS = [1, 17, 64, 150]  # one token, a partial block, whole tiles, several splits


def run(case, **kwargs) -> torch.Tensor:
    out = torch.full_like(case.q, float("nan"))  # every element must be written
    return triton_paged_attention(
        case.q, case.k, case.v, case.kv_cache, case.meta, case.scale, out=out, **kwargs
    )


@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size", SHAPES)
def test_decode_matches_reference(
    head_dim: int, heads: int, kv_heads: int, block_size: int
) -> None:
    case = make_case([1] * len(SEQ_LENS), SEQ_LENS, heads, kv_heads, head_dim, block_size)
    expected, expected_cache = reference(case)
    assert rel_error(run(case), expected) < 1e-5
    assert torch.equal(case.kv_cache.double(), expected_cache)  # the fused store wrote K/V


@pytest.mark.parametrize(
    "num_splits,fused_store", [(1, False), (8, False), (1, True), (3, True), (8, True)]
)
def test_split_counts_give_the_same_result(num_splits: int, fused_store: bool) -> None:
    case = make_case([1, 1, 1], [3, 100, 257], 8, 2, 64, 16, seed=1)
    expected, expected_cache = reference(case)
    if not fused_store:
        store_kv(case.k, case.v, case.kv_cache, case.meta.slot_mapping)
    new_kv = (case.k, case.v) if fused_store else None
    out = torch.full_like(case.q, float("nan"))
    decode_attention(
        case.q, case.kv_cache, case.meta, case.scale, out, num_splits=num_splits, new_kv=new_kv
    )
    assert rel_error(out, expected) < 1e-5
    assert torch.equal(case.kv_cache.double(), expected_cache)


def test_fused_store_skips_padding_slots() -> None:
    """A CUDA-graph batch filler: slot -1 leaves the cache alone, the output is still right."""
    case = make_case([1, 1], [20, 9], 4, 2, 64, 16, seed=9)
    expected, _ = reference(case)
    slots = case.meta.slot_mapping
    expected_cache = case.kv_cache.clone()
    write_kv(case.k[:1], case.v[:1], expected_cache, slots[:1])  # only the first token's slot
    slots[1] = -1
    out = torch.full_like(case.q, float("nan"))
    decode_attention(case.q, case.kv_cache, case.meta, case.scale, out, new_kv=(case.k, case.v))
    assert rel_error(out, expected) < 1e-5
    assert torch.equal(case.kv_cache, expected_cache)


def test_decode_writes_into_given_scratch_and_out() -> None:
    case = make_case([1, 1], [40, 90], 8, 2, 128, 16, seed=2)
    expected, _ = reference(case)
    scratch = DecodeScratch.allocate(4, 8, 128, MAX_SPLITS, torch.device("cpu"))  # oversized
    scratch.out.fill_(float("nan"))
    scratch.lse.fill_(float("nan"))
    store_kv(case.k, case.v, case.kv_cache, case.meta.slot_mapping)
    out = torch.full_like(case.q, float("nan"))
    decode_attention(case.q, case.kv_cache, case.meta, case.scale, out, scratch, num_splits=4)
    assert rel_error(out, expected) < 1e-5
    assert not scratch.lse[:2, :, :4].isnan().any()  # the partials went to the given buffer


def test_same_launch_serves_new_lengths_in_place() -> None:
    """What a CUDA-graph replay does: same tensors, grid and splits; new lengths written in."""
    long = make_case([1, 1], [150, 70], 8, 2, 64, 16, seed=3)
    expected_long, cache = reference(long)
    long.kv_cache.copy_(cache)  # the step's K/V are in the cache, as after the store
    out = torch.full_like(long.q, float("nan"))
    decode_attention(long.q, long.kv_cache, long.meta, long.scale, out, num_splits=8)
    assert rel_error(out, expected_long) < 1e-5
    long.meta.seq_lens.copy_(torch.tensor([33, 70], dtype=torch.int32))
    long.meta.seq_lens_cpu = [33, 70]
    short = reference_without_store(long)
    decode_attention(long.q, long.kv_cache, long.meta, long.scale, out, num_splits=8)
    assert rel_error(out, short) < 1e-5


def reference_without_store(case) -> torch.Tensor:
    """Float64 attention over what the cache already holds (every slot set to padding)."""
    saved = case.meta.slot_mapping
    case.meta.slot_mapping = torch.full_like(saved, -1)
    try:
        return reference(case)[0]
    finally:
        case.meta.slot_mapping = saved


# bf16 is checked on the GPU (benchmarks/bench_attention.py): Triton 3.6's interpreter
# multiplies bf16's raw bits in tl.dot
def test_half_precision_inputs() -> None:
    case = make_case([1, 1, 1], [5, 48, 130], 8, 2, 64, 16, dtype=torch.float16, seed=4)
    expected, _ = reference(case)
    assert rel_error(run(case), expected) < 2e-2
