"""SmolVLM (and Idefics3): the Llama text model plus a SigLIP vision tower and connector.

The text side is `LlamaForCausalLM` unchanged, with plain 1-D RoPE: an image's rows take
ordinary consecutive positions, so the paged kernels and the decode position bookkeeping
stay as they are. The engine embeds a step's token ids (`embed_tokens`), overwrites the
rows at image-token positions with `embed_images` rows, and passes them as `input_embeds`.
Weights arrive under the names of transformers' `SmolVLMForConditionalGeneration`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pdserve.config import ModelConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.vision import VisionTower

_TEXT, _VISION = "model.text_model.", ("model.vision_model.", "model.connector.")


class SmolVLMForConditionalGeneration(LlamaForCausalLM):
    """A Llama causal LM that also turns image tiles into prompt rows (tensor parallel: 1)."""

    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1) -> None:
        if config.vision is None:
            raise ValueError("a SmolVLM model needs ModelConfig.vision")
        if tp_size != 1:
            raise ValueError("vision-language models run with tensor_parallel_size 1 for now")
        super().__init__(config, tp_rank, tp_size)
        self.vision = VisionTower(config.vision, config.hidden_size)

    @property
    def image_token_id(self) -> int:
        """The placeholder id whose positions take image rows (media/vision_spec.py asks)."""
        return self.config.vision.image_token_id

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden], for the rows that are not image rows."""
        return self.model.embed_tokens(input_ids)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [num_tiles, 3, S, S] -> [num_tiles * tokens_per_tile, hidden], in tile order."""
        return self.vision(pixel_values)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF SmolVLM names: the text model's through Llama's loader, the rest here."""
        vision: list[tuple[str, torch.Tensor]] = []  # about a third of the weights at most

        def text() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                if name.startswith(_TEXT):
                    yield "model." + name.removeprefix(_TEXT), tensor
                elif name.startswith(_VISION):
                    vision.append((name.removeprefix("model."), tensor))
                else:
                    yield name, tensor  # lm_head.weight

        super().load_weights(text())
        self.vision.load_weights(vision)
