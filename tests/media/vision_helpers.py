"""A SmolVLM processor built here, without a hub: the embedded SmolLM2 tokenizer plus
SmolVLM's image tokens and chat template, and transformers' image processor. Tests use it
as the reference, and save it as a folder that a pdserve server serves images with."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] \
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TILE = 64  # small tiles and few tokens per tile: fast, same algorithm as 512 / 64
LONGEST_EDGE = 4 * TILE
IMAGE_SEQ_LEN = 4


class _Processor(SmolVLMProcessor):
    """transformers' SmolVLMProcessor without its video processor (that needs torchvision,
    which the CPU test machine lacks); images go through the real code."""

    def check_argument_for_proper_class(self, name, arg):
        if name != "video_processor":
            return super().check_argument_for_proper_class(name, arg)


def smolvlm_tokenizer():
    """The embedded SmolLM2 tokenizer with SmolVLM's special tokens and chat template."""
    from pdserve.models.loader import load_tokenizer

    tokenizer = load_tokenizer(None)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def image_processor(tile: int = TILE, longest_edge: int = LONGEST_EDGE):
    return SmolVLMImageProcessorPil(size={"longest_edge": longest_edge},
                                    max_image_size={"longest_edge": tile})


def reference_processor(tokenizer, tile: int = TILE, longest_edge: int = LONGEST_EDGE,
                        image_seq_len: int = IMAGE_SEQ_LEN) -> SmolVLMProcessor:
    return _Processor(image_processor=image_processor(tile, longest_edge), tokenizer=tokenizer,
                      video_processor=None, image_seq_len=image_seq_len)


def save_processor_folder(folder: Path, tokenizer) -> Path:
    """The tokenizer and processor settings as transformers saves them (what a SmolVLM
    checkpoint folder holds beside its weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": IMAGE_SEQ_LEN, "processor_class": "SmolVLMProcessor"}))
    return folder


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encoded(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
