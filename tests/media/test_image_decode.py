"""Decoding: the formats clients send, transparency on white, and a 400-worthy MediaError
for what is not a whole image of a sane size (checked before any pixel is decoded)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pdserve.media.errors import MediaError
from pdserve.media.image_decode import decode_image
from pdserve.media.limits import MediaLimits
from tests.media.vision_helpers import encoded, random_image

FIELD = "messages[0].content[0].image_url.url"
LIMITS = MediaLimits()


def refused(data: bytes, limits: MediaLimits = LIMITS) -> str:
    with pytest.raises(MediaError) as info:
        decode_image(data, limits, FIELD)
    assert info.value.param == FIELD
    return str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels(fmt):
    image = random_image(20, 30)
    save = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encoded(image, fmt, **save), LIMITS, FIELD)
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_jpeg_decodes_to_rgb_of_its_size():
    decoded = decode_image(encoded(random_image(20, 30), "JPEG"), LIMITS, FIELD)
    assert (decoded.mode, decoded.size) == ("RGB", (30, 20))


def test_a_gif_gives_its_first_frame():
    frames = [Image.new("P", (8, 8), color) for color in (1, 2)]
    frames[0].putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, LIMITS, FIELD).getpixel((0, 0)) == (255, 0, 0)


def test_transparency_is_laid_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encoded(image), LIMITS, FIELD).getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_becomes_rgb():
    decoded = decode_image(encoded(random_image(5, 5, mode="L")), LIMITS, FIELD)
    assert decoded.mode == "RGB"


def test_bytes_that_are_no_image_are_refused():
    assert "not an image" in refused(b"hello, this is text")


def test_a_format_outside_the_list_is_refused():
    assert "not an image" in refused(encoded(random_image(5, 5), "BMP"))


def test_a_truncated_image_is_refused():
    data = encoded(random_image(64, 64), "PNG")
    assert "truncated or corrupt" in refused(data[: len(data) // 2])


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("1", (12_000, 12_000)))  # 144 Mpx in a few KiB
    assert len(bomb) < 100_000
    assert "--max-image-pixels" in refused(bomb, MediaLimits(max_image_pixels=10**6))
    assert "--max-image-pixels" in refused(bomb)  # the default bound refuses it too


def test_an_image_under_the_pixel_bound_is_taken():
    limits = MediaLimits(max_image_pixels=100)
    assert decode_image(encoded(random_image(10, 10)), limits, FIELD).size == (10, 10)
