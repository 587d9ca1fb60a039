"""Shared helpers for the model tests: a paged KV cache driver and the error metric."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from pdserve.kernels.attention import build_metadata


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


@dataclass
class PagedCache:
    """Runs a model step by step over a real paged KV cache with scattered block ids."""

    model: torch.nn.Module
    block_size: int = 4
    num_blocks: int = 96
    tables: dict[str, list[int]] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        config = self.model.config
        kv_heads = self.model.model.layers[0].self_attn.num_kv_heads  # this rank's share
        shape = (2, self.num_blocks, self.block_size, kv_heads, config.head_dim)
        dtype = next(self.model.parameters()).dtype
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]
        # hand out blocks in a scrambled order so that no sequence is contiguous
        self.free = torch.randperm(self.num_blocks - 1, generator=torch.Generator().manual_seed(0))
        self.free = (self.free + 1).tolist()  # block 0 stays unused: it is the padding id

    def step(self, batch: list[tuple[str, list[int]]],
             input_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Append new tokens to each named sequence; returns each one's logits [new, vocab].
        `input_embeds` [all new tokens, hidden] replaces their embeddings (a VLM's images)."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in batch:
            start = self.lengths.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free.pop())
            ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            seq_lens.append(start + len(tokens))
            tables.append(table)
            self.lengths[seq] = start + len(tokens)
        meta = build_metadata(query_lens, seq_lens, tables, self.block_size)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta,
                                input_embeds=input_embeds)
            logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))


@pytest.fixture
def paged_cache():
    """A factory: paged_cache(model) -> PagedCache."""
    return PagedCache
