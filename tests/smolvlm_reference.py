"""A tiny SmolVLM built with transformers (the reference) and saved as a HF folder, plus
images and prompts for it: the same weights on both sides, no hub."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

IMAGE_TOKEN_ID = 300
VOCAB = 320
TILE = 32  # pixels a side: 8 x 8 patches of 4, pixel shuffle by 2 -> 16 rows a tile
ROWS_PER_TILE = 16


def build_reference(folder: Path, idefics3: bool = False) -> torch.nn.Module:
    """transformers' SmolVLMForConditionalGeneration with random weights, saved to `folder`;
    `idefics3`: its Idefics3 twin, the class SmolVLM v1 checkpoints (256M, 500M) name."""
    import transformers

    family = "Idefics3" if idefics3 else "SmolVLM"
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForConditionalGeneration")
    torch.manual_seed(0)
    config = config_class(
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=1024),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TILE, patch_size=4),
        scale_factor=2, image_token_id=IMAGE_TOKEN_ID)
    model = randomize_weights(model_class(config).float().eval())
    model.save_pretrained(folder)
    return model


def randomize_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Norms away from 1 and every other weight drawn large enough that a swap shows, and
    that each image changes the text (from torch's global generator: seed it first)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model


def image(seed: int, tiles: int = 1):
    """An ImageInput of `tiles` random normalised tiles, keyed by its pixels."""
    from pdserve.multimodal import ImageInput

    pixels = torch.randn(tiles, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))
    digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=32).digest()
    return ImageInput(content_hash=digest, pixel_values=pixels, num_tokens=tiles * ROWS_PER_TILE)


def prompt(images: list, seed: int = 0, text: int = 5) -> list[int]:
    """Random text ids with each image's placeholder run between them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN_ID, (text,), generator=g).tolist()
    for img in images:
        ids += [IMAGE_TOKEN_ID] * img.num_tokens
        ids += torch.randint(3, IMAGE_TOKEN_ID, (text,), generator=g).tolist()
    return ids


def reference_pixels(images: list) -> torch.Tensor | None:
    """transformers' pixel_values [1, all tiles, 3, S, S] (its rows come out in tile order)."""
    if not images:
        return None
    return torch.cat([img.pixel_values for img in images])[None]


def reference_greedy(model: torch.nn.Module, ids: list[int], images: list,
                     num_tokens: int) -> list[int]:
    """transformers' `generate`, greedy, exactly `num_tokens` new tokens."""
    # transformers' SmolVLM generate fails on pixel_values=None: leave it out for text
    pixels = {"pixel_values": reference_pixels(images)} if images else {}
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), **pixels, do_sample=False,
                             max_new_tokens=num_tokens, min_new_tokens=num_tokens)
    return out[0, len(ids):].tolist()
