"""Random paged-attention batches and their float64 reference, for the Triton kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kernels.attention import AttentionMetadata, build_metadata, torch_paged_attention


@dataclass
class PagedCase:
    """One step's inputs: new q/k/v, a cache holding earlier tokens, and the metadata."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedCase:
    """A batch whose sequences own shuffled blocks; earlier tokens are random cache entries."""
    gen = torch.Generator().manual_seed(seed)
    needed = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(needed) + 3  # spare blocks must stay untouched
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    meta = build_metadata(query_lens, seq_lens, tables, block_size)
    tokens = sum(query_lens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    cache = rand(2, num_blocks, block_size, num_kv_heads, head_dim)
    return PagedCase(
        q=rand(tokens, num_heads, head_dim),
        k=rand(tokens, num_kv_heads, head_dim),
        v=rand(tokens, num_kv_heads, head_dim),
        kv_cache=cache,
        meta=meta,
        scale=head_dim**-0.5,
    )


def reference(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, cache after the step) computed in float64 by the PyTorch path."""
    cache = case.kv_cache.double()
    q, k, v = case.q.double(), case.k.double(), case.v.double()
    out = torch_paged_attention(q, k, v, cache, case.meta, case.scale)
    return out, cache


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, NaN-propagating."""
    diff = (actual.double() - expected.double()).norm()
    return float(diff / expected.double().norm())
