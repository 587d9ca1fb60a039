"""Our SmolVLM / Idefics3 preprocessing gives transformers' pixel tensors (the reference):
tiles, their order, the global image, rescale and normalisation; and the content hash keys
the decoded pixels and the settings, not the encoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import Idefics3ImageProcessorPil

from pdserve.media.idefics3_preprocess import preprocess
from pdserve.media.image_inputs import ImagePreparer, ImageRef
from pdserve.media.limits import MediaLimits
from pdserve.media.vision_spec import VisionSpec
from tests.media.vision_helpers import data_url, encoded, image_processor, random_image

SIZES = [(300, 700), (1000, 20), (512, 512), (50, 60), (1537, 2049)]


def assert_matches(reference, image: Image.Image, spec: VisionSpec, split: bool) -> None:
    ref = reference(images=[[image]], do_image_splitting=split, return_tensors="np",
                    return_row_col_info=True)
    ours = preprocess(image, spec, split)
    expected = ref["pixel_values"][0]
    assert tuple(ours.pixel_values.shape) == expected.shape
    np.testing.assert_allclose(ours.pixel_values.numpy(), expected, atol=1e-5, rtol=0)
    assert (ours.rows, ours.cols) == (ref["rows"][0][0], ref["cols"][0][0])


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("split", [True, False])
def test_smolvlm_pixels_match_transformers(height, width, split):
    spec = VisionSpec(image_token_id=0, tile_size=512, longest_edge=2048)
    image = random_image(height, width, seed=height)
    assert_matches(image_processor(512, 2048), image, spec, split)


@pytest.mark.parametrize("height,width", SIZES[:3])
def test_idefics3_pixels_match_transformers(height, width):
    spec = VisionSpec(image_token_id=0, tile_size=364, longest_edge=4 * 364)
    reference = Idefics3ImageProcessorPil(size={"longest_edge": 4 * 364},
                                          max_image_size={"longest_edge": 364})
    assert_matches(reference, random_image(height, width, seed=width), spec, True)


def test_settings_from_a_saved_processor_match_it(tmp_path):
    reference = image_processor(384, 1536)
    reference.save_pretrained(tmp_path)
    spec = VisionSpec.from_folder(tmp_path, image_token_id=7)
    assert (spec.tile_size, spec.longest_edge, spec.image_token_id) == (384, 1536, 7)
    assert_matches(reference, random_image(200, 900, seed=3), spec, True)


def prepared(image_data: bytes, detail: str = "auto", media_type: str = "image/png"):
    spec = VisionSpec(image_token_id=0, tile_size=64, longest_edge=256, image_seq_len=4)
    preparer = ImagePreparer(spec, MediaLimits())
    try:
        return preparer.prepare_now(ImageRef(data_url(image_data, media_type), detail, "url"))
    finally:
        preparer.close()


def test_the_hash_keys_pixels_not_their_encoding():
    image = random_image(40, 50)
    png = prepared(encoded(image))
    webp = prepared(encoded(image, "WEBP", lossless=True), media_type="image/webp")
    assert png.input.content_hash == webp.input.content_hash
    assert len(png.input.content_hash) == 32  # blake2b-256


def test_other_pixels_or_settings_hash_differently():
    base = prepared(encoded(random_image(40, 50)))
    other = prepared(encoded(random_image(40, 50, seed=1)))
    low = prepared(encoded(random_image(40, 50)), detail="low")
    assert len({base.input.content_hash, other.input.content_hash,
                low.input.content_hash}) == 3


def test_detail_low_sends_the_global_image_alone():
    image = encoded(random_image(100, 300))
    high, low = prepared(image, "high"), prepared(image, "low")
    # 100 x 300 -> 86 x 256 -> 128 x 256: 2 x 4 tiles of 64, and the global image
    assert high.input.pixel_values.shape[0] == 2 * 4 + 1
    assert low.input.pixel_values.shape[0] == 1
    assert (high.input.num_tokens, low.input.num_tokens) == (9 * 4, 4)
