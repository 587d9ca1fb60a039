"""What an encoder instance loads: the vision tower and connector of a vision-language
model, not its text model (a Hugging Face folder's vision weights only)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.config import ModelConfig
from pdserve.models.hf_folder import is_hf_folder
from pdserve.models.vision import VisionTower

_VISION_PREFIXES = ("model.vision_model.", "model.connector.")  # HF SmolVLM names


class EncoderModel(nn.Module):
    """The vision tower with the face `vision_spec_of` and the engine know: `embed_images`
    and `image_token_id`."""

    def __init__(self, config: ModelConfig, tower: VisionTower) -> None:
        super().__init__()
        assert config.vision is not None
        self.config = config
        self.image_token_id = config.vision.image_token_id
        self.tower = tower

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [num_tiles, 3, S, S] -> rows [num_tiles * tokens_per_tile, hidden]."""
        return self.tower(pixel_values)


@torch.no_grad()
def load_encoder_model(name: str | None, dtype: torch.dtype, device: torch.device,
                       seed: int = 0) -> EncoderModel:
    """The vision tower of model `name` on `device`; ValueError for a text-only model.
    A folder loads only its vision weights; a random-weight preset draws the whole model
    (its tower's weights depend on the draws before them) and keeps the tower."""
    from pdserve.models.loader import load_model, model_config

    config = model_config(name)
    if config.vision is None:
        raise ValueError(f"--role encoder needs a vision-language model; {name!r} takes no "
                         "images")
    if name is not None and is_hf_folder(name):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                tower = VisionTower(config.vision, config.hidden_size)
        finally:
            torch.set_default_dtype(previous)
        tower.load_weights(_vision_weights(Path(name)))
    else:
        tower = load_model(name, dtype, device, seed=seed).model.vision
    return EncoderModel(config, tower.eval())


def _vision_weights(folder: Path):
    """(name relative to `model.`, tensor) of the folder's vision tower and connector."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(_VISION_PREFIXES):
                    yield name.removeprefix("model."), f.get_tensor(name)
