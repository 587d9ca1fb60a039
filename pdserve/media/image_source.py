"""An `image_url`'s bytes: a base64 `data:` URL, or a file inside the one folder the operator
allowed. Nothing is fetched from the network: an instance must not become a client of
whatever address a request names."""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

from pdserve.media.errors import MediaError
from pdserve.media.limits import MediaLimits, base64_chars

# media types Pillow decodes here; anything else is refused before decoding
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?P<params>(;[^;,]*)*?);base64,",
                       re.ASCII)


def image_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    """The encoded image named by `url` (refused with a MediaError naming `param`)."""
    if url.startswith("data:"):
        return _data_url_bytes(url, limits, param)
    if url.startswith("file://"):
        return _local_file_bytes(_file_url_path(url, param), limits, param)
    if re.match(r"https?://", url, re.IGNORECASE):
        raise MediaError("image URLs over the network are not fetched (network fetches are "
                         "off); send the image as a base64 data: URL", param)
    raise MediaError("image url must be a data: URL (data:image/png;base64,...) or, where "
                     "the server allows local files, a file:// URL", param)


def _data_url_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    head = _DATA_URL.match(url[:256])
    if head is None:
        raise MediaError("a data: URL must be data:<image type>;base64,<data>", param)
    if head["type"].lower() not in IMAGE_TYPES:
        raise MediaError(f"image type {head['type']!r} is not supported; send one of "
                         f"{', '.join(sorted(IMAGE_TYPES))}", param)
    payload = url[head.end():]
    if len(payload) > base64_chars(limits.max_image_bytes):  # before decoding anything
        raise MediaError(_too_big(limits), param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the image's base64 data is invalid: {exc}", param) from None
    if len(data) > limits.max_image_bytes:
        raise MediaError(_too_big(limits), param)
    return data


def _file_url_path(url: str, param: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise MediaError("a file:// URL must name a path on this host (file:///...)", param)
    return urllib.request.url2pathname(parts.path)


def _local_file_bytes(path: str, limits: MediaLimits, param: str) -> bytes:
    if limits.allowed_local_media_path is None:
        raise MediaError("local files are not served here (the server was started without "
                         "--allowed-local-media-path)", param)
    root = Path(limits.allowed_local_media_path).resolve()
    target = Path(path)
    if not target.is_absolute():
        raise MediaError("a file:// URL must name an absolute path", param)
    real = Path(os.path.realpath(target))  # symlinks followed: where the bytes really are
    if not real.is_relative_to(root) or not real.is_file():
        raise MediaError("the file is not inside the allowed media folder, or is missing",
                         param)
    if real.stat().st_size > limits.max_image_bytes:
        raise MediaError(_too_big(limits), param)
    with open(real, "rb") as f:
        data = f.read(limits.max_image_bytes + 1)  # it may have grown since the stat
    if len(data) > limits.max_image_bytes:
        raise MediaError(_too_big(limits), param)
    return data


def _too_big(limits: MediaLimits) -> str:
    return (f"the image is larger than {limits.max_image_bytes} bytes encoded "
            "(--max-image-bytes)")
