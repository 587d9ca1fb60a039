"""A tiny random-weight SmolVLM served end to end: transformers' model saved with the
embedded SmolLM2 tokenizer (plus SmolVLM's image tokens and chat template) and the image
processor's settings, in one Hugging Face folder that `pdserve serve --model` loads."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.media.vision_helpers import (
    IMAGE_SEQ_LEN,
    TILE,
    save_processor_folder,
    smolvlm_tokenizer,
)
from tests.smolvlm_reference import randomize_weights

PATCH = 16  # 64-pixel tiles: 4 x 4 patches, pixel shuffle by 2 -> IMAGE_SEQ_LEN rows a tile


def build_vlm_folder(folder: Path) -> Path:
    """Save the model, tokenizer and processor settings to `folder`; returns it."""
    import transformers

    tokenizer = smolvlm_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (TILE // PATCH // 2) ** 2 == IMAGE_SEQ_LEN
    torch.manual_seed(0)
    config = transformers.SmolVLMConfig(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TILE, patch_size=PATCH),
        scale_factor=2, image_token_id=image_token_id)
    model = randomize_weights(transformers.SmolVLMForConditionalGeneration(config).float()
                              .eval())
    model.save_pretrained(folder)
    save_processor_folder(folder, tokenizer)
    return folder
