"""Prefill and mixed-batch attention match a float64 reference, under the Triton interpreter."""

from dataclasses import replace

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import torch  # noqa: E402
from triton_paged_case import make_case, reference, rel_error  # noqa: E402

from pdserve import switches  # noqa: E402
from pdserve.kernels.attention import paged_attention, write_kv  # noqa: E402
from pdserve.kernels.triton_attention import triton_paged_attention  # noqa: E402
from pdserve.kernels.triton_prefill import PrefillConfig, prefill_attention  # noqa: E402
from pdserve.switches import read_switches  # noqa: E402

# (head_dim, query heads, kv heads, block size): GQA ratios 1, 3, 4 and 8
SHAPES = [(64, 4, 4, 16), (128, 8, 2, 32), (64, 8, 1, 16), (128, 16, 2, 16), (64, 9, 3, 32)]

BATCHES = {
    "prefill": ([5, 33, 16], [5, 33, 16]),  # fresh prompts, ragged
    "prefix_cached": ([7, 20], [40, 61]),  # chunks after cached prefixes
    "mixed": ([1, 12, 1, 30], [70, 12, 5, 50]),  # decode and prefill in one step
}


def set_switches(monkeypatch, **changes) -> None:
    """This test's run-time switches (what the PDSERVE_* variables would set)."""
    monkeypatch.setattr(switches, "SWITCHES", replace(switches.SWITCHES, **changes))


def run(case) -> torch.Tensor:
    out = torch.full_like(case.q, float("nan"))  # every element must be written
    return triton_paged_attention(
        case.q, case.k, case.v, case.kv_cache, case.meta, case.scale, out=out
    )


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size", SHAPES)
def test_batch_matches_reference(
    batch: str, head_dim: int, heads: int, kv_heads: int, block_size: int
) -> None:
    query_lens, seq_lens = BATCHES[batch]
    case = make_case(query_lens, seq_lens, heads, kv_heads, head_dim, block_size)
    expected, expected_cache = reference(case)
    assert rel_error(run(case), expected) < 1e-5
    assert torch.equal(case.kv_cache.double(), expected_cache)


def test_large_tiles_cover_unmasked_and_causal_loops() -> None:
    """GPU-sized tiles: whole prefix and chunk tiles, masked tails, spare programs."""
    case = make_case([3, 100, 1, 70], [150, 180, 9, 70], 8, 2, 64, 16, seed=5)
    expected, expected_cache = reference(case)
    out = torch.full_like(case.q, float("nan"))
    config = PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)
    prefill_attention(
        case.q, case.k, case.v, case.kv_cache, case.meta, case.scale, out, config=config
    )
    assert rel_error(out, expected) < 1e-5
    assert torch.equal(case.kv_cache.double(), expected_cache)


def test_prefill_kernel_stores_only_real_slots() -> None:
    """Slot -1 (padding) is not written; attention still sees the chunk's own keys."""
    case = make_case([6, 5], [20, 5], 4, 2, 64, 16, seed=10)
    expected, _ = reference(case)
    slots = case.meta.slot_mapping
    expected_cache = case.kv_cache.clone()
    keep = torch.arange(len(slots)) != 8
    write_kv(case.k[keep], case.v[keep], expected_cache, slots[keep])
    slots[8] = -1
    out = torch.full_like(case.q, float("nan"))
    prefill_attention(case.q, case.k, case.v, case.kv_cache, case.meta, case.scale, out)
    assert rel_error(out, expected) < 1e-5
    assert torch.equal(case.kv_cache, expected_cache)


def test_prefill_kernel_skips_empty_sequences() -> None:
    """Batch padding (query length 0) owns no tile and leaves the output alone."""
    case = make_case([9, 0, 4], [9, 3, 20], 4, 2, 64, 16, seed=6)
    expected, _ = reference(case)
    assert rel_error(run(case), expected) < 1e-5


def test_half_precision_inputs() -> None:
    case = make_case([1, 24, 9], [30, 24, 41], 8, 2, 64, 16, dtype=torch.float16, seed=7)
    expected, _ = reference(case)
    assert rel_error(run(case), expected) < 2e-2


def test_dispatcher_uses_torch_on_cpu_and_triton_when_forced(monkeypatch) -> None:
    case = make_case([1, 10], [20, 10], 8, 2, 64, 16, seed=8)
    expected, _ = reference(case)
    set_switches(monkeypatch, attention_backend=None)
    torch_out = paged_attention(
        case.q, case.k, case.v, case.kv_cache.clone(), case.meta, case.scale
    )
    set_switches(monkeypatch, attention_backend="triton")
    triton_out = paged_attention(case.q, case.k, case.v, case.kv_cache, case.meta, case.scale)
    assert rel_error(torch_out, expected) < 1e-5
    assert rel_error(triton_out, expected) < 1e-5


def test_unknown_backend_is_refused_when_the_switches_are_read() -> None:
    with pytest.raises(ValueError, match="PDSERVE_ATTENTION_BACKEND='flash'.*torch or triton"):
        read_switches({"PDSERVE_ATTENTION_BACKEND": "flash"})


@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size", SHAPES)
def test_fresh_prompts_through_sdpa_match_reference(
    monkeypatch, head_dim: int, heads: int, kv_heads: int, block_size: int
) -> None:
    """Long fresh prompts go to torch's SDPA after one KV store: same output and cache."""
    from pdserve.kernels import sdpa_prefill

    monkeypatch.setattr(sdpa_prefill, "SDPA_MIN_QUERY_LEN", 16)
    set_switches(monkeypatch, prefill_sdpa=True)
    query_lens = [5, 33, 16]
    assert sdpa_prefill.sdpa_prefill_applies(query_lens, query_lens)
    case = make_case(query_lens, query_lens, heads, kv_heads, head_dim, block_size, seed=3)
    expected, expected_cache = reference(case)
    assert rel_error(run(case), expected) < 1e-5
    assert torch.equal(case.kv_cache.double(), expected_cache)


def test_sdpa_prefill_applies_only_to_long_fresh_prompt_steps(monkeypatch) -> None:
    from pdserve.kernels.sdpa_prefill import SDPA_MIN_QUERY_LEN as n
    from pdserve.kernels.sdpa_prefill import sdpa_prefill_applies

    assert not sdpa_prefill_applies([n, 3], [n, 3])  # off unless asked for
    set_switches(monkeypatch, prefill_sdpa=True)
    assert sdpa_prefill_applies([n, 3], [n, 3])
    assert not sdpa_prefill_applies([n - 1, 3], [n - 1, 3])  # all short
    assert not sdpa_prefill_applies([n, 3], [n + 16, 3])  # a chunk over a cached prefix
