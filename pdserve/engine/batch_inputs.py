"""Builds one step's model inputs in a pinned host buffer and ships them in one copy.

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


# Triton specializes a kernel on each pointer's 16-byte alignment and on each integer that
# is 1 or a multiple of 16: arrays start on 16-byte boundaries and block tables are a multiple
# of 16 wide, so every step's inputs hit the kernels compiled at start-up, never a new variant
ALIGN = 16
TABLE_WIDTH_MULTIPLE = 16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def table_width(max_blocks: int) -> int:
    """The block table's width for a step whose longest sequence has `max_blocks` blocks."""
    return max(-(-max_blocks // TABLE_WIDTH_MULTIPLE), 1) * TABLE_WIDTH_MULTIPLE


@dataclass
class StepArrays:
    """A step's inputs as views of one byte buffer: numpy on the host, torch on the device."""

    ids: np.ndarray | torch.Tensor  # [T] int64
    pos: np.ndarray | torch.Tensor  # [T] int64
    slots: np.ndarray | torch.Tensor  # [T] int64
    rows: np.ndarray | torch.Tensor  # [B] int64: the first N are the sampling rows
    starts: np.ndarray | torch.Tensor  # [B + 1] int32
    seq_lens: np.ndarray | torch.Tensor  # [B] int32
    tables: np.ndarray | torch.Tensor  # [B, width] int32

    @staticmethod
    def _sizes(t: int, b: int, width: int) -> list[tuple[int, int]]:
        """(elements, bytes per element) of each array, in the order of the fields."""
        return [(t, 8), (t, 8), (t, 8), (b, 8), (b + 1, 4), (b, 4), (b * width, 4)]

    @classmethod
    def nbytes(cls, t: int, b: int, width: int) -> int:
        return sum(_aligned(n * size) for n, size in cls._sizes(t, b, width))

    @classmethod
    def view(cls, buf, t: int, b: int, width: int, int64, int32) -> StepArrays:
        """The arrays of a step of t tokens, b sequences and tables b x width, each on a
        16-byte boundary of `buf` (numpy or torch bytes, with that library's int64 and int32)."""
        arrays, offset = [], 0
        for n, size in cls._sizes(t, b, width):
            arrays.append(buf[offset : offset + n * size].view(int64 if size == 8 else int32))
            offset += _aligned(n * size)
        ids, pos, slots, rows, starts, seq_lens, tables = arrays
        return cls(ids=ids, pos=pos, slots=slots, rows=rows, starts=starts, seq_lens=seq_lens,
                   tables=tables.reshape(b, width))


class InputBuilder:
    """A pinned staging buffer sized for the largest step the scheduler can produce.

    Each step lays its arrays out back to back in it and ships them in one host-to-device
    copy (seven small copies cost a batch-1 decode step about 10 us of device time)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.max_blocks_per_seq, self.block_size = max_blocks_per_seq, block_size
        self.device = device
        size = StepArrays.nbytes(max_tokens, max_seqs, table_width(max_blocks_per_seq))
        self.staging = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.last: StepArrays | None = None  # the host side of the step built last

    def like(self) -> InputBuilder:
        """Another builder of the same size (async scheduling fills one while one ships)."""
        return InputBuilder(self.max_tokens, self.max_seqs, self.max_blocks_per_seq,
                            self.block_size, self.device)

    def build(self, step: SchedulerOutput) -> StepInputs:
        b = len(step.scheduled)
        t = sum(s.num_new_tokens for s in step.scheduled)
        width = table_width(max(len(s.request.block_ids) for s in step.scheduled))
        host = StepArrays.view(self.staging.numpy(), t, b, width, np.int64, np.int32)
        ids, pos, slots, rows = host.ids, host.pos, host.slots, host.rows
        starts, seq_lens, tables = host.starts, host.seq_lens, host.tables
        tables.fill(0)  # past a sequence's blocks: never read, but not stale ids either
        bs = self.block_size
        t = n_sample = 0
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
            seq_lens[i] = last
            query_lens.append(n)
            lens.append(last)
            t += n
            starts[i + 1] = t
            if s.samples:
                rows[n_sample] = t - 1
                n_sample += 1
        host.rows = rows[:n_sample]
        self.last = host
        staged = self.staging[: StepArrays.nbytes(t, b, width)]
        shipped = staged.to(self.device, non_blocking=self.device.type == "cuda")
        dev = StepArrays.view(shipped, t, b, width, torch.int64, torch.int32)
        meta = AttentionMetadata(
            query_start_loc=dev.starts,
            seq_lens=dev.seq_lens,
            block_tables=dev.tables,
            slot_mapping=dev.slots,
            max_query_len=max(query_lens),
            max_seq_len=max(lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=lens,
        )
        return StepInputs(dev.ids, dev.pos, meta, dev.rows[:n_sample], b, max(query_lens) == 1)
