"""CUDA graphs of decode steps: one graph per batch size of a ladder, replayed with padding.

A decode step of a small batch is dozens of tiny kernels per layer; launched one by one,
the CPU's launch time exceeds the GPU's work. Each graph reads its inputs from static
tensors, so a replay is: copy this step's ids, positions, slots, lengths and block table
into them, pad the unused rows (slot -1: nothing written), replay.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.batch_inputs import StepInputs, table_width
from pdserve.engine.compilations import COMPILATIONS
from pdserve.kernels.attention import AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


class DecodeGraphs:
    """Captured decode forwards for every batch size in `sizes` (up to `max_batch`)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_batch: int,
                 max_blocks_per_seq: int, max_seq_len: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = [s for s in DEFAULT_SIZES if s <= max_batch] or [max_batch]
        self.max_seq_len = max_seq_len
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.pos = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.starts = torch.arange(n + 1, dtype=torch.int32, device=device)
        # as wide as any eager step's table (batch_inputs.table_width), so every decode fits
        self.tables = torch.zeros(n, table_width(max_blocks_per_seq), dtype=torch.int32,
                                  device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.starts[: size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.tables[:size], slot_mapping=self.slots[:size], max_query_len=1,
            max_seq_len=self.max_seq_len, query_lens_cpu=[1] * size, seq_lens_cpu=[1] * size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture largest first, so the smaller graphs reuse its memory pool."""
        for size in reversed(self.sizes):
            meta = self._meta(size)
            args = (self.ids[:size], self.pos[:size], self.kv_caches, meta)
            self.model.compute_logits(self.model(*args))  # warm-up: autotune outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # the LM head too: fewer launches
                self.outputs[size] = self.model.compute_logits(self.model(*args))
            self.pool = graph.pool()
            self.graphs[size] = graph
            COMPILATIONS.count("cuda_graph")
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def fits(self, inputs: StepInputs) -> bool:
        return inputs.decode_only and inputs.num_seqs <= self.sizes[-1] and (
            inputs.meta.block_tables.shape[1] <= self.tables.shape[1])

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only step, by replaying the right graph."""
        b = inputs.num_seqs
        size = next(s for s in self.sizes if s >= b)
        meta = inputs.meta
        self.ids[:b].copy_(inputs.input_ids)
        self.pos[:b].copy_(inputs.positions)
        self.slots[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.tables[:b, :width].copy_(meta.block_tables)
        if size > b:  # padding rows: attend to one garbage key, write nothing
            self.slots[b:size].fill_(-1)
            self.seq_lens[b:size].fill_(1)
            self.tables[b:size, 0].fill_(0)
        self.graphs[size].replay()
        return self.outputs[size][:b]
