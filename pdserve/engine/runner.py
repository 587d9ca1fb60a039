"""Turns a scheduled step into tensors, runs the model and returns the logits that sample."""

from __future__ import annotations

import torch

from pdserve.engine.scheduler import SchedulerOutput
from pdserve.kernels.attention import build_metadata


class ModelRunner:
    """Owns the model and its KV caches (one tensor per layer) on one device."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """Forward every scheduled token; logits [num_sampling, vocab] in float32, in order."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, tables, sample_rows = [], [], [], []
        for s in step.scheduled:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            input_ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            tables.append(r.block_ids)
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
        meta = build_metadata(query_lens, seq_lens, tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))
