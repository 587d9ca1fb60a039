"""A request's images against its prompt: which positions take which rows, the prefix
cache's per-block image keys, and the rows computed for chunks still to come.

Rows are numbered over the whole prompt: image 0's `num_tokens` rows first, then image 1's
(pdserve/multimodal.py); row k fills the k-th image-token position. A prefill chunk
[first, last) needs rows k0..k1 of the positions inside it, whatever images they belong
to: chunked prefill may split an image, and a prefix-cache hit may skip some entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pdserve.block_hashing import image_block_keys, image_token_positions
from pdserve.config import VisionConfig
from pdserve.models.vision import check_tiles
from pdserve.multimodal import ImageInput


@dataclass
class PromptImages:
    images: list[ImageInput]
    positions: np.ndarray  # [rows] prompt positions of the image tokens, ascending
    ends: np.ndarray  # [images] ends[i]: the row after image i's last
    block_keys: dict[int, bytes]  # block index -> its images' key (block_hashing)
    # image index -> its rows [num_tokens, hidden] on the device, computed for a chunk and
    # kept until every row is consumed (a later chunk may need the rest of the image)
    computed: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, prompt_token_ids: list[int], images: list[ImageInput],
              vision: VisionConfig | None, text_hidden_size: int,
              block_size: int) -> PromptImages | None:
        """None for a text prompt; ValueError (a message for the user) if the images do not
        fit the model or the prompt's image tokens."""
        if vision is None:
            if images:
                raise ValueError("this model takes no images")
            return None
        positions = image_token_positions(prompt_token_ids, vision.image_token_id)
        if not images and not positions:
            return None
        for i, image in enumerate(images):
            _check_image(i, image, vision, text_hidden_size)
        keys = image_block_keys(positions, block_size,
                                [(image.content_hash, image.num_tokens) for image in images])
        ends = np.cumsum([image.num_tokens for image in images], dtype=np.int64)
        return cls(images, np.asarray(positions, dtype=np.int64), ends, keys)

    def chunk_rows(self, first: int, last: int) -> tuple[np.ndarray, int, int]:
        """For prompt chunk [first, last): the image positions in it, relative to `first`,
        and the rows k0..k1 they take."""
        k0, k1 = np.searchsorted(self.positions, [first, last])
        return self.positions[k0:k1] - first, int(k0), int(k1)

    def images_of(self, k0: int, k1: int) -> range:
        """The images whose rows meet rows k0..k1 (k1 > k0)."""
        first = int(np.searchsorted(self.ends, k0, side="right"))
        last = int(np.searchsorted(self.ends, k1 - 1, side="right"))
        return range(first, last + 1)

    def rows(self, k0: int, k1: int) -> torch.Tensor:
        """Rows k0..k1 [k1 - k0, hidden] from the computed images (all must be computed)."""
        parts = []
        for i in self.images_of(k0, k1):
            start = int(self.ends[i - 1]) if i else 0
            lo, hi = max(k0, start) - start, min(k1, int(self.ends[i])) - start
            parts.append(self.computed[i][lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def consumed(self, k1: int) -> None:
        """Rows before k1 are in the KV cache: drop the images that have no row left."""
        for i in [i for i in self.computed if int(self.ends[i]) <= k1]:
            del self.computed[i]


def _check_image(i: int, image: ImageInput, vision: VisionConfig, hidden: int) -> None:
    if image.num_tokens < 1:
        raise ValueError(f"image {i} fills no image token")
    if image.embeddings is not None:
        if tuple(image.embeddings.shape) != (image.num_tokens, hidden):
            raise ValueError(f"image {i}'s embeddings must be [{image.num_tokens}, {hidden}], "
                             f"not {list(image.embeddings.shape)}")
        return
    rows = check_tiles(vision, image.pixel_values)
    if rows != image.num_tokens:
        raise ValueError(f"image {i}'s tiles give {rows} rows but it fills "
                         f"{image.num_tokens} image tokens")
