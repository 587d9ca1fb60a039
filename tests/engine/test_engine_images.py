"""The engine's side of images (the model comes from the vision-model branch): a model is a
vision model when it has `embed_images`; a prompt's image tokens must match its images; a
text-only engine refuses images instead of ignoring them."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.config import CacheConfig, EngineArgs
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.media.image_check import check_image_tokens
from pdserve.media.vision_spec import VisionSpec, vision_spec_of
from pdserve.multimodal import ImageInput

IMAGE_TOKEN = 9


SPEC = VisionSpec(image_token_id=IMAGE_TOKEN, image_seq_len=4, tile_size=8)


def image(num_tiles: int = 1, tokens_per_tile: int = 4, tile: int = 8) -> ImageInput:
    return ImageInput(b"h" * 32, torch.zeros(num_tiles, 3, tile, tile),
                      num_tiles * tokens_per_tile)


class VisionModelSide:
    """What the server needs of a vision model: `embed_images` and its image token."""

    image_token_id = IMAGE_TOKEN

    def embed_images(self, images):  # pragma: no cover - never called here
        raise NotImplementedError


def test_a_model_without_embed_images_is_text_only():
    assert vision_spec_of(None, torch.nn.Linear(1, 1)) is None


def test_a_vision_model_without_a_folder_gets_smolvlm_defaults():
    spec = vision_spec_of(None, VisionModelSide())
    assert spec == VisionSpec(image_token_id=IMAGE_TOKEN)


def test_a_vision_models_folder_gives_the_settings(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 81}))
    spec = vision_spec_of(str(tmp_path), VisionModelSide())
    assert (spec.image_token_id, spec.tile_size, spec.longest_edge, spec.image_seq_len) == \
        (IMAGE_TOKEN, 384, 1536, 81)


def test_image_tokens_must_match_the_images():
    prompt = [1, 2] + [IMAGE_TOKEN] * 8 + [3]
    check_image_tokens(prompt, [image(), image()], SPEC)
    with pytest.raises(ValueError, match="8 image tokens but its images fill 4"):
        check_image_tokens(prompt, [image()], SPEC)
    with pytest.raises(ValueError, match="image tokens come only from image parts"):
        check_image_tokens(prompt, [], SPEC)


def test_pixels_must_be_the_encoders_tiles_and_fill_their_tokens():
    prompt = [IMAGE_TOKEN] * 8
    with pytest.raises(ValueError, match=r"not \[tiles, 3, 8, 8\]"):
        check_image_tokens(prompt, [image(2, tile=16)], SPEC)
    with pytest.raises(ValueError, match="fills 1 x 4 tokens, not 8"):
        check_image_tokens(prompt, [image(1, tokens_per_tile=8)], SPEC)


def test_a_text_only_engine_refuses_images():
    engine = Engine(EngineArgs(cache=CacheConfig(kv_cache_memory=16 * 2**20)))
    assert engine.vision is None
    req = EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=1), images=[image()])
    with pytest.raises(ValueError, match="does not accept images"):
        engine.add_request(req)
    assert not engine.has_unfinished_requests()


def test_a_folder_whose_processor_skips_a_step_is_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    with pytest.raises(ValueError, match="do_normalize false is not supported"):
        VisionSpec.from_folder(tmp_path, image_token_id=1)


def test_one_number_for_mean_and_std_means_every_channel(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": 0.5, "image_std": [0.25, 0.5, 1]}))
    spec = VisionSpec.from_folder(tmp_path, image_token_id=1)
    assert (spec.image_mean, spec.image_std) == ((0.5,) * 3, (0.25, 0.5, 1.0))
