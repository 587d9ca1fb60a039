"""The image flags: vLLM's `--limit-mm-per-prompt` forms, bounds, and the body they size."""

from __future__ import annotations

import argparse

import pytest

from pdserve.media.flags import add_media_flags, images_per_prompt, media_limits
from pdserve.media.limits import MediaLimits, base64_chars
from pdserve.server.cli import parse_bytes


@pytest.mark.parametrize("text,count", [("3", 3), ('{"image": 8}', 8), ("0", 0)])
def test_images_per_prompt_takes_a_count_or_vllms_json(text, count):
    assert images_per_prompt(text) == count


@pytest.mark.parametrize("text", ["-1", '{"video": 1}', '{"image": "2"}', "two", "1.5"])
def test_images_per_prompt_refuses_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError):
        images_per_prompt(text)


def test_the_flags_fill_the_limits():
    p = argparse.ArgumentParser()
    add_media_flags(p, parse_bytes)
    args = p.parse_args(["--max-image-bytes", "1MiB", "--limit-mm-per-prompt", "2",
                         "--max-image-pixels", "1000", "--allowed-local-media-path", "/srv",
                         "--media-decode-threads", "3"])
    assert media_limits(args) == MediaLimits(2**20, 1000, 2, "/srv", 3)


def test_the_body_limit_fits_the_largest_images_as_base64_and_text():
    limits = MediaLimits(max_image_bytes=3 * 2**20, max_images=2)
    assert limits.body_bytes() == 2 * base64_chars(3 * 2**20) + 4 * 2**20
    assert base64_chars(3 * 2**20) == 4 * 2**20
