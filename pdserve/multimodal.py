"""Images in a prompt, as the engine sees them: preprocessed pixels, a content hash, a token count.

The server turns a request's `image_url` parts into `ImageInput`s and expands each image's
placeholder into `num_tokens` copies of the model's image token id in `prompt_token_ids`
(with whatever marker tokens the model's template puts around them). The engine fills
the prompt's image-token positions, in order, with the images' embedding rows: image 0's
`num_tokens` rows first, then image 1's, and so on. An encoder instance may send the
rows ahead (`embeddings`); otherwise the engine computes them from `pixel_values`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageInput:
    """One image of one prompt, ready for the vision encoder."""

    content_hash: bytes  # blake2b of the decoded pixels, not of the URL: keys every cache
    pixel_values: torch.Tensor  # [num_tiles, 3, H, W] float32, normalised for the model
    num_tokens: int  # image-token positions of the prompt that this image fills
    embeddings: torch.Tensor | None = None  # [num_tokens, hidden], when an encoder sent them
