"""`image`: chat requests with N random images each at one resolution, plus random text
(SGLang's `--dataset-name image`, with its flag names).

Image tokens are counted as SGLang's benchmark counts them: a request's input tokens are
those of its prompt as the model's processor expands it, every image standing as its
image-token text (its `<image>` tokens and the tile and global-image markers around
them); the vision tokens are that total minus the text's own tokens. Here each image's
expansion is computed with pdserve's own SmolVLM preprocessing from the --tokenizer
folder's processor settings (a folder without them: vision tokens 0, and the server's
usage still counts them in the input tokens).
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pdserve.bench.request import RequestSpec
from pdserve.bench.workloads.random_tokens import random_prompts

RESOLUTIONS = {"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720),
               "360p": (640, 360)}
FORMATS = ("jpeg", "png")
MAX_IMAGES = 64


def parse_resolution(text: str) -> tuple[int, int]:
    """'1080p' (and 4k, 720p, 360p) or 'WxH' -> (width, height)."""
    if text.lower() in RESOLUTIONS:
        return RESOLUTIONS[text.lower()]
    m = re.fullmatch(r"(\d+)x(\d+)", text.lower())
    if not m or not (0 < int(m.group(1)) <= 8192 and 0 < int(m.group(2)) <= 8192):
        raise ValueError(f"--image-resolution must be one of {list(RESOLUTIONS)} or WxH "
                         f"(each 1 to 8192), not {text!r}")
    return int(m.group(1)), int(m.group(2))


def image_workload(tokenizer: Any, num: int, image_count: int, resolution: str,
                   image_format: str, input_len: int, output_len: int, range_ratio: float,
                   seed: int, tokenizer_path: str | None = None) -> list[RequestSpec]:
    """`num` chat requests of `image_count` random images and ~`input_len` text tokens."""
    if not 0 <= image_count <= MAX_IMAGES:
        raise ValueError(f"--image-count must be 0 to {MAX_IMAGES}")
    if image_format not in FORMATS:
        raise ValueError(f"--image-format must be one of {FORMATS}")
    width, height = parse_resolution(resolution)
    per_image = image_tokens(tokenizer, tokenizer_path, width, height)
    rng = np.random.default_rng(seed)
    vision = per_image * image_count
    specs = []
    for text, ids, n_out in random_prompts(tokenizer, rng, num, input_len, output_len,
                                           range_ratio):
        urls = [random_image_url(rng, width, height, image_format) for _ in range(image_count)]
        specs.append(RequestSpec(text, len(ids) + vision, n_out, images=urls,
                                 vision_len=vision))
    return specs


def random_image_url(rng: np.random.Generator, width: int, height: int, fmt: str) -> str:
    """A `data:` URL of an image of uniform random pixels (no two requests share one)."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt.upper(), **({"quality": 85}
                                                             if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_tokens(tokenizer: Any, tokenizer_path: str | None, width: int, height: int) -> int:
    """Tokens one width x height image expands to in the prompt (0 if the folder has no
    processor settings to say)."""
    from pdserve.media.vision_spec import IMAGE_TOKEN, VisionSpec, is_vision_folder

    if not tokenizer_path or not Path(tokenizer_path).is_dir() \
            or not is_vision_folder(tokenizer_path):
        return 0
    from pdserve.media.idefics3_preprocess import preprocess
    from pdserve.media.image_prompt import image_prompt_text

    spec = VisionSpec.from_folder(tokenizer_path, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    tiles = preprocess(Image.new("RGB", (width, height)), spec, spec.do_image_splitting)
    text = image_prompt_text(spec, tiles.rows, tiles.cols)
    return len(tokenizer.encode(text, add_special_tokens=False))
