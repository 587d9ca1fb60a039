"""Our SmolVLM (vision tower, connector, text model with image rows) gives transformers'
outputs for the same config and weights, loaded from its save_pretrained folder."""

from __future__ import annotations

import pytest
import torch

from pdserve.models.hf_folder import hf_folder_config
from pdserve.models.loader import load_model, model_config
from tests.smolvlm_reference import (
    IMAGE_TOKEN_ID,
    TILE,
    build_reference,
    image,
    prompt,
    reference_pixels,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pair(tiny_smolvlm):
    reference, folder = tiny_smolvlm
    return reference, load_model(folder, torch.float32, torch.device("cpu")).model


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def test_config_reads_the_vision_tower_and_connector(tiny_smolvlm):
    reference, folder = tiny_smolvlm
    config, hf = hf_folder_config(folder), reference.config
    assert config.architecture == "smolvlm" and config.vision is not None
    v = config.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.image_size, v.patch_size) == (
        hf.vision_config.hidden_size, hf.vision_config.num_hidden_layers,
        hf.vision_config.num_attention_heads, hf.vision_config.image_size,
        hf.vision_config.patch_size)
    assert (v.scale_factor, v.image_token_id, v.tokens_per_tile) == (2, IMAGE_TOKEN_ID, 16)
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (64, 2, 320)
    assert not config.tie_word_embeddings


def test_vision_tower_matches_transformers(pair):
    reference, ours = pair
    pixels = torch.randn(3, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.model.get_image_features(pixels[None]).pooler_output[0]
        rows = ours.embed_images(pixels)
    assert rows.shape == (3 * 16, 64)
    assert _rel_err(rows, expected) < TOLERANCE


def test_vision_tower_matches_transformers_on_tiles_smaller_than_its_grid(pair):
    reference, ours = pair  # 16 px tiles spread over the 8 x 8 position grid (NaViT)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = reference.model.vision_model(pixel_values=pixels).last_hidden_state
        expected = reference.model.connector(hidden).reshape(-1, 64)
        rows = ours.embed_images(pixels)
    assert _rel_err(rows, expected) < TOLERANCE


@pytest.mark.parametrize("tiles", [[], [1], [1, 2, 1, 3]], ids=["0-images", "1-image",
                                                                 "4-images"])
def test_logits_match_transformers(pair, paged_cache, tiles):
    reference, ours = pair
    images = [image(seed=10 + i, tiles=n) for i, n in enumerate(tiles)]
    ids = prompt(images, seed=len(tiles))
    with torch.no_grad():
        expected = reference(torch.tensor([ids]),
                             pixel_values=reference_pixels(images)).logits[0]
        embeds = ours.embed_tokens(torch.tensor(ids))
        if images:
            rows = ours.embed_images(torch.cat([img.pixel_values for img in images]))
            embeds[torch.tensor(ids) == IMAGE_TOKEN_ID] = rows
    (logits,) = paged_cache(ours).step([("a", ids)], input_embeds=embeds)
    assert _rel_err(logits, expected) < TOLERANCE
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))  # greedy tokens too


def test_an_idefics3_checkpoint_loads_as_the_same_architecture(tmp_path, paged_cache):
    reference = build_reference(tmp_path, idefics3=True)
    ours = load_model(str(tmp_path), torch.float32, torch.device("cpu")).model
    assert reference.config.model_type == "idefics3" and ours.config.architecture == "smolvlm"
    images = [image(seed=5, tiles=2)]
    ids = prompt(images)
    with torch.no_grad():
        expected = reference(torch.tensor([ids]),
                             pixel_values=reference_pixels(images)).logits[0]
        embeds = ours.embed_tokens(torch.tensor(ids))
        embeds[torch.tensor(ids) == IMAGE_TOKEN_ID] = ours.embed_images(images[0].pixel_values)
    (logits,) = paged_cache(ours).step([("a", ids)], input_embeds=embeds)
    assert _rel_err(logits, expected) < TOLERANCE


def test_images_change_the_logits(pair, paged_cache):
    _, ours = pair  # the image rows are really used: another image, other logits
    ids = prompt([image(seed=1)])
    mask = torch.tensor(ids) == IMAGE_TOKEN_ID
    logits = []
    for seed in (1, 2):
        with torch.no_grad():
            embeds = ours.embed_tokens(torch.tensor(ids))
            embeds[mask] = ours.embed_images(image(seed=seed).pixel_values)
        logits.append(paged_cache(ours).step([("a", ids)], input_embeds=embeds)[0][-1])
    assert _rel_err(logits[0], logits[1]) > 1e-3


def test_random_weight_presets_build_and_see(paged_cache):
    config = model_config("smolvlm-256m")  # the real SmolVLM-256M-Instruct numbers
    assert (config.vision.hidden_size, config.vision.image_size, config.vision.patch_size,
            config.vision.scale_factor, config.vision.tokens_per_tile) == (768, 512, 16, 4, 64)
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (576, 30, 49280)
    tiny = load_model("smolvlm-tiny", torch.float32, torch.device("cpu"), seed=1).model
    with torch.no_grad():
        rows = tiny.embed_images(torch.randn(2, 3, 32, 32))
    assert rows.shape == (32, 64) and bool(torch.isfinite(rows).all())


def test_tiles_the_tower_cannot_take_are_refused(pair):
    _, ours = pair
    for bad in (torch.randn(1, 3, 32, 24), torch.randn(1, 3, 64, 64), torch.randn(1, 3, 20, 20),
                torch.randn(3, 32, 32)):
        with pytest.raises(ValueError, match="tiles|pixel_values"):
            ours.embed_images(bad)
