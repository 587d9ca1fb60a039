"""The image flags of `pdserve serve` (and of the router, whose body limit must let the
images through to the instances), named as vLLM names them where it has them."""

from __future__ import annotations

import argparse
import json

from pdserve.media import limits as L
from pdserve.media.limits import MediaLimits


def add_media_flags(p: argparse.ArgumentParser, parse_bytes, instance: bool = True) -> None:
    """Register the flags; `instance` False: only those that size a request's body."""
    p.add_argument("--max-image-bytes", type=parse_bytes, default=L.DEFAULT_MAX_IMAGE_BYTES,
                   help="largest image a request may send, encoded (before base64)")
    p.add_argument("--limit-mm-per-prompt", type=images_per_prompt,
                   default=L.DEFAULT_MAX_IMAGES, metavar="N_OR_JSON",
                   help='most images per request: N, or vLLM\'s {"image": N}')
    if not instance:
        return
    p.add_argument("--max-image-pixels", type=_positive_int, default=L.DEFAULT_MAX_IMAGE_PIXELS,
                   help="largest image, decoded (width x height): refused before decoding")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="serve file:// image URLs from inside DIR (off by default)")
    p.add_argument("--media-decode-threads", type=_positive_int,
                   default=L.DEFAULT_DECODE_THREADS,
                   help="images decoded and preprocessed at once")


def media_limits(args: argparse.Namespace) -> MediaLimits:
    """The limits the flags say (router: the body-sizing ones, the rest default)."""
    return MediaLimits(
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=getattr(args, "max_image_pixels", L.DEFAULT_MAX_IMAGE_PIXELS),
        max_images=args.limit_mm_per_prompt,
        allowed_local_media_path=getattr(args, "allowed_local_media_path", None),
        decode_threads=getattr(args, "media_decode_threads", L.DEFAULT_DECODE_THREADS),
    )


def images_per_prompt(text: str) -> int:
    """'4' or '{"image": 4}' -> 4 (0: images refused)."""
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count or JSON: {text!r}") from None
    if isinstance(value, dict):
        if set(value) - {"image"}:
            raise argparse.ArgumentTypeError("only images are supported: {\"image\": N}")
        value = value.get("image", L.DEFAULT_MAX_IMAGES)
    if type(value) is not int or value < 0:
        raise argparse.ArgumentTypeError(f"not a count of images: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


BODY_FLAGS = ("--max-image-bytes", "--limit-mm-per-prompt", "--max-request-bytes")


def body_flags(instance_args: list[str] | None) -> list[str]:
    """Of an instance's flags, those that size a request's body, for the router in front of
    it (`pdserve up -- --max-image-bytes 20MiB`: the router must let such bodies through)."""
    out: list[str] = []
    args = list(instance_args or [])
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name not in BODY_FLAGS:
            continue
        if "=" in arg:
            out.append(arg)
        elif i + 1 < len(args):
            out += [arg, args[i + 1]]
    return out
