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


def _rope_inputs(case) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decode token's position (its sequence's length - 1) and a cos/sin table."""
    from pdserve.kernels.triton_rope import rope_cos_sin_cache
    from pdserve.models.layers import rope_inv_freq

    head_dim = case.q.shape[-1]
    table = rope_cos_sin_cache(rope_inv_freq(head_dim, 10000.0, None), 512, case.q.dtype)
    return torch.tensor(case.meta.seq_lens_cpu) - 1, table


@pytest.mark.parametrize("dtype,num_splits", [(torch.float32, 1), (torch.float32, 4),
                                              (torch.bfloat16, 3)])
def test_fused_rope_equals_rope_kernel_then_decode(dtype: torch.dtype, num_splits: int) -> None:
    """Rotating q and the new k inside the decode kernel gives the rope kernel's numbers:
    the same cached K (bit for bit, rounding included) and the same output."""
    from pdserve.kernels.triton_rope import apply_rope_

    case = make_case([1, 1, 1], [5, 70, 131], 8, 2, 64, 16, dtype=dtype, seed=4)
    positions, table = _rope_inputs(case)
    q, k = case.q.clone(), case.k.clone()
    cache = case.kv_cache.clone()
    apply_rope_(q, k, positions, table)
    expected = torch.full_like(q, float("nan"))
    decode_attention(q, cache, case.meta, case.scale, expected, num_splits=num_splits,
                     new_kv=(k, case.v))
    out = torch.full_like(case.q, float("nan"))
    decode_attention(case.q, case.kv_cache, case.meta, case.scale, out, num_splits=num_splits,
                     new_kv=(case.k, case.v), rope_table=table)
    assert torch.equal(case.kv_cache, cache)
    assert rel_error(out.float(), expected.float()) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert not torch.equal(case.q, q)  # the inputs stayed unrotated: the kernel rotated them


def test_rope_needs_the_fused_store() -> None:
    case = make_case([1], [9], 4, 2, 64, 16)
    with pytest.raises(ValueError, match="new_kv"):
        decode_attention(case.q, case.kv_cache, case.meta, case.scale, torch.empty_like(case.q),
                         rope_table=_rope_inputs(case)[1])


def test_mixed_batch_rotates_before_attention() -> None:
    """Outside a decode-only step, paged attention with `rope` rotates first, then attends as
    if q and k had arrived rotated."""
    from pdserve.kernels.triton_rope import apply_rope_

    case = make_case([1, 6], [40, 30], 8, 2, 64, 16, seed=6)
    positions = torch.cat([torch.tensor([39]), torch.arange(24, 30)])
    table = _rope_inputs(case)[1]
    q, k = case.q.clone(), case.k.clone()
    apply_rope_(q, k, positions, table)
    cache = case.kv_cache.clone()
    expected = triton_paged_attention(q, k, case.v, cache, case.meta, case.scale)
    got = run(case, rope=(positions, table))
    assert rel_error(got, expected) < 1e-6
    assert torch.equal(case.kv_cache, cache)
