"""A step's image rows: which input rows take image embeddings, and those embeddings.

Only prompt chunks holding image tokens need them. Images not yet computed are encoded in
one vision-tower call per tile size across the step's requests (an encoder instance's
`ImageInput.embeddings` are used as they are); each image's rows stay on its request until
every one of them is in the KV cache, then go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.prompt_images import PromptImages
from pdserve.engine.scheduler import SchedulerOutput

# tiles one vision-tower call takes: bounds its activations, which the start-up memory
# profile does not count (4 SmolVLM images of 17 tiles each are 68)
MAX_TILES_PER_CALL = 32


@dataclass
class ImageRows:
    """Input rows `dst` [n] of the step take the embeddings `src` [n, hidden]."""

    dst: torch.Tensor
    src: torch.Tensor


@dataclass
class _Chunk:
    images: PromptImages
    dst: np.ndarray  # step rows of its image positions
    k0: int
    k1: int


def step_image_rows(step: SchedulerOutput, model: torch.nn.Module,
                    device: torch.device) -> ImageRows | None:
    """The image rows of a step about to run (requests' num_computed_tokens not yet
    advanced), or None if none of its chunks holds an image token."""
    chunks: list[_Chunk] = []
    t = 0
    for s in step.scheduled:
        r, images = s.request, s.request.prompt_images
        first = r.num_computed_tokens
        if images is not None and first < r.num_prompt_tokens:
            offsets, k0, k1 = images.chunk_rows(first, min(first + s.num_new_tokens,
                                                           r.num_prompt_tokens))
            if k1 > k0:
                chunks.append(_Chunk(images, offsets + t, k0, k1))
        t += s.num_new_tokens
    if not chunks:
        return None
    _encode_missing(chunks, model, device)
    src = torch.cat([c.images.rows(c.k0, c.k1) for c in chunks])
    for c in chunks:
        c.images.consumed(c.k1)
    dst = torch.from_numpy(np.concatenate([c.dst for c in chunks])).to(device)
    return ImageRows(dst, src)


def _encode_missing(chunks: list[_Chunk], model: torch.nn.Module, device: torch.device) -> None:
    """Fill `computed` for every image the chunks need: sent embeddings as they are, the
    rest through the vision tower, batched by tile size."""
    dtype = model.lm_head.weight.dtype
    todo: dict[tuple[int, ...], list[tuple[PromptImages, int]]] = {}
    for c in chunks:
        for i in c.images.images_of(c.k0, c.k1):
            if i in c.images.computed:
                continue
            image = c.images.images[i]
            if image.embeddings is not None:
                c.images.computed[i] = image.embeddings.to(device=device, dtype=dtype)
            else:
                todo.setdefault(tuple(image.pixel_values.shape[1:]), []).append((c.images, i))
    for group in todo.values():
        pixels = torch.cat([images.images[i].pixel_values for images, i in group]).to(device)
        rows = torch.cat([model.embed_images(part) for part in pixels.split(MAX_TILES_PER_CALL)])
        for (images, i), part in zip(
                group, rows.split([images.images[i].num_tokens for images, i in group]),
                strict=True):
            images.computed[i] = part
