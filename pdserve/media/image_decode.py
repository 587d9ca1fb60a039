"""Encoded bytes -> one RGB image, refusing what is not a whole, reasonably sized image.

The header is read first and the pixel count checked before any pixel is decoded: a small
file that declares a huge canvas (a decompression bomb) costs nothing. Pillow's own bomb
check (twice Image.MAX_IMAGE_PIXELS, at open) is a refusal too."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from pdserve.media.errors import MediaError
from pdserve.media.limits import MediaLimits

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what Pillow may parse: no exotic decoders
WHITE = (255, 255, 255, 255)


def decode_image(data: bytes, limits: MediaLimits, param: str) -> Image.Image:
    """The image (a GIF's first frame) as RGB, transparency laid on white."""
    # (no warnings.catch_warnings here: it swaps process-wide filters, unsafe in a pool;
    # our own pixel check comes first, and Pillow's bomb error is caught below)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_size(image, limits, param)
        image.seek(0)  # an animation's first frame
        image.load()
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"the data is not an image in one of {', '.join(FORMATS)}",
                         param) from None
    except Image.DecompressionBombError:
        raise MediaError(_too_many_pixels(limits), param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt
        raise MediaError(f"the image could not be decoded (truncated or corrupt): {exc}",
                         param) from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' processors do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def _check_size(image: Image.Image, limits: MediaLimits, param: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError("the image has no pixels", param)
    if width * height > limits.max_image_pixels:
        raise MediaError(_too_many_pixels(limits, width, height), param)


def _too_many_pixels(limits: MediaLimits, width: int = 0, height: int = 0) -> str:
    size = f" ({width}x{height})" if width else ""
    return (f"the image has more than {limits.max_image_pixels} pixels{size} "
            "(--max-image-pixels)")
