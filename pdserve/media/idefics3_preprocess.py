"""SmolVLM / Idefics3 image preprocessing, as transformers' Idefics3ImageProcessor and
SmolVLMImageProcessor do it (tests compare the tensors): resize the longest edge, cut into
square tiles of the vision encoder's size plus one global image of the whole, then rescale
and normalise each tile."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pdserve.media.vision_spec import VisionSpec

MAX_IMAGE_SIZE = 4096  # transformers' bound on either side after the first resize


@dataclass
class Tiles:
    """One image's tiles, ready for the vision encoder."""

    pixel_values: torch.Tensor  # [num_tiles, 3, tile, tile] float32
    rows: int  # grid of split tiles (0 x 0: the global image alone)
    cols: int


def preprocess(image: Image.Image, spec: VisionSpec, split: bool) -> Tiles:
    """`image` (RGB) into normalised tiles; `split` False keeps only the global image."""
    image = _resize(image, _longest_edge_size(image.height, image.width, spec.longest_edge),
                    spec)
    tile = spec.tile_size
    if not split:
        return Tiles(_normalise([_resize(image, (tile, tile), spec)], spec), 0, 0)
    image = _resize(image, _tile_multiple_size(image.height, image.width, tile), spec)
    if image.height <= tile and image.width <= tile:
        return Tiles(_normalise([image], spec), 0, 0)
    rows, cols = image.height // tile, image.width // tile
    frames = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
              for r in range(rows) for c in range(cols)]
    frames.append(_resize(image, (tile, tile), spec))  # the global image, last
    return Tiles(_normalise(frames, spec), rows, cols)


def _resize(image: Image.Image, size: tuple[int, int], spec: VisionSpec) -> Image.Image:
    height, width = size
    if (image.height, image.width) == (height, width):
        return image  # PIL's resize to the same size is a copy: nothing to do
    return image.resize((width, height), resample=spec.resample)


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The longest edge to `longest`, the other by the aspect ratio rounded up to even;
    then both under MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both sides up to whole tiles (the short side from the long one's new size, as
    transformers computes it)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def _normalise(frames: list[Image.Image], spec: VisionSpec) -> torch.Tensor:
    pixels = np.stack([np.asarray(f, dtype=np.uint8) for f in frames])  # [n, H, W, 3]
    scaled = pixels.astype(np.float32) * np.float32(spec.rescale_factor)
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    normalised = (scaled - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2)))
