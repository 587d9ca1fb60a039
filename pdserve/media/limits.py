"""Bounds on the images one request may bring (`pdserve serve` flags fill them in)."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_IMAGE_BYTES = 8 * 2**20  # encoded; a 12-megapixel JPEG is 3-6 MiB
DEFAULT_MAX_IMAGE_PIXELS = 6000 * 6000  # decoded: 144 MB of RGB at most
DEFAULT_MAX_IMAGES = 4  # per request, over all its messages
DEFAULT_DECODE_THREADS = 2  # images decoded and preprocessed at once, per server
TEXT_ROOM_BYTES = 4 * 2**20  # of a request's body beside its images


@dataclass(frozen=True)
class MediaLimits:
    """What a request's images may cost before it is refused with a 400."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    allowed_local_media_path: str | None = None  # a folder; None: no local files
    decode_threads: int = DEFAULT_DECODE_THREADS

    def body_bytes(self) -> int:
        """A body holding `max_images` images of the largest size as base64 data URLs, and
        text: what the HTTP body limit must allow for images to reach the 400s here."""
        return self.max_images * base64_chars(self.max_image_bytes) + TEXT_ROOM_BYTES


def base64_chars(num_bytes: int) -> int:
    return 4 * math.ceil(num_bytes / 3)
