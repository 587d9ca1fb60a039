"""Builds one step's model inputs in pinned host buffers and ships them to the device at once.

Python lists per token would cost milliseconds at batch 256; numpy slices into reused
buffers keep the host side of a decode step well under the GPU's time for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.scheduler import SchedulerOutput
from pdserve.kernels.attention import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] rows of the last token of each sampling request
    num_seqs: int
    decode_only: bool


def token_slice(r, first: int, last: int) -> list[int]:
    """Tokens first..last of a request without concatenating prompt and output."""
    prompt, out = r.prompt_token_ids, r.output_token_ids
    n = len(prompt)
    if last <= n:
        return prompt[first:last]
    if first >= n:
        return out[first - n : last - n]
    return prompt[first:] + out[: last - n]


def block_array(r) -> np.ndarray:
    """The request's block ids as numpy, rebuilt only when a block was added (every 16 steps)."""
    cached = r.block_array
    if cached is None or len(cached) != len(r.block_ids):
        cached = r.block_array = np.asarray(r.block_ids, dtype=np.int64)
    return cached


class InputBuilder:
    """Reusable host buffers sized for the largest step the scheduler can produce."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"

        def buf(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, pin_memory=pin)

        self.ids, self.pos, self.slots = buf(max_tokens), buf(max_tokens), buf(max_tokens)
        self.tables = buf(max_seqs, max_blocks_per_seq, dtype=torch.int32)
        self.seq_lens = buf(max_seqs, dtype=torch.int32)
        self.starts = buf(max_seqs + 1, dtype=torch.int32)
        self.rows = buf(max_seqs)

    def build(self, step: SchedulerOutput) -> StepInputs:
        ids, pos, slots = self.ids.numpy(), self.pos.numpy(), self.slots.numpy()
        tables, seq_lens, starts = self.tables.numpy(), self.seq_lens.numpy(), self.starts.numpy()
        rows = self.rows.numpy()
        bs = self.block_size
        t = n_sample = width = 0
        query_lens, lens = [], []
        starts[0] = 0
        for i, s in enumerate(step.scheduled):
            r, n = s.request, s.num_new_tokens
            first = r.num_computed_tokens
            last = first + n
            blocks = block_array(r)
            if n == 1:  # decode: scalar work only
                ids[t] = r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1]
                if first != r.num_tokens - 1:  # a one-token prefill chunk
                    ids[t] = token_slice(r, first, last)[0]
                pos[t] = first
                slots[t] = r.block_ids[first // bs] * bs + first % bs
            else:
                ids[t : t + n] = token_slice(r, first, last)
                p = np.arange(first, last)
                pos[t : t + n] = p
                slots[t : t + n] = blocks[p // bs] * bs + p % bs
            tables[i, : len(blocks)] = blocks
            width = max(width, len(blocks))
            seq_lens[i] = last
            query_lens.append(n)
            lens.append(last)
            t += n
            starts[i + 1] = t
            if s.samples:
                rows[n_sample] = t - 1
                n_sample += 1
        b = len(step.scheduled)
        dev, nb = self.device, self.device.type == "cuda"

        def ship(x: torch.Tensor) -> torch.Tensor:
            return x.to(dev, non_blocking=nb)

        meta = AttentionMetadata(
            query_start_loc=ship(self.starts[: b + 1]),
            seq_lens=ship(self.seq_lens[:b]),
            block_tables=ship(self.tables[:b, : max(width, 1)]),
            slot_mapping=ship(self.slots[:t]),
            max_query_len=max(query_lens),
            max_seq_len=max(lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=lens,
        )
        return StepInputs(ship(self.ids[:t]), ship(self.pos[:t]), meta,
                          ship(self.rows[:n_sample]), b, max(query_lens) == 1)
