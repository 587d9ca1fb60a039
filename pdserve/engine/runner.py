"""Turns a scheduled step into tensors, runs the model and returns the logits that sample."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdserve.engine.batch_inputs import InputBuilder, StepInputs
from pdserve.engine.cuda_graphs import DecodeGraphs
from pdserve.engine.image_rows import MAX_TILES_PER_CALL, ImageRows, step_image_rows
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.kernels.attention import build_metadata

if TYPE_CHECKING:
    from pdserve.engine.step_loop import PendingIds


class ModelRunner:
    """Owns the model and its KV caches (one tensor per layer) on one device."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, max_tokens: int, max_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool = False):
        self.model = model
        self.has_vision = getattr(model.config, "vision", None) is not None
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        max_blocks = (max_model_len + block_size - 1) // block_size
        self.inputs = InputBuilder(max_tokens, max_seqs, max_blocks, block_size, device)
        self.graphs: DecodeGraphs | None = None
        if use_cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_caches, max_seqs, max_blocks, max_model_len,
                                       device)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """Forward every scheduled token; logits [num_sampling, vocab] in float32, in order."""
        return self.launch(step, self.inputs, None)

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput, builder: InputBuilder,
               pending: PendingIds | None) -> torch.Tensor:
        """`execute` with the inputs staged in `builder`, and the input ids the host does
        not know yet (async scheduling) copied in on the device first."""
        x = builder.build(step)
        if pending is not None:
            pending.apply(x)
        images = step_image_rows(step, self.model, self.device) if self.has_vision else None
        return forward_step(self.model, self.kv_caches, self.graphs, x, images)


def forward_step(model: torch.nn.Module, kv_caches: list[torch.Tensor],
                 graphs: DecodeGraphs | None, x: StepInputs,
                 images: ImageRows | None = None) -> torch.Tensor:
    """The forward every TP rank runs; the same choice of graph or eager on every rank.
    `images`: rows of a VLM's prompt chunks that take image embeddings, not token ones."""
    if images is None and graphs is not None and graphs.fits(x):
        logits = graphs.run(x)  # the graph includes the LM head
        if x.sample_rows.shape[0] == x.num_seqs:  # every decode row samples: rows 0..B-1
            return logits
        return logits.index_select(0, x.sample_rows)
    embeds = None
    if images is not None:
        embeds = model.embed_tokens(x.input_ids).index_copy_(0, images.dst, images.src)
    hidden = model(x.input_ids, x.positions, kv_caches, x.meta, input_embeds=embeds)
    # the vocab-parallel head all-gathers: every rank must call it, even with 0 rows
    return model.compute_logits(hidden.index_select(0, x.sample_rows))


def profile_seq_lens(num_tokens: int, max_seq_len: int | None) -> list[int]:
    """The prompts of the largest step: `num_tokens` in as few sequences as fit the model
    length (RoPE tables and block tables end there)."""
    if not max_seq_len or num_tokens <= max_seq_len:
        return [num_tokens]
    full, rest = divmod(num_tokens, max_seq_len)
    return [max_seq_len] * full + ([rest] if rest else [])


@torch.inference_mode()
def profile_peak_activation_bytes(model: torch.nn.Module, num_tokens: int, num_seqs: int,
                                  block_size: int, kv_shape_per_block: tuple, dtype: torch.dtype,
                                  device: torch.device, max_seq_len: int | None = None) -> int:
    """Peak memory of the largest step (prefills of `num_tokens` in all) above the weights."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    lens = profile_seq_lens(num_tokens, max_seq_len)
    tables, first = [], 0
    for n in lens:
        blocks = (n + block_size - 1) // block_size
        tables.append(list(range(first, first + blocks)))
        first += blocks
    num_layers = model.config.num_layers
    caches = [torch.zeros((2, first) + kv_shape_per_block, dtype=dtype, device=device)
              for _ in range(num_layers)]
    cache_bytes = sum(c.numel() * c.element_size() for c in caches)
    meta = build_metadata(lens, lens, tables, block_size, device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    vision = getattr(model.config, "vision", None)
    if vision is not None:  # a VLM step may first run the tower's largest call
        side = vision.image_size
        model.embed_images(torch.zeros(MAX_TILES_PER_CALL, vision.num_channels, side, side,
                                       dtype=dtype, device=device))
    hidden = model(ids, pos, caches, meta)
    model.compute_logits(hidden[:num_seqs] if num_seqs <= num_tokens else hidden)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - cache_bytes
    del caches, hidden
    torch.cuda.empty_cache()
    return peak
